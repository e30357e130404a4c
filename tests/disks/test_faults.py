"""Faults: a Thalunix process killed with SIGKILL in the middle of a convert, a clone and an export leaves the
source intact (same hash, same config), no half-made VM listed, no qemu-img still writing, and its temporary
work (under the data folder's tmp/) is swept when the next Thalunix opens the folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from disks.conftest import sha256
from thalunix.engine import CreateOptions, DirectEngine

DRIVER = r"""
import json, sys
from thalunix.engine import DirectEngine
engine = DirectEngine.open(sys.argv[1])
operation = sys.argv[2]
with engine.bus.subscribe(accept=lambda e: e["type"] == "job.progress") as events:
    if operation == "convert":
        job = engine.disk_convert("victim", "disk0", "qcow2")
    elif operation == "clone":
        job = engine.clone("victim", "victim-copy")
    else:
        job = engine.export("victim", sys.argv[3])
    while True:
        event = events.get(timeout=300)
        print(json.dumps(event), flush=True)
        if event is None or event["state"] != "running":
            break
"""


def qemu_img_writing_into(folder: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"qemu-img") and any(str(folder).encode() in a for a in cmdline):
                pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("operation", ["convert", "clone", "export"])
def test_sigkill_mid_operation_leaves_source_intact_and_no_half_made_vm(engine: DirectEngine, data_dir: Path,
                                                                        tmp_path: Path, operation: str) -> None:
    engine.create(CreateOptions(name="victim", ram="128M", cpus=1, firmware="bios", tpm="off", disk="768M",
                                disk_format="raw"))
    config = engine.get("victim")
    disk = engine.data.resolve(config.disks[0].path)
    with open(disk, "r+b") as handle:
        for _ in range(8):   # 512 MiB that does not compress: every operation takes seconds
            handle.write(os.urandom(64 << 20))
    disk_hash = sha256(disk)
    config_bytes = engine.data.vm_path(config.id, "vm.json").read_bytes()
    folders_before = sorted(p.name for p in engine.data.vms_dir.iterdir())
    files_before = sorted(p.name for p in disk.parent.iterdir())
    engine.close()
    target = tmp_path / "victim.7z"

    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(data_dir), operation, str(target)],
                              stdout=subprocess.PIPE, text=True)
    killed_at = None
    try:
        assert driver.stdout is not None
        for line in driver.stdout:
            event = json.loads(line)
            assert event is not None and event["state"] == "running", f"finished before the kill: {event}"
            if 0 < event["percent"] < 90:
                driver.send_signal(signal.SIGKILL)
                killed_at = event
                break
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert killed_at is not None, "no progress was reported before the operation ended"
    assert driver.returncode == -signal.SIGKILL

    # qemu-img dies with the Thalunix that ran it (it must not go on writing into the work folder).
    deadline = time.monotonic() + 10
    while qemu_img_writing_into(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_img_writing_into(data_dir) == []

    left = [p.name for p in (data_dir / "tmp").iterdir() if p.name.startswith("work-")]
    assert left, "the killed process left no work folder: it was not killed mid-operation"
    fresh = DirectEngine.open(data_dir)   # opening sweeps what the killed process left in tmp/
    try:
        assert [row["name"] for row in fresh.list()] == ["victim"]
        assert sorted(p.name for p in fresh.data.vms_dir.iterdir()) == folders_before
        assert fresh.data.vm_path(config.id, "vm.json").read_bytes() == config_bytes
        assert sorted(p.name for p in disk.parent.iterdir()) == files_before
        assert sha256(disk) == disk_hash
        assert [p.name for p in fresh.data.tmp_dir.iterdir() if p.name.startswith("work-")] == []
        assert not target.exists() and not list(tmp_path.glob("*.partial"))
        # The VM is not left locked: the same operation now runs to the end.
        if operation == "clone":
            job = fresh.clone("victim", "victim-copy", wait=True)
            assert job["state"] == "done", job
            assert [row["name"] for row in fresh.list()] == ["victim", "victim-copy"]
        elif operation == "convert":
            job = fresh.disk_convert("victim", "disk0", "qcow2", wait=True)
            assert job["state"] == "done", job
    finally:
        fresh.close()
