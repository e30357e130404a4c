"""Snapshots with the real guest: a marker file on a virtio ext4 data disk survives offline and live
reverts, and a live revert brings back the guest's memory (a shell variable set before the snapshot).
BIOS and UEFI (where the UEFI variable store, node fw-vars, is part of every snapshot)."""

from __future__ import annotations

import pytest

from disks.conftest import boot, run, shell
from thalunix.engine import DirectEngine

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_offline_and_live_snapshots_bring_back_disk_and_memory(engine: DirectEngine, vm_with_marker,
                                                               firmware: str) -> None:
    name = f"snap-{firmware}"
    vm_with_marker(name, marker="alpha", firmware=firmware)
    boot(engine, name)
    assert run(engine, name, "cat /mnt/data/marker.txt") == "alpha"
    engine.stop(name, force=True)

    # Offline: disks (and UEFI variables) via qemu-img while the VM is stopped.
    offline = engine.snapshot_create(name, "clean", description="marker alpha")
    assert offline["live"] is False
    if firmware == "uefi":
        assert "fw-vars" in offline["images"]

    boot(engine, name)
    shell(engine, name, "echo beta > /mnt/data/marker.txt && sync")
    assert run(engine, name, "cat /mnt/data/marker.txt") == "beta"

    # Live: memory included. A shell variable exists only in the guest's RAM.
    shell(engine, name, "export THALUNIX_COUNTER=41")
    live = engine.snapshot_create(name, "running", description="counter 41, marker beta")
    assert live["live"] is True
    shell(engine, name, "export THALUNIX_COUNTER=99; echo gamma > /mnt/data/marker.txt && sync")
    assert run(engine, name, "echo $THALUNIX_COUNTER:$(cat /mnt/data/marker.txt)") == "99:gamma"
    reverted = engine.snapshot_revert(name, "running")
    assert reverted["live"] is True
    # The guest continues where it was: the variable and the file are as they were at the snapshot.
    assert run(engine, name, "echo $THALUNIX_COUNTER:$(cat /mnt/data/marker.txt)") == "41:beta"
    engine.stop(name, force=True)

    engine.snapshot_revert(name, "clean")
    boot(engine, name)
    assert run(engine, name, "cat /mnt/data/marker.txt") == "alpha"
    engine.stop(name, force=True)

    listing = engine.snapshots(name)
    assert listing["current"] == "clean"
    tree = listing["tree"]
    assert [node["name"] for node in tree] == ["clean"]
    assert [child["name"] for child in tree[0]["children"]] == ["running"]
    running = tree[0]["children"][0]
    assert running["live"] and running["size"] > 0 and running["description"] == "counter 41, marker beta"
    for disk in engine.disks(name):
        report = engine.disk_check(name, disk["id"])
        assert report["clean"], report
