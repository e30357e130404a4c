"""A real guest under real QEMU, driven through the engine: boot marker, console, pause/resume, stops, re-attach."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thalunix.engine import DirectEngine
from thalunix.errors import ConflictError, LockedError, StartError
from thalunix.qemu import process

pytestmark = pytest.mark.qemu
READY = b"THALUNIX-GUEST-READY"
POWEROFF = b"THALUNIX-GUEST-POWEROFF"
BOOT_TIMEOUT = 120


def serial_text(engine: DirectEngine, name: str) -> bytes:
    return engine.supervisor.serial_output(engine.get(name))


def boot(engine: DirectEngine, name: str) -> None:
    status = engine.start(name)
    assert status["state"] == "running", status
    assert status["accel"] == "tcg"   # this host's KVM must have been rejected by the self-test
    assert engine.supervisor.wait_serial(engine.get(name), READY, BOOT_TIMEOUT), serial_text(engine, name)[-2000:]


def test_bios_guest_full_lifecycle(engine: DirectEngine, make_vm) -> None:
    make_vm("life")
    boot(engine, "life")
    config = engine.get("life")

    # The console is interactive: a command typed on the serial line is answered.
    engine.supervisor.send_serial(config, b"echo $((6*7))xyz\n")
    assert engine.supervisor.wait_serial(config, b"42xyz", 30)

    engine.pause("life")
    assert engine.supervisor.wait_state(config, {"paused"}, 10) == "paused"
    assert engine.status("life")["state"] == "paused"
    engine.resume("life")
    assert engine.supervisor.wait_state(config, {"running"}, 10) == "running"

    started = time.monotonic()
    status = engine.stop("life", timeout=60)
    assert status["state"] == "stopped"
    assert time.monotonic() - started < 60, "the guest ignored the ACPI power button"
    assert POWEROFF in serial_text(engine, "life")
    assert status["last_exit"]["state"] == "stopped"
    # The logs carry the story with timestamps.
    events = (engine.data.vm_path(config.id, "logs", "events.log")).read_text()
    assert "pressing the ACPI power button" in events and "SHUTDOWN" in events
    assert READY in (engine.data.vm_path(config.id, "logs", "serial.log")).read_bytes()


def test_uefi_guest_boots_and_keeps_its_variables(engine: DirectEngine, make_vm) -> None:
    make_vm("uefi", firmware="uefi")
    boot(engine, "uefi")
    vars_file = engine.data.vm_path(engine.get("uefi").id, "firmware", "vars.qcow2")
    assert vars_file.is_file()
    assert engine.stop("uefi", force=True)["state"] == "stopped"


def test_force_stop_and_external_kill_is_a_crash(engine: DirectEngine, make_vm) -> None:
    make_vm("force")
    boot(engine, "force")
    assert engine.stop("force", force=True)["state"] == "stopped"
    assert engine.status("force")["state"] == "stopped"

    status = engine.start("force")
    config = engine.get("force")
    os.kill(status["pid"], signal.SIGKILL)   # QEMU dies behind our back
    assert engine.supervisor.wait_state(config, {"crashed"}, 30) == "crashed"
    assert engine.status("force")["state"] == "crashed"
    # A crashed VM can be started again.
    assert engine.start("force")["state"] == "running"
    engine.stop("force", force=True)


def test_start_twice_is_refused(engine: DirectEngine, make_vm) -> None:
    make_vm("twice")
    engine.start("twice")
    with pytest.raises(ConflictError, match="already running"):
        engine.start("twice")
    engine.stop("twice", force=True)


DRIVER = """
import sys, time
from thalunix.engine import DirectEngine
engine = DirectEngine.open(sys.argv[1])
engine.start(sys.argv[2])
assert engine.supervisor.wait_serial(engine.get(sys.argv[2]), b"THALUNIX-GUEST-READY", 120)
print("booted", flush=True)
time.sleep(600)
"""


def test_reattach_after_manager_is_killed(data_dir: Path, make_vm, engine: DirectEngine) -> None:
    make_vm("survivor")
    engine.close()
    # Another Thalunix process starts the VM, then dies with SIGKILL while the VM runs.
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(data_dir), "survivor"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        assert driver.stdout.readline().strip() == "booted"
        # While that process lives it owns the VM: we see it running but may not drive it.
        assert engine.status("survivor")["state"] == "running"
        assert engine.status("survivor")["attached"] is False
        with pytest.raises(LockedError, match="another Thalunix process"):
            engine.stop("survivor")
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
    pid = json.loads(engine.data.vm_path(engine.get("survivor").id, "run", "state.json").read_text())["pid"]
    assert process.is_alive(pid), "QEMU must outlive the manager that started it"

    fresh = DirectEngine.open(data_dir)
    try:
        assert fresh.attach_running() == ["survivor"]
        config = fresh.get("survivor")
        assert fresh.status("survivor")["state"] == "running"
        fresh.supervisor.send_serial(config, b"echo re$((1+1))attached\n")
        assert fresh.supervisor.wait_serial(config, b"re2attached", 30)
        assert fresh.stop("survivor", timeout=60)["state"] == "stopped"
        assert not process.is_alive(pid)
    finally:
        fresh.close()


def test_qemu_exiting_at_start_shows_its_message(engine: DirectEngine, make_vm, tmp_path: Path) -> None:
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + b"\x00" * 60)   # a qcow2 header QEMU refuses
    make_vm("broken", disk=str(broken))
    before = engine.data.vm_path(engine.get("broken").id, "vm.json").read_bytes()
    with pytest.raises(StartError) as caught:
        engine.start("broken")
    message = str(caught.value)
    assert "VM 'broken' did not start" in message and "qcow2" in message.lower(), message
    assert engine.status("broken")["state"] == "stopped"
    assert engine.data.vm_path(engine.get("broken").id, "vm.json").read_bytes() == before


def test_missing_qemu_is_reported(engine: DirectEngine, make_vm, monkeypatch, tmp_path: Path) -> None:
    make_vm("noqemu")
    monkeypatch.setenv("PATH", str(tmp_path))
    from thalunix.errors import RuntimeMissingError
    with pytest.raises(RuntimeMissingError, match="qemu-system-x86_64.*not found"):
        engine.start("noqemu")
    assert engine.status("noqemu")["state"] == "stopped"


def test_accelerator_that_fails_a_real_guest_falls_back(engine: DirectEngine, make_vm) -> None:
    """This host's KVM fails guests; make the ladder believe its self-test passed and watch auto recover."""
    from thalunix import accel
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm on this host")
    runtime = engine.runtime()
    if "kvm" not in runtime.caps.accels:
        pytest.skip("this QEMU has no KVM")
    accel.VerdictCache(engine.data.cache_dir, runtime.qemu).put(
        accel.AccelVerdict("kvm", True, "pretend the self-test passed"))
    make_vm("fallback")
    status = engine.start("fallback")
    assert status["accel"] == "tcg"
    config = engine.get("fallback")
    assert engine.supervisor.wait_serial(config, READY, BOOT_TIMEOUT)
    events = engine.data.vm_path(config.id, "logs", "events.log").read_text()
    assert "with accelerator kvm" in events and "accelerator kvm failed" in events and "trying tcg" in events
    # The failure is remembered: the next choice skips KVM without trying it again.
    choice = runtime.accelerator("auto", engine.data.cache_dir)
    assert choice.chosen == "tcg" and "kvm" not in choice.ladder
    engine.stop("fallback", force=True)


def test_detach_then_reattach_in_the_same_process(engine: DirectEngine, make_vm) -> None:
    """The first session's waiter must not report the exit once another session speaks for the VM."""
    make_vm("again")
    boot(engine, "again")
    engine.close()                      # detach: the VM keeps running
    assert engine.attach_running() == ["again"]
    config = engine.get("again")
    assert engine.stop("again", timeout=60)["state"] == "stopped"
    time.sleep(0.5)                     # give a stray waiter the chance to overwrite the outcome
    assert engine.status("again")["state"] == "stopped"
    last = json.loads(engine.data.vm_path(config.id, "run", "last-exit.json").read_text())
    assert last["state"] == "stopped"
