"""A VM's whole life on a real libvirtd through Thalunix: create, start, the guest's serial marker through the
console stream, screenshot, a live snapshot, a change made after it, revert (the change is gone), stop, delete
(its volumes go too). One guest boot."""

from __future__ import annotations

import time

import pytest

from conftest import READY, wait_serial
from thalunix.engine import CreateOptions
from thalunix.errors import ConflictError, NotFoundError
from thalunix.events import EventBus
from thalunix.libvirt.engine import LibvirtEngine
from thalunix.libvirt.hosts import Host, connect

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(420)]


def test_create_start_console_snapshot_revert_stop_delete(local_daemon, guest, bus: EventBus) -> None:
    host = Host("lab", local_daemon.uri)
    engine = LibvirtEngine(host, connect(host), bus)
    try:
        with bus.subscribe(accept=lambda e: e["type"] == "vm.state") as states:
            config = engine.create(CreateOptions(name="lv-guest", iso=str(guest.iso), ram="256M", cpus=1,
                                                 firmware="bios", tpm="off", accel="tcg", disk="16M"))
            assert [row["name"] for row in engine.list()] == ["lv-guest"]
            described = engine.describe("lv-guest")
            assert described["managed"] and described["ram_mib"] == 256 and described["firmware"] == "bios"
            assert "<domain type='qemu'" in described["xml"]
            disk = config.disks[0].path
            assert engine.conn.storageVolLookupByPath(disk).info()[1] == 16 << 20

            started = time.monotonic()
            status = engine.start("lv-guest")
            assert status["state"] == "running" and status["websocket_port"]
            with pytest.raises(ConflictError):
                engine.start("lv-guest")
            wait_serial(lambda: engine.serial_output("lv-guest"), READY)
            boot_seconds = time.monotonic() - started
            event = states.get(timeout=10)
            assert event and event["state"] == "running" and event["host"] == "lab" and event["vm"] == config.id

            png = engine.screenshot("lv-guest")
            assert png.startswith(b"\x89PNG") and len(png) > 1000

            # The console is a two-way libvirt stream: a command typed in is answered.
            engine.send_serial("lv-guest", b"\necho before-$((40+2))\n")
            wait_serial(lambda: engine.serial_output("lv-guest"), b"before-42")

            snapshot = engine.snapshot_create("lv-guest", "booted", description="after boot")
            assert snapshot["live"] and snapshot["current"]
            mark = len(engine.serial_output("lv-guest"))
            engine.send_serial("lv-guest", b"touch /tmp/after-snapshot; echo made-$((1+1))\n")
            wait_serial(lambda: engine.serial_output("lv-guest"), b"made-2", after=mark)

            reverted = engine.snapshot_revert("lv-guest", "booted")
            assert reverted["state"] == "running"
            # The live snapshot brought the guest's memory back: the file made after it is gone.
            mark = len(engine.serial_output("lv-guest"))
            engine.send_serial("lv-guest", b"\nls /tmp/after-snapshot || echo gone-$((3*3))\n")
            wait_serial(lambda: engine.serial_output("lv-guest"), b"gone-9", timeout=60, after=mark)
            assert [s["name"] for s in engine.snapshots("lv-guest")["snapshots"]] == ["booted"]

            stopped = engine.stop("lv-guest", timeout=60)
            assert stopped["state"] == "stopped"
            engine.snapshot_delete("lv-guest", "booted")
            engine.delete("lv-guest")
            with pytest.raises(NotFoundError):
                engine.get("lv-guest")
            with pytest.raises(Exception):
                engine.conn.storageVolLookupByPath(disk)
            assert engine.list() == []
            print(f"boot to marker on libvirt (TCG): {boot_seconds:.1f} s")
    finally:
        for domain in engine.conn.listAllDomains(0):
            if domain.isActive():
                domain.destroy()
            domain.undefineFlags(0)
        engine.close()
