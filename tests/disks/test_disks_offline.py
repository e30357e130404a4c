"""Disks and snapshots without booting: qemu-img behaviour, refusals of bad input, 100 snapshot cycles,
convert progress and cancel, the CLI. Real qemu-img and qemu-io on real images; no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from disks.conftest import make_data_disk, sha256
from thalunix.engine import CreateOptions, DirectEngine
from thalunix.errors import NotFoundError, ThalunixError, ValidationError
from thalunix.snapshots import SnapshotUnsupportedError


def new_vm(engine: DirectEngine, name: str, disk: str = "64M", fmt: str = "qcow2", **extra) -> str:
    engine.create(CreateOptions(name=name, ram="128M", cpus=1, firmware="bios", tpm="off", disk=disk,
                                disk_format=fmt, **extra))
    return name


def image(engine: DirectEngine, name: str, disk: str = "disk0") -> Path:
    return engine.data.resolve(next(d.path for d in engine.get(name).disks if d.id == disk))


def qemu_io(path: Path, command: str, fmt: str = "qcow2") -> str:
    done = subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "failed" not in done.stdout.lower(), done.stdout + done.stderr
    return done.stdout


def test_hundred_snapshot_cycles_leave_a_clean_image(engine: DirectEngine) -> None:
    new_vm(engine, "cycles")
    disk = image(engine, "cycles")
    qemu_io(disk, "write -P 0x11 0 4M")
    for cycle in range(100):
        engine.snapshot_create("cycles", f"c{cycle}", description=f"cycle {cycle}")
        qemu_io(disk, f"write -P 0x{(cycle % 200) + 32:02x} {cycle % 8}M 1M")   # changes after the snapshot
        engine.snapshot_revert("cycles", f"c{cycle}")
        engine.snapshot_delete("cycles", f"c{cycle}")
    # Every revert brought back the data as it was before that cycle's write.
    qemu_io(disk, "read -P 0x11 0 4M")
    report = engine.disk_check("cycles", "disk0")
    assert report["clean"], report
    assert report["report"]["check-errors"] == 0 and report["report"]["leaks"] == 0
    assert report["report"]["corruptions"] == 0
    assert engine.snapshots("cycles")["snapshots"] == []
    assert json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True,
                                     text=True, check=True).stdout).get("snapshots") is None


def test_snapshot_tree_keeps_parents_and_reparents_on_delete(engine: DirectEngine) -> None:
    new_vm(engine, "tree")
    engine.snapshot_create("tree", "base")
    engine.snapshot_create("tree", "left")
    engine.snapshot_revert("tree", "base")
    engine.snapshot_create("tree", "right", description="from base")
    listing = engine.snapshots("tree")
    assert listing["current"] == "right"
    (root,) = listing["tree"]
    assert root["name"] == "base" and [c["name"] for c in root["children"]] == ["left", "right"]
    engine.snapshot_delete("tree", "base")
    listing = engine.snapshots("tree")
    assert sorted(n["name"] for n in listing["tree"]) == ["left", "right"]   # children moved up
    assert all(row["created"] for row in listing["snapshots"])


def test_bad_input_is_refused_with_a_way_out(engine: DirectEngine) -> None:
    new_vm(engine, "bad", disk="64M", fmt="raw")
    before = (engine.data.vm_path(engine.get("bad").id, "vm.json")).read_bytes()
    # A raw disk cannot hold snapshots: the refusal names the disk and offers the convert.
    with pytest.raises(SnapshotUnsupportedError) as refused:
        engine.snapshot_create("bad", "first")
    assert "disk0" in str(refused.value) and "convert disk0 qcow2" in refused.value.fix
    assert "convert" in str(refused.value)
    # Shrinking without force is refused and says what would be lost.
    with pytest.raises(ValidationError, match="cuts off the last 32 MiB.*force"):
        engine.disk_resize("bad", "disk0", "32M")
    assert int(json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image(engine, "bad"))],
                                         capture_output=True, text=True).stdout)["virtual-size"]) == 64 << 20
    job = engine.disk_convert("bad", "disk0", "qcow2", wait=True)
    assert job["state"] == "done", job
    # Snapshot names never become paths.
    for name in ("../evil", "a/b", "a\\b", "", "..", ".", "x" * 80, "-dash", "12", "sp ace", "nul\x00"):
        with pytest.raises(ValidationError):
            engine.snapshot_create("bad", name)
    assert not list(engine.data.vm_dir(engine.get("bad").id).glob("snapshots/*"))
    with pytest.raises(NotFoundError, match="no snapshot 'never'"):
        engine.snapshot_revert("bad", "never")
    with pytest.raises(NotFoundError):
        engine.snapshot_delete("bad", "never")
    # Shrinking with force works (stopped VM, explicit).
    assert engine.disk_resize("bad", "disk0", "32M", force_shrink=True)["virtual_size"] == 32 << 20
    # Converting to the same format, or an unknown one, is refused.
    with pytest.raises(ValidationError):
        engine.disk_convert("bad", "disk0", "qcow2")
    with pytest.raises(ValidationError):
        engine.disk_convert("bad", "disk0", "vmdk")
    assert (engine.data.vm_path(engine.get("bad").id, "vm.json")).read_bytes() != before   # only the convert changed it


def test_import_refuses_foreign_and_damaged_files(engine: DirectEngine, tmp_path: Path) -> None:
    text = tmp_path / "notes.7z"
    text.write_text("not an archive\n")
    with pytest.raises(ThalunixError, match="not a 7z archive"):
        engine.import_vm(str(text))
    import py7zr
    foreign = tmp_path / "foreign.7z"
    with py7zr.SevenZipFile(foreign, "w") as made:
        made.writestr("hello", "hello.txt")
    with pytest.raises(ThalunixError, match="no manifest.json"):
        engine.import_vm(str(foreign))
    with pytest.raises(ValidationError, match="does not exist"):
        engine.import_vm(str(tmp_path / "missing.7z"))
    # A manifest that under-states a member's size (a bomb) or names a path outside the VM is refused.
    from thalunix.model import VMConfig
    config = VMConfig(name="bomb")
    config.set_defaults()
    for members, content, expected in (
            ([{"path": "vm.json", "size": 10, "sha256": "0" * 64}], b"x" * (5 << 20), "larger than its manifest"),
            ([{"path": "../evil", "size": 1, "sha256": "0" * 64}], b"x", "cannot hold")):
        hostile = tmp_path / "hostile.7z"
        hostile.unlink(missing_ok=True)
        with py7zr.SevenZipFile(hostile, "w") as made:
            made.writestr(json.dumps({"format": "thalunix-vm-export", "version": 1, "vm": config.to_dict(),
                                      "members": members}), "manifest.json")
            made.writestr(content, "vm.json")
        try:
            job = engine.import_vm(str(hostile), wait=True)
        except ThalunixError as error:
            assert expected in str(error)
        else:
            assert job["state"] == "failed" and expected in job["error"], job
    assert engine.list() == []
    assert not [p for p in engine.data.tmp_dir.iterdir() if p.name.startswith("work-")]


def test_convert_reports_progress_and_cancel_leaves_the_disk_as_it_was(engine: DirectEngine, tmp_path: Path) -> None:
    new_vm(engine, "conv", disk="768M", fmt="raw")
    disk = image(engine, "conv")
    with open(disk, "r+b") as handle:
        for _ in range(8):   # 512 MiB of incompressible data: the convert takes a moment
            handle.write(os.urandom(64 << 20))
    before = sha256(disk)
    with engine.bus.subscribe(accept=lambda e: e["type"] == "job.progress") as events:
        job = engine.disk_convert("conv", "disk0", "qcow2", wait=True)
        seen = []
        while (event := events.get(timeout=0)) is not None:
            seen.append(event)
    assert job["state"] == "done", job
    percents = [e["percent"] for e in seen if e["job"] == job["id"] and e["state"] == "running"]
    assert len([p for p in percents if 0 < p < 100]) >= 5, percents   # at least every 5 %, however fast
    assert seen[-1]["state"] == "done" and seen[-1]["percent"] == 100
    converted = image(engine, "conv")
    assert converted.suffix == ".qcow2" and not disk.exists()
    back = tmp_path / "back.raw"   # the guest sees the same bytes as before the convert
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(converted), str(back)], check=True)
    assert sha256(back) == before
    back.unlink()
    # Back to raw, cancelled as soon as it starts (qemu-img is killed, or never runs): nothing changes.
    qcow_hash = sha256(converted)
    job = engine.disk_convert("conv", "disk0", "raw")
    engine.job_cancel(job["id"])
    finished = engine.jobs.wait(job["id"], 60)
    assert finished["state"] == "cancelled", finished
    assert image(engine, "conv") == converted and sha256(converted) == qcow_hash
    assert sorted(p.name for p in converted.parent.iterdir()) == [converted.name]
    assert not [p for p in engine.data.tmp_dir.iterdir() if p.name.startswith("work-")]


def test_disk_add_remove_resize_and_cli(engine: DirectEngine, data_dir: Path, tmp_path: Path) -> None:
    new_vm(engine, "cli")
    engine.close()
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "thalunix", "--data-dir", str(data_dir), *args],
                              capture_output=True, text=True, timeout=120)
    done = cli("vm", "disk", "cli", "add", "--size", "32M", "--bus", "nvme", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == "disk1" and json.loads(done.stdout)["bus"] == "nvme"
    assert cli("vm", "disk", "cli", "resize", "disk1", "48M").returncode == 0
    done = cli("vm", "disk", "cli", "resize", "disk1", "16M")
    assert done.returncode == 1 and "force" in done.stderr
    attached = make_data_disk(tmp_path, "cli")
    assert cli("vm", "disk", "cli", "add", "--path", str(attached), "--bus", "sata").returncode == 0
    rows = json.loads(cli("vm", "disk", "cli", "list", "--json").stdout)
    assert [(r["id"], r["format"], r["bus"]) for r in rows] == [("disk0", "qcow2", "virtio"),
                                                              ("disk1", "qcow2", "nvme"), ("disk2", "raw", "sata")]
    assert rows[1]["virtual_size"] == 48 << 20
    assert cli("vm", "disk", "cli", "check", "disk1").returncode == 0
    done = cli("vm", "snapshot", "cli", "create", "s1")
    assert done.returncode == 1 and "convert disk2 qcow2" in done.stderr
    assert cli("vm", "disk", "cli", "remove", "disk2").returncode == 0
    assert attached.exists()   # a disk outside the VM's folder is detached, never erased
    assert cli("vm", "snapshot", "cli", "create", "s1", "--description", "first").returncode == 0
    assert cli("vm", "snapshot", "cli", "create", "s2").returncode == 0
    done = cli("vm", "snapshot", "cli", "list")
    assert "s1" in done.stdout and "└─ s2" in done.stdout and "current" in done.stdout, done.stdout
    done = cli("vm", "snapshot", "cli", "revert", "nope")
    assert done.returncode == 1 and "no snapshot 'nope'" in done.stderr
    done = cli("vm", "disk", "cli", "remove", "disk1", "--delete-file")
    assert done.returncode == 0 and "deleted" in done.stdout
    done = cli("vm", "clone", "cli", "cli-linked", "--linked")
    assert done.returncode == 0 and "linked clone 'cli-linked'" in done.stdout, done.stderr
    done = cli("vm", "delete", "cli", "--yes")
    assert done.returncode == 1 and "linked clone 'cli-linked'" in done.stderr
    archive_path = tmp_path / "cli.7z"
    done = cli("vm", "export", "cli-linked", str(archive_path))
    assert done.returncode == 0 and archive_path.is_file(), done.stderr
    done = cli("vm", "import", str(archive_path), "--name", "cli-back", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "cli-back"
    done = cli("vm", "import", str(tmp_path / "missing.7z"))
    assert done.returncode == 1 and "does not exist" in done.stderr
    fresh = DirectEngine.open(data_dir)
    try:
        assert [row["name"] for row in fresh.list()] == ["cli", "cli-back", "cli-linked"]
        assert fresh.disks("cli-back")[0]["backing_file"] is None   # the export flattened the linked disk
        assert [d.id for d in fresh.get("cli").disks] == ["disk0"]
        names = {p.name for p in fresh.data.vm_path(fresh.get("cli").id, "disks").iterdir()}
        assert "disk0.qcow2" in names and not any(name.startswith("disk1") for name in names)   # disk1 erased
    finally:
        fresh.close()
