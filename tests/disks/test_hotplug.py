"""Disks attached and detached while the real guest runs (QMP blockdev-add/device_add, device_del + DEVICE_DELETED,
blockdev-del), grown while running (block_resize), and persisted in the config; on q35 (spare PCIe root ports)
and on pc (ACPI hot-plug on pci.0)."""

from __future__ import annotations

import pytest

from disks.conftest import boot, run
from thalunix.engine import DirectEngine
from thalunix.errors import ConflictError

pytestmark = pytest.mark.qemu


def wait_for(engine: DirectEngine, name: str, command: str, expected: str, timeout: float = 60) -> str:
    """Ask the guest until it answers ``expected`` (the kernel sees a hot-plugged device a moment later)."""
    import time
    deadline = time.monotonic() + timeout
    answer = ""
    while time.monotonic() < deadline:
        answer = run(engine, name, command)
        if answer == expected:
            return answer
        time.sleep(0.5)
    return answer


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_attach_grow_detach_while_running(engine: DirectEngine, make_vm, machine: str) -> None:
    name = f"hot-{machine}"
    make_vm(name, machine=machine)
    boot(engine, name)
    with pytest.raises(ConflictError, match="SATA disks cannot be plugged in while it runs"):
        engine.disk_add(name, size="16M", bus="sata")

    added = engine.disk_add(name, size="32M", bus="virtio")
    assert added["id"] == "disk0"
    assert [d.id for d in engine.get(name).disks] == ["disk0"]          # persisted
    sectors = str((32 << 20) // 512)
    assert wait_for(engine, name, "cat /sys/block/vda/size 2>/dev/null", sectors) == sectors

    engine.disk_resize(name, "disk0", "48M")                            # grown while running
    grown = str((48 << 20) // 512)
    assert wait_for(engine, name, "cat /sys/block/vda/size 2>/dev/null", grown) == grown
    with pytest.raises(ConflictError, match="only be shrunk while the VM is stopped"):
        engine.disk_resize(name, "disk0", "16M", force_shrink=True)

    nvme = engine.disk_add(name, size="16M", bus="nvme")
    assert wait_for(engine, name, "ls /sys/block | grep -c nvme", "1") == "1"

    engine.disk_remove(name, "disk0", delete_file=True)
    assert wait_for(engine, name, "ls /sys/block/vda >/dev/null 2>&1 && echo present || echo gone", "gone") == "gone"
    engine.disk_remove(name, nvme["id"])
    assert wait_for(engine, name, "ls /sys/block | grep -c nvme", "0") == "0"
    assert engine.get(name).disks == []
    # The QEMU side is clean too: the nodes are gone, so the same ids can be plugged again.
    nodes = {n.get("node-name") for n in engine.supervisor.qmp(engine.get(name), "query-named-block-nodes")}
    assert "disk0" not in nodes and nvme["id"] not in nodes
    again = engine.disk_add(name, size="8M", bus="virtio")
    assert again["id"] == "disk0"
    assert wait_for(engine, name, "cat /sys/block/vda/size 2>/dev/null", str((8 << 20) // 512))
    engine.stop(name, force=True)
    # After a restart the disk is there from the start, from the config.
    boot(engine, name)
    assert run(engine, name, "cat /sys/block/vda/size") == str((8 << 20) // 512)
    engine.stop(name, force=True)
