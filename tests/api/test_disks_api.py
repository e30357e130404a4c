"""The disk, snapshot, clone, export/import and job routes against the real server, real qemu-img and py7zr
(no guest boots): what each route does to the files, progress as job.progress events, and hostile input —
snapshot names with '/' or '..', shrinking without force, exports into the data folder's own areas or to
relative paths, paths with NUL or over-long names, imports of files that are no 7z archive.

Run: .venv/bin/python -m pytest tests/api/test_disks_api.py -q
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import py7zr
import pytest

from thalunix.api.disks import SNAPSHOT_PATTERN
from thalunix.engine import DirectEngine
from thalunix.errors import ValidationError
from thalunix.snapshots import validate_snapshot_name

from .conftest import Api, EventReader

SMALL = {"ram": "64M", "cpus": 1, "firmware": "bios", "tpm": "off"}


def create(api: Api, name: str, **fields: Any) -> dict[str, Any]:
    answer = api.post("/api/vms", json={"name": name, **SMALL, **fields})
    assert answer.status_code == 201, answer.text
    return answer.json()


def refused(answer: Any, status: int, field: str | None, *words: str) -> dict[str, Any]:
    """The answer is a JSON error with this status and field, whose message holds ``words``."""
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["field"] == field, error
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error


def follow(events: EventReader, job: dict[str, Any], timeout: float = 120) -> list[dict[str, Any]]:
    """The job's job.progress events until it ends (its last one included)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kind, data = events.next({"job.progress"}, timeout=max(1.0, deadline - time.monotonic()))
        assert kind == "job.progress", kind
        if data["job"] == job["id"]:
            seen.append(data)
            if data["state"] != "running":
                return seen
    raise AssertionError(f"job {job['id']} did not end in {timeout} s: {seen[-3:]}")


def test_disks_list_add_grow_refuse_shrink_convert_check_remove(api: Api, engine: DirectEngine,
                                                                 tmp_path: Path) -> None:
    create(api, "store", disk="64M")
    rows = api.get("/api/vms/store/disks").json()
    assert [(r["id"], r["format"], r["bus"], r["virtual_size"]) for r in rows] == [("disk0", "qcow2", "virtio",
                                                                                    64 << 20)]
    # A new raw disk, and an existing image from elsewhere on this computer.
    answer = api.post("/api/vms/store/disks", json={"size": "32M", "format": "raw", "bus": "scsi"})
    assert answer.status_code == 201, answer.text
    raw = answer.json()
    assert (raw["id"], raw["format"], raw["bus"], raw["virtual_size"]) == ("disk1", "raw", "scsi", 32 << 20)
    assert Path(raw["file"]).is_file() and Path(raw["file"]).parent == engine.data.vm_path(engine.get("store").id,
                                                                                              "disks")
    outside = tmp_path / "outside.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(outside), "16M"], check=True)
    answer = api.post("/api/vms/store/disks", json={"path": str(outside), "bus": "nvme", "readonly": True})
    assert answer.status_code == 201, answer.text
    assert answer.json()["readonly"] is True and answer.json()["file"] == str(outside)
    refused(api.post("/api/vms/store/disks", json={"path": str(outside)}), 409, None, "already has")
    refused(api.post("/api/vms/store/disks", json={"size": "8M", "path": str(outside)}), 400, "path", "not both")
    refused(api.post("/api/vms/store/disks", json={}), 400, "size", "existing image")
    refused(api.post("/api/vms/store/disks", json={"size": "8M", "bus": "floppy"}), 400, "bus", "virtio")
    refused(api.post("/api/vms/store/disks", json={"path": str(outside), "format": "vmdk"}), 400, "format")
    refused(api.post("/api/vms/store/disks", json={"size": "lots"}), 400, "size", "512M")
    refused(api.post("/api/vms/store/disks", json={"path": "disks/x.qcow2"}), 400, "path", "full path")
    refused(api.post("/api/vms/store/disks", json={"path": str(tmp_path / "none.qcow2")}), 400, "path", "not a file")
    refused(api.post("/api/vms/store/disks", json={"path": "/tmp/a\u0000b.img"}), 400, "path", "control character")
    refused(api.post("/api/vms/store/disks", json={"path": "/tmp/" + "x" * 300}), 400, "path", "too long")
    refused(api.post("/api/vms/store/disks", json={"size": 8}), 400, "size")
    assert len(api.get("/api/vms/store/disks").json()) == 3

    # Grow; a shrink without force is refused and says what would be lost and what to do.
    grown = api.post("/api/vms/store/disks/disk0/resize", json={"size": "128M"})
    assert grown.status_code == 200, grown.text
    assert grown.json()["virtual_size"] == 128 << 20 and grown.json()["changed"] is True
    error = refused(api.post("/api/vms/store/disks/disk0/resize", json={"size": "96M"}), 400, "size",
                    "shrinking it", "cuts off the last 32 MiB", "force")
    assert error["error"] == "invalid"
    assert api.get("/api/vms/store/disks").json()[0]["virtual_size"] == 128 << 20
    shrunk = api.post("/api/vms/store/disks/disk0/resize", json={"size": "96M", "force_shrink": True})
    assert shrunk.status_code == 200 and shrunk.json()["virtual_size"] == 96 << 20, shrunk.text
    refused(api.post("/api/vms/store/disks/disk9/resize", json={"size": "1G"}), 404, None, "disk0, disk1")
    refused(api.post("/api/vms/store/disks/disk0/resize", json={"size": "1G", "shrink": 1}), 400, "shrink")

    # Convert raw → qcow2 as a job: 202 at once, progress by events, the result in GET /api/jobs/{id}.
    events = EventReader(api, "?types=job.progress")
    try:
        assert events.next({"ready"})[0] == "ready"
        answer = api.post("/api/vms/store/disks/disk1/convert", json={"format": "qcow2"})
        assert answer.status_code == 202, answer.text
        job = answer.json()
        assert (job["kind"], job["state"], job["vm_name"]) == ("disk.convert", "running", "store")
        seen = follow(events, job)
    finally:
        events.close()
    assert seen[-1]["state"] == "done" and seen[-1]["percent"] == 100, seen[-1]
    assert [e["percent"] for e in seen] == sorted(e["percent"] for e in seen)
    finished = api.get(f"/api/jobs/{job['id']}").json()
    assert finished["result"]["format"] == "qcow2" and finished["result"]["file"].endswith("disk1.qcow2")
    assert not Path(raw["file"]).exists()
    assert job["id"] in [row["id"] for row in api.get("/api/jobs").json()]
    refused(api.post("/api/vms/store/disks/disk1/convert", json={"format": "qcow2"}), 400, "format", "already")
    refused(api.post("/api/vms/store/disks/disk1/convert", json={"format": "vdi"}), 400, "format")
    refused(api.post(f"/api/jobs/{job['id']}/cancel"), 409, None, "already done")
    refused(api.post("/api/jobs/nothing/cancel"), 404, None, "GET /api/jobs")
    refused(api.get("/api/jobs/nothing"), 404, None)

    check = api.post("/api/vms/store/disks/disk1/check", json={})
    assert check.status_code == 200 and check.json()["clean"] is True, check.text
    assert api.post("/api/vms/store/disks/disk0/check", json={"repair": "leaks"}).json()["clean"] is True
    refused(api.post("/api/vms/store/disks/disk0/check", json={"repair": "everything"}), 400, "repair", "leaks")

    # Remove: the outside image stays; the VM's own image goes when asked.
    gone = api.delete("/api/vms/store/disks/disk2")
    assert gone.status_code == 200 and gone.json() == {"removed": "disk2", "path": str(outside), "file_deleted": False}
    assert outside.is_file()
    converted = Path(finished["result"]["file"])
    assert api.delete("/api/vms/store/disks/disk1", params={"delete_file": "true"}).json()["file_deleted"] is True
    assert not converted.exists()
    assert [row["id"] for row in api.get("/api/vms/store/disks").json()] == ["disk0"]
    refused(api.delete("/api/vms/store/disks/disk1", params={"delete_file": "perhaps"}), 400, "delete_file")


def test_snapshot_tree_revert_delete_and_hostile_names(api: Api, engine: DirectEngine) -> None:
    create(api, "snappy", disk="32M")
    disk = engine.data.resolve(engine.get("snappy").disks[0].path)
    listing = api.get("/api/vms/snappy/snapshots").json()
    assert listing["tree"] == [] and listing["unsupported"] is None

    first = api.post("/api/vms/snappy/snapshots", json={"name": "clean", "description": "fresh install"})
    assert first.status_code == 201, first.text
    assert first.json()["live"] is False and first.json()["parent"] is None
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(disk)], check=True, capture_output=True)
    second = api.post("/api/vms/snappy/snapshots", json={"name": "step-1.a_b"})
    assert second.status_code == 201 and second.json()["parent"] == "clean", second.text
    tree = api.get("/api/vms/snappy/snapshots").json()
    assert [node["name"] for node in tree["tree"]] == ["clean"]
    child = tree["tree"][0]["children"][0]
    assert (child["name"], child["current"], child["available"]) == ("step-1.a_b", True, True)
    assert tree["tree"][0]["description"] == "fresh install" and tree["tree"][0]["created"]

    # Back to "clean": the data written after it is gone; a new snapshot then branches off "clean".
    reverted = api.post("/api/vms/snappy/snapshots/clean/revert")
    assert reverted.status_code == 200 and reverted.json()["name"] == "clean", reverted.text
    read = subprocess.run(["qemu-io", "-c", "read -P 0x5a 0 1M", str(disk)], capture_output=True, text=True)
    assert "Pattern verification failed" in read.stdout
    assert api.post("/api/vms/snappy/snapshots", json={"name": "branch"}).status_code == 201
    tree = api.get("/api/vms/snappy/snapshots").json()
    assert sorted(c["name"] for c in tree["tree"][0]["children"]) == ["branch", "step-1.a_b"]
    assert tree["current"] == "branch"

    # Hostile names: never reach qemu-img or the filesystem.
    for name in ("a/b", "..", "../etc", ".hidden", "-flag", "1234", "x" * 64, "tab\tname", "new\nline", "snap\n",
                 "", "ünï", "a b"):
        refused(api.post("/api/vms/snappy/snapshots", json={"name": name}), 400, "name", "not allowed")
    refused(api.post("/api/vms/snappy/snapshots", json={"name": 5}), 400, "name")
    refused(api.post("/api/vms/snappy/snapshots", json={"name": "ok", "description": "d" * 1001}), 400,
            "description")
    refused(api.post("/api/vms/snappy/snapshots", json={"name": "ok", "live": True}), 409, None, "not running")
    refused(api.post("/api/vms/snappy/snapshots", json={"name": "clean"}), 409, None, "already has")
    for path in ("/api/vms/snappy/snapshots/..%2Fclean/revert", "/api/vms/snappy/snapshots/a%2Fb",
                 "/api/vms/snappy/snapshots/../revert"):
        answer = api.post(path) if path.endswith("revert") else api.delete(path)
        assert answer.status_code in (400, 404, 405) and answer.json()["message"], (path, answer.text)
    refused(api.post("/api/vms/snappy/snapshots/..%20/revert"), 400, "name", "not allowed")
    refused(api.post("/api/vms/snappy/snapshots/nothing/revert"), 404, None, "clean")
    # Encoded, so no client folds the dots away before the server sees them.
    refused(api.delete("/api/vms/snappy/snapshots/%2E%2E"), 400, "name", "not allowed")
    assert sorted(row["name"] for row in api.get("/api/vms/snappy/snapshots").json()["snapshots"]) == \
        ["branch", "clean", "step-1.a_b"]

    # Deleting a parent hands its children to its own parent.
    assert api.delete("/api/vms/snappy/snapshots/clean").json() == {"deleted": "clean"}
    tree = api.get("/api/vms/snappy/snapshots").json()["tree"]
    assert sorted(node["name"] for node in tree) == ["branch", "step-1.a_b"]

    # A raw disk: the listing says why no snapshot can be taken, and the refusal names the convert.
    create(api, "rawvm", disk="16M", disk_format="raw")
    unsupported = api.get("/api/vms/rawvm/snapshots").json()["unsupported"]
    assert unsupported["disks"] == ["disk0"] and "convert to qcow2" in unsupported["message"]
    error = refused(api.post("/api/vms/rawvm/snapshots", json={"name": "first"}), 409, None, "raw",
                    "convert disk0 qcow2")
    assert error["error"] == "snapshot-unsupported"


@pytest.mark.parametrize("name", ["a", "A1", "clean", "step-1.a_b", "0x", "1.0", "9" * 62 + "z", "x" * 63, "1", "123",
                                  "x" * 64, "..", ".", ".a", "-a", "_a", "a/b", "a b", "a\n", "ü", ""])
def test_the_contract_repeats_the_library_snapshot_rule(name: str) -> None:
    try:
        validate_snapshot_name(name)
        library = True
    except ValidationError:
        library = False
    assert bool(re.fullmatch(SNAPSHOT_PATTERN, name)) == library


def test_clone_export_import_with_progress_and_hostile_paths(api: Api, engine: DirectEngine, tmp_path: Path) -> None:
    create(api, "origin", disk="64M")
    disk = engine.data.resolve(engine.get("origin").disks[0].path)
    # Data that does not compress, so the export has real work to show.
    subprocess.run(["qemu-io", "-c", "write -P 0x33 0 4M", str(disk)], check=True, capture_output=True)
    events = EventReader(api)
    try:
        assert events.next({"ready"})[0] == "ready"
        # -- linked clone, TPM fresh ------------------------------------------------------------------
        answer = api.post("/api/vms/origin/clone", json={"name": "origin-linked", "linked": True, "tpm": "fresh"})
        assert answer.status_code == 202, answer.text
        clone_job = answer.json()
        assert clone_job["kind"] == "vm.clone"
        created = events.next({"vm.config"})[1]
        assert (created["name"], created["change"]) == ("origin-linked", "created")
        assert follow(events, clone_job)[-1]["state"] == "done"
        names = [row["name"] for row in api.get("/api/vms").json()]
        assert names == ["origin", "origin-linked"]
        clone_disk = api.get("/api/vms/origin-linked/disks").json()[0]
        assert clone_disk["backing_file"], clone_disk
        refused(api.post("/api/vms/origin/clone", json={"name": "Origin-Linked"}), 409, None, "already exists")
        refused(api.post("/api/vms/origin/clone", json={"name": "../evil"}), 400, "name")
        refused(api.post("/api/vms/origin/clone", json={"name": "two\n"}), 400, "name")
        refused(api.post("/api/vms/origin/clone", json={"name": "x", "tpm": "borrow"}), 400, "tpm", "fresh")
        refused(api.post("/api/vms/origin/clone", json={"name": "x", "linked": "yes"}), 400, "linked")
        # The source of a linked clone keeps its snapshots but cannot go back to them.
        assert api.post("/api/vms/origin/snapshots", json={"name": "after"}).status_code == 201

        # -- export ----------------------------------------------------------------------------------
        target = tmp_path / "out" / "origin.7z"
        target.parent.mkdir()
        answer = api.post("/api/vms/origin-linked/export", json={"file": str(target)})
        assert answer.status_code == 202, answer.text
        export_job = answer.json()
        seen = follow(events, export_job)
    finally:
        events.close()
    assert seen[-1]["state"] == "done", seen[-1]
    percents = [e["percent"] for e in seen]
    assert percents == sorted(percents) and len(set(percents)) >= 4, percents
    result = api.get(f"/api/jobs/{export_job['id']}").json()["result"]
    assert result["file"] == str(target) and result["size"] == target.stat().st_size
    with py7zr.SevenZipFile(target) as archive:
        assert "manifest.json" in archive.getnames()
    assert not list(target.parent.glob(".*partial"))

    data = engine.data
    for file, field, words in [
        (str(target), "file", ["already exists"]),
        ("origin.7z", "file", ["not a full path"]),
        ("out/x.7z", "file", ["not a full path"]),
        (str(tmp_path / "out" / "origin.zip"), "file", [".7z"]),
        (str(tmp_path / "nowhere" / "x.7z"), "file", ["does not exist"]),
        (str(data.vms_dir / "x.7z"), "file", ["folders Thalunix manages"]),
        (str(data.vm_path(engine.get("origin").id, "disks", "x.7z")), "file", ["folders Thalunix manages"]),
        (str(data.tmp_dir / "x.7z"), "file", ["folders Thalunix manages"]),
        (str(data.vms_dir / ".." / "vms" / "y.7z"), "file", ["folders Thalunix manages"]),
        ("/tmp/a\u0000b.7z", "file", ["control character"]),
        ("/tmp/" + "x" * 300 + ".7z", "file", ["too long"]),
        ("   ", "file", ["full path"]),
    ]:
        refused(api.post("/api/vms/origin/export", json={"file": file}), 400, field, *words)
    refused(api.post("/api/vms/origin/export", json={}), 400, "file")
    refused(api.post("/api/vms/origin/export", json={"file": str(tmp_path / "a.7z"), "level": 9}), 400, "level")
    # A symlinked folder leading into vms/ is seen through.
    link = tmp_path / "sneaky"
    link.symlink_to(data.vms_dir)
    refused(api.post("/api/vms/origin/export", json={"file": str(link / "x.7z")}), 400, "file", "manages")
    # The data folder's top level is fine (a person may keep exports there).
    top = api.post("/api/vms/origin/export", json={"file": str(data.root / "origin-top.7z")})
    assert top.status_code == 202, top.text
    assert engine.jobs.wait(top.json()["id"], timeout=120)["state"] == "done"

    # -- import --------------------------------------------------------------------------------------
    not_7z = tmp_path / "notes.7z"
    not_7z.write_text("just text, not an archive\n")
    refused(api.post("/api/import", json={"file": str(not_7z)}), 400, None, "not a 7z archive", "nothing was imported")
    foreign = tmp_path / "foreign.7z"
    with py7zr.SevenZipFile(foreign, "w") as archive:
        archive.writestr("hello", "readme.txt")
    refused(api.post("/api/import", json={"file": str(foreign)}), 400, None, "no manifest.json")
    refused(api.post("/api/import", json={"file": str(tmp_path / "missing.7z")}), 400, "file", "not a file")
    refused(api.post("/api/import", json={"file": "relative.7z"}), 400, "file", "full path")
    refused(api.post("/api/import", json={"file": str(target), "name": "bad/name"}), 400, "name")
    refused(api.post("/api/import", json={"file": str(target), "name": ""}), 400, "name")
    refused(api.post("/api/import", json={"file": str(target), "name": "x\n"}), 400, "name")
    assert len(api.get("/api/vms").json()) == 2

    answer = api.post("/api/import", json={"file": str(target), "name": "returned"})
    assert answer.status_code == 202 and answer.json()["kind"] == "vm.import", answer.text
    done = engine.jobs.wait(answer.json()["id"], timeout=120)
    assert done["state"] == "done", done
    assert done["result"]["name"] == "returned" and done["result"]["renamed"] is False
    assert [row["name"] for row in api.get("/api/vms").json()] == ["origin", "origin-linked", "returned"]
    imported = api.get("/api/vms/returned/disks").json()[0]
    assert imported["backing_file"] is None and imported["virtual_size"] == 64 << 20   # flattened
    # The same file again without a name: the exported name is taken, so it is renamed.
    again = engine.jobs.wait(api.post("/api/import", json={"file": str(target)}).json()["id"], timeout=120)
    assert again["state"] == "done" and again["result"]["renamed"] is True, again
    assert again["result"]["name"] != "origin-linked"
    assert [p for p in data.tmp_dir.iterdir() if not p.name.startswith(".")] == []


def test_cancel_a_running_export_leaves_no_file(api: Api, engine: DirectEngine, tmp_path: Path) -> None:
    create(api, "big", disk="256M")
    disk = engine.data.resolve(engine.get("big").disks[0].path)
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(96 << 20))
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(noise), str(disk)], check=True)
    target = tmp_path / "big.7z"
    events = EventReader(api, "?types=job.progress")
    try:
        assert events.next({"ready"})[0] == "ready"
        job = api.post("/api/vms/big/export", json={"file": str(target)}).json()
        cancelled = api.post(f"/api/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        seen = follow(events, job)
    finally:
        events.close()
    assert seen[-1]["state"] == "cancelled", seen[-1]
    assert not target.exists() and not list(tmp_path.glob(".big.7z*"))
    assert [p for p in engine.data.tmp_dir.iterdir() if not p.name.startswith(".")] == []
    # A cancelled job does not hold the VM: the next export runs.
    assert engine.jobs.busy(engine.get("big")) is None


@pytest.mark.qemu
def test_running_vm_live_snapshot_hotplug_and_refusals(api: Api, engine: DirectEngine, make_vm) -> None:
    from disks.conftest import boot, run
    from disks.test_hotplug import wait_for

    make_vm("live")
    assert api.post("/api/vms/live/disks", json={"size": "32M", "bus": "virtio"}).status_code == 201
    boot(engine, "live")
    assert wait_for(engine, "live", "cat /sys/block/vda/size", str((32 << 20) // 512)) == str((32 << 20) // 512)

    # A snapshot of a running VM keeps its memory (live unless told otherwise); an offline one is refused.
    refused(api.post("/api/vms/live/snapshots", json={"name": "cold", "live": False}), 409, None, "stop it")
    taken = api.post("/api/vms/live/snapshots", json={"name": "warm", "description": "booted"})
    assert taken.status_code == 201 and taken.json()["live"] is True, taken.text
    row = api.get("/api/vms/live/snapshots").json()["tree"][0]
    assert (row["name"], row["live"], row["description"]) == ("warm", True, "booted") and row["size"] > 1 << 20

    # Disks are plugged in and out while it runs; SATA cannot be, and converting, checking, cloning and
    # exporting wait until it is stopped.
    refused(api.post("/api/vms/live/disks", json={"size": "8M", "bus": "sata"}), 409, None, "cannot be plugged in")
    plugged = api.post("/api/vms/live/disks", json={"size": "16M", "bus": "virtio"})
    assert plugged.status_code == 201, plugged.text
    assert wait_for(engine, "live", "cat /sys/block/vdb/size 2>/dev/null", str((16 << 20) // 512)) == \
        str((16 << 20) // 512)
    grown = api.post(f"/api/vms/live/disks/{plugged.json()['id']}/resize", json={"size": "24M"})
    assert grown.status_code == 200, grown.text
    assert wait_for(engine, "live", "cat /sys/block/vdb/size", str((24 << 20) // 512)) == str((24 << 20) // 512)
    refused(api.post("/api/vms/live/disks/disk0/convert", json={"format": "raw"}), 409, None, "stop it")
    refused(api.post("/api/vms/live/disks/disk0/check", json={}), 409, None, "stop it")
    refused(api.post("/api/vms/live/clone", json={"name": "live-2"}), 409, None, "stop it")
    refused(api.post("/api/vms/live/export", json={"file": "/tmp/live-export.7z"}), 409, None, "stop it")
    unplugged = api.delete(f"/api/vms/live/disks/{plugged.json()['id']}", params={"delete_file": "true"})
    assert unplugged.status_code == 200 and unplugged.json()["file_deleted"] is True, unplugged.text
    assert wait_for(engine, "live", "ls /sys/block/vdb >/dev/null 2>&1 && echo present || echo gone", "gone") == "gone"

    # Back to the live snapshot: the guest goes on from that moment (its shell still answers).
    run(engine, "live", "touch /tmp/after-snapshot")
    reverted = api.post("/api/vms/live/snapshots/warm/revert")
    assert reverted.status_code == 200 and reverted.json()["live"] is True, reverted.text
    assert run(engine, "live", "ls /tmp/after-snapshot 2>/dev/null || echo absent") == "absent"
    assert engine.stop("live", force=True)["state"] in ("stopped", "crashed")
