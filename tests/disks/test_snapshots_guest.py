"""Snapshots with the real guest: a marker file on a virtio ext4 data disk survives offline and live
reverts, and a live revert brings back the guest's memory (a shell variable set before the snapshot).
BIOS and UEFI (where the UEFI variable store, node fw-vars, is part of every snapshot)."""

from __future__ import annotations

import shutil

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


# TPM2_PCR_Extend of PCR 16 (the debug PCR) with a SHA-256 digest of 0x11 bytes, password session: 65 bytes.
PCR_EXTEND = ("printf '\\x80\\x02\\x00\\x00\\x00\\x41\\x00\\x00\\x01\\x82\\x00\\x00\\x00\\x10\\x00\\x00\\x00\\x09"
              "\\x40\\x00\\x00\\x09\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x01\\x00\\x0b" + "\\x11" * 32 +
              "' > /tmp/extend.bin")
SEND_EXTEND = ("exec 3<>/dev/tpm0; cat /tmp/extend.bin >&3; dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 "
               "| tr -d ' \\n' > /tmp/response; exec 3>&-")


@pytest.mark.skipif(not shutil.which("swtpm"), reason="swtpm is not installed")
def test_live_revert_brings_back_the_tpm_state(engine: DirectEngine, make_vm) -> None:
    """QEMU's TPM emulator carries swtpm's state in the memory state: a PCR extended after the snapshot is
    back to its value at the snapshot after a live revert."""
    make_vm("tpm-live", tpm="native", disk="32M")
    boot(engine, "tpm-live")
    shell(engine, "tpm-live", PCR_EXTEND)
    shell(engine, "tpm-live", SEND_EXTEND)
    assert run(engine, "tpm-live", "cat /tmp/response") == "80020000001300000000000000000000010000"
    at_snapshot = run(engine, "tpm-live", "cat /sys/class/tpm/tpm0/pcr-sha256/16")
    assert at_snapshot.strip("0")   # extended once: no longer all zeros
    engine.snapshot_create("tpm-live", "one-extend", live=True)
    shell(engine, "tpm-live", SEND_EXTEND)
    assert run(engine, "tpm-live", "cat /sys/class/tpm/tpm0/pcr-sha256/16") != at_snapshot
    engine.snapshot_revert("tpm-live", "one-extend")
    assert run(engine, "tpm-live", "cat /sys/class/tpm/tpm0/pcr-sha256/16") == at_snapshot
    engine.stop("tpm-live", force=True)
