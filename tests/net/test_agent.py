"""The guest agent on a real guest with Debian's qemu-guest-agent (tests/guest/build_agent.py): OS and IP
addresses, a 10 MB file copied in and out with the same SHA-256, the clock re-synced after resume, shutdown
through the agent; USB hot-plug seen by the guest kernel (the agent guest has Debian's generic kernel with USB)."""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from pathlib import Path

import pytest

from thalunix.engine import CreateOptions, DirectEngine

from .conftest import boot, nat_up, run


@pytest.fixture(scope="session")
def agent_guest():
    from guest.build_agent import ensure_agent_guest
    return ensure_agent_guest()


@pytest.fixture
def agent_vm(engine: DirectEngine, agent_guest):
    def make(name: str = "agent") -> str:
        engine.create(CreateOptions(name=name, iso=str(agent_guest.iso), ram="384M", cpus=1, firmware="bios",
                                    tpm="off"))
        boot(engine, name)
        config = engine.get(name)
        session = engine.supervisor.sessions[config.id]
        deadline = time.monotonic() + 60
        while not session.agent_open and time.monotonic() < deadline:   # VSERPORT_CHANGE: qemu-ga opened it
            time.sleep(0.2)
        assert session.agent_open, run(engine, name, "cat /run/qemu-ga.log; ls /sys/class/virtio-ports")
        return name
    return make


def test_agent_info_copy_in_out_time_and_shutdown(engine: DirectEngine, agent_vm, tmp_path: Path) -> None:
    name = agent_vm()
    nat_up(engine, name)
    info = engine.agent_info(name)
    assert info["os"]["id"] == "thalunix" and "Thalunix test guest" in info["os"]["pretty-name"]
    assert "10.0.2.15" in info["ips"], info
    eth0 = next(i for i in info["interfaces"] if i["name"] == "eth0")
    assert eth0["mac"] == engine.get(name).nics[0].mac

    source = tmp_path / "ten.bin"
    source.write_bytes(os.urandom(10 * 1024 * 1024))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    events: list[float] = []
    with engine.bus.subscribe(accept=lambda e: e["type"] == "job.progress") as sub:
        job = engine.copy_in(name, str(source), "/tmp/ten.bin", wait=True)
        while (event := sub.get(timeout=0)) is not None:
            events.append(event["percent"])
    assert job["state"] == "done", job
    result = job["result"]
    assert result["sha256"] == digest and result["guest_sha256"] == digest and result["verified"], result
    assert run(engine, name, "sha256sum /tmp/ten.bin | cut -d' ' -f1") == digest
    assert len(events) >= 5 and max(events) == 100.0
    job = engine.copy_out(name, "/tmp/ten.bin", str(tmp_path / "back.bin"), wait=True)
    assert job["state"] == "done", job
    assert job["result"]["verified"] and hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == digest
    print(f"copy-in {result['seconds']} s, copy-out {job['result']['seconds']} s for 10 MiB")

    # The clock: set wrong in the guest, re-synced by the agent when the VM resumes.
    run(engine, name, "date -s '2001-02-03 04:05:06' >/dev/null; date +%Y")
    engine.pause(name)
    engine.resume(name)
    deadline = time.monotonic() + 60
    year = ""
    while time.monotonic() < deadline:
        year = run(engine, name, "date -u +%Y")
        if year != "2001":
            break
        time.sleep(1)
    assert year == str(datetime.datetime.now(datetime.timezone.utc).year)
    assert "guest clock re-synced" in engine.read_log(name)

    started = time.monotonic()
    status = engine.stop(name, timeout=120)
    assert status["state"] == "stopped"
    assert "asked the guest agent to shut the guest down" in engine.read_log(name)
    assert "pressing the ACPI power button" not in engine.read_log(name)
    assert b"THALUNIX-GUEST-POWEROFF" in engine.serial_output(name)
    print(f"agent shutdown took {time.monotonic() - started:.1f} s")


def test_usb_hotplug_seen_by_the_guest_kernel(engine: DirectEngine, agent_vm) -> None:
    name = agent_vm("usb")
    products = run(engine, name, "cat /sys/bus/usb/devices/*/product 2>/dev/null | tr '\\n' ','")
    assert "QEMU USB Keyboard" not in products
    result = engine.usb_attach(name, "usb-kbd")
    assert result["id"] == "usb-kbd"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        products = run(engine, name, "cat /sys/bus/usb/devices/*/product 2>/dev/null | tr '\\n' ','")
        if "QEMU USB Keyboard" in products:
            break
        time.sleep(1)
    assert "QEMU USB Keyboard" in products, products
    assert "QEMU USB Keyboard" in run(engine, name, "dmesg | grep -o 'QEMU USB Keyboard' | tail -1")
    assert any(row.get("qemu_id") == "usb-kbd" for row in engine.usb_devices(name))
    engine.usb_detach(name, "usb-kbd")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        products = run(engine, name, "cat /sys/bus/usb/devices/*/product 2>/dev/null | tr '\\n' ','")
        if "QEMU USB Keyboard" not in products:
            break
        time.sleep(1)
    assert "QEMU USB Keyboard" not in products and "QEMU USB Tablet" in products, products
    engine.stop(name, force=True)
