"""What travels with a VM besides its disks, without booting: real TPM state (made by swtpm_setup), the UEFI
variable store (made by the firmware module from OVMF's template), snapshot metadata and sparseness — through
offline snapshots, clones (TPM fresh or copied) and export/import. Plus the job verbs (list, get, cancel, busy)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from disks.conftest import sha256
from thalunix.engine import CreateOptions, DirectEngine
from thalunix.errors import ConflictError, NotFoundError
from thalunix.firmware import prepare_firmware
from thalunix.qemu.img import allocated_size

needs_swtpm = pytest.mark.skipif(not shutil.which("swtpm_setup"), reason="swtpm_setup (swtpm-tools) not installed")


def manufacture_tpm(folder: Path) -> str:
    """A real TPM 2.0 state (EK and all) in ``folder``; returns the hash of its state file."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["swtpm_setup", "--tpm2", "--tpmstate", str(folder), "--overwrite"], check=True,
                   capture_output=True, timeout=120)
    return sha256(folder / "tpm2-00.permall")


def uefi_vm(engine: DirectEngine, name: str) -> Path:
    engine.create(CreateOptions(name=name, ram="128M", cpus=1, firmware="uefi", tpm="off", disk="64M"))
    config = engine.get(name)
    _, vars_path = prepare_firmware(config, engine.runtime(), engine.data)   # what the first start does
    return Path(vars_path)


def qemu_io(path: Path, command: str) -> None:
    done = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "fail" not in done.stdout.lower(), done.stdout + done.stderr


@needs_swtpm
def test_offline_snapshot_covers_uefi_variables_and_tpm_state(engine: DirectEngine) -> None:
    vars_file = uefi_vm(engine, "stateful")
    config = engine.get("stateful")
    tpm_dir = engine.data.vm_path(config.id, "tpm")
    first_tpm = manufacture_tpm(tpm_dir)
    qemu_io(vars_file, "write -P 0xa1 0 64k")
    result = engine.snapshot_create("stateful", "installed", description="fresh TPM and variables")
    assert result["images"] == ["disk0", "fw-vars"] and result["note"] == "TPM state copied"

    second_tpm = manufacture_tpm(tpm_dir)            # the guest "re-provisions" its TPM
    qemu_io(vars_file, "write -P 0xb2 0 64k")        # and changes a UEFI variable
    assert second_tpm != first_tpm
    engine.snapshot_revert("stateful", "installed")
    assert sha256(tpm_dir / "tpm2-00.permall") == first_tpm
    qemu_io(vars_file, "read -P 0xa1 0 64k")
    listing = engine.snapshots("stateful")
    (row,) = listing["snapshots"]
    kept = engine.data.vm_path(config.id, "snapshots", "installed", "tpm", "tpm2-00.permall")
    assert row["images"] == ["disk0", "fw-vars"] and row["size"] >= kept.stat().st_size > 0   # the TPM state counts


@needs_swtpm
def test_clone_copies_or_renews_tpm_and_keeps_uefi_variables(engine: DirectEngine) -> None:
    vars_file = uefi_vm(engine, "parent")
    config = engine.get("parent")
    tpm_hash = manufacture_tpm(engine.data.vm_path(config.id, "tpm"))
    qemu_io(vars_file, "write -P 0xc3 0 64k")
    engine.snapshot_create("parent", "s1")
    copy = engine.clone("parent", "tpm-copy", tpm="copy", wait=True)
    fresh = engine.clone("parent", "tpm-fresh", linked=True, tpm="fresh", wait=True)
    assert copy["state"] == fresh["state"] == "done", (copy, fresh)
    for name, expect_tpm in (("tpm-copy", True), ("tpm-fresh", False)):
        clone = engine.get(name)
        assert clone.id != config.id and {n.mac for n in clone.nics}.isdisjoint({n.mac for n in config.nics})
        state = engine.data.vm_path(clone.id, "tpm", "tpm2-00.permall")
        assert state.is_file() == expect_tpm
        if expect_tpm:
            assert sha256(state) == tpm_hash
        clone_vars = engine.data.vm_path(clone.id, "firmware", "vars.qcow2")
        qemu_io(clone_vars, "read -P 0xc3 0 64k")
        # The clone starts without the source's snapshots (they describe the source's history).
        assert engine.snapshots(name)["snapshots"] == []
        assert (engine.data.vm_path(clone.id, "firmware", "vars.kind")).is_file()
    with pytest.raises(ConflictError, match="already exists"):
        engine.clone("parent", "TPM-COPY")


@needs_swtpm
def test_export_import_keeps_snapshots_tpm_variables_and_sparseness(engine: DirectEngine, tmp_path: Path) -> None:
    vars_file = uefi_vm(engine, "full")
    config = engine.get("full")
    tpm_hash = manufacture_tpm(engine.data.vm_path(config.id, "tpm"))
    disk = engine.data.resolve(config.disks[0].path)
    qemu_io(disk, "write -P 0x5a 1M 1M")
    engine.snapshot_create("full", "kept", description="survives export")
    qemu_io(disk, "write -P 0x6b 1M 1M")
    raw = engine.disk_add("full", size="1G", format="raw", bus="virtio")   # sparse: 1 GiB, nothing written
    archive_path = tmp_path / "full.7z"
    job = engine.export("full", str(archive_path), wait=True)
    assert job["state"] == "done", job
    assert archive_path.stat().st_size < 16 << 20   # the empty 1 GiB raw disk costs (almost) nothing
    other = DirectEngine.open(tmp_path / "other")
    try:
        result = other.import_vm(str(archive_path), wait=True)
        assert result["state"] == "done", result
        imported = other.get("full")
        assert imported.id == config.id   # a new data folder: the identity travels
        raw_disk = next(d for d in imported.disks if d.id == raw["id"])
        raw_path = other.data.resolve(raw_disk.path)
        assert raw_disk.format == "raw" and raw_path.stat().st_size == 1 << 30
        assert allocated_size(raw_path) < 4 << 20   # still sparse
        assert sha256(other.data.vm_path(imported.id, "tpm", "tpm2-00.permall")) == tpm_hash
        assert other.snapshots("full")["snapshots"][0]["name"] == "kept"
        assert other.snapshots("full")["snapshots"][0]["description"] == "survives export"
        # The snapshot still works after the trip: revert brings back the data written before it.
        other.disk_remove("full", raw["id"])   # added after the snapshot: not covered by it
        other.snapshot_revert("full", "kept")
        qemu_io(other.data.resolve(imported.disks[0].path), "read -P 0x5a 1M 1M")
        assert subprocess.run(["qemu-img", "compare", "-q", str(vars_file),
                               str(other.data.vm_path(imported.id, "firmware", "vars.qcow2"))]).returncode == 0
    finally:
        other.close()


def test_job_verbs(engine: DirectEngine, tmp_path: Path) -> None:
    engine.create(CreateOptions(name="jobs", ram="128M", cpus=1, firmware="bios", tpm="off", disk="512M",
                                disk_format="raw"))
    with open(engine.data.resolve(engine.get("jobs").disks[0].path), "r+b") as handle:
        for _ in range(4):   # 256 MiB that does not compress: the export's compression takes seconds
            handle.write(os.urandom(64 << 20))
    job = engine.export("jobs", str(tmp_path / "jobs.7z"))
    assert job["state"] == "running" and job["kind"] == "vm.export" and job["vm_name"] == "jobs"
    # While it runs, nothing else may touch the VM's images.
    with pytest.raises(ConflictError, match="busy"):
        engine.clone("jobs", "jobs-2")
    with pytest.raises(ConflictError, match="busy"):
        engine.start("jobs")   # QEMU must not open images being read or rewritten
    for verb in (lambda: engine.snapshot_create("jobs", "mid"), lambda: engine.disk_resize("jobs", "disk0", "1G"),
                 lambda: engine.disk_add("jobs", size="1G")):
        with pytest.raises(ConflictError, match="busy"):
            verb()
    finished = engine.jobs.wait(job["id"], 120)
    assert finished["state"] == "done" and finished["percent"] == 100, finished
    assert engine.job(job["id"])["state"] == "done"   # the busy refusals above left the job alone
    assert job["id"] in {j["id"] for j in engine.jobs_list()}
    with pytest.raises(ConflictError, match="already done"):
        engine.job_cancel(job["id"])
    with pytest.raises(NotFoundError):
        engine.job("nope")
    from thalunix.errors import ValidationError
    with pytest.raises(ValidationError, match="already exists"):   # refused before a job starts
        engine.export("jobs", str(tmp_path / "jobs.7z"))
