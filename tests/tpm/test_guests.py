"""Real UEFI guests with a TPM through each backend: /sys/class/tpm/tpm0 exists and PCR 0 is measured."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thalunix.engine import DirectEngine
from thalunix.runtime import Capabilities
from thalunix.tpm import TpmUnavailableError
from tpm.support import (boot_to_prompt, guest_run, owned_processes, pcr0, wait_no_processes,
                         wait_serial_after)

pytestmark = pytest.mark.qemu


def assert_measured(listing: str, value: str) -> None:
    assert "tpm0" in listing.split(), listing
    assert re.fullmatch(r"[0-9A-F]{64}", value), value
    assert set(value) != {"0"}, "PCR 0 is all zero: the firmware measured nothing into this TPM"


def test_native_swtpm_uefi_guest(engine: DirectEngine, make_vm, data_dir: Path) -> None:
    make_vm("native", firmware="uefi", tpm="native")
    config = engine.get("native")
    engine.start("native")
    events = engine.data.vm_path(config.id, "logs", "events.log").read_text()
    assert "TPM: native swtpm pid" in events
    assert "-tpmdev" in engine.supervisor.sessions[config.id].record.argv
    in_use = engine.status("native")["tpm"]
    assert in_use["backend"] == "native" and in_use["detail"].startswith("native swtpm, pid ")
    boot_to_prompt(engine, "native")
    assert_measured(*pcr0(engine, "native"))
    stopped = engine.stop("native", force=True)
    assert stopped["state"] == "stopped" and stopped["tpm"] is None
    assert engine.supervisor.tpm.wait_released(config)
    assert wait_no_processes(data_dir) == []
    # The TPM's state stays in the VM's folder for the next start.
    assert list(engine.data.vm_path(config.id, "tpm").glob("tpm2-00.permall"))


def test_helper_vm_uefi_guest_started_by_the_cli(engine: DirectEngine, make_vm, data_dir: Path,
                                                 helper_image: Path) -> None:
    """`thalunix vm start` returns and exits at once: the VM's TPM must go on without that process."""
    make_vm("helped", firmware="uefi", tpm="helper")
    config = engine.get("helped")
    done = subprocess.run([sys.executable, "-m", "thalunix", "--data-dir", str(data_dir), "vm", "start", "helped"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    events = engine.data.vm_path(config.id, "logs", "events.log").read_text()
    # The helper's console went to the VM's log (the console panel) while the CLI ran.
    assert "tpm-helper: THALUNIX-HELPER: starting swtpm" in events
    assert re.search(r"TPM: helper VM on 127\.0\.0\.1:\d+ \(control \d+\), ready in", events)

    with engine.bus.subscribe(accept=lambda e: e["type"] == "vm.log" and e.get("vm") == config.id) as logs:
        assert engine.status("helped")["state"] == "running"     # attaches to the VM the CLI left running
        boot_to_prompt(engine, "helped")
        assert_measured(*pcr0(engine, "helped"))
        assert engine.stop("helped", force=True)["state"] == "stopped"
        assert engine.supervisor.tpm.wait_released(config)
        assert wait_no_processes(data_dir) == []
        lines = []
        while (event := logs.get(timeout=0.2)) is not None:
            lines.append(event["line"])
    assert "helper-state.img" in " ".join(p.name for p in engine.data.vm_path(config.id, "tpm").iterdir())
    assert "powering off" in engine.data.vm_path(config.id, "logs", "tpm-helper.log").read_text()
    assert not engine.data.vm_path(config.id, "run", "tpm.json").exists()


def test_helper_vm_events_reach_the_bus(engine: DirectEngine, make_vm, data_dir: Path, helper_image: Path) -> None:
    make_vm("bus", tpm="helper")
    config = engine.get("bus")
    with engine.bus.subscribe(accept=lambda e: e["type"] == "vm.log" and e.get("vm") == config.id) as logs:
        engine.start("bus")
        lines = []
        while (event := logs.get(timeout=0.5)) is not None:
            lines.append(event["line"])
    assert any("tpm-helper: THALUNIX-HELPER: starting swtpm" in line for line in lines), lines
    assert any("tpm-helper: QEMU connected to the TPM control socket" in line for line in lines), lines
    engine.stop("bus", force=True)
    assert engine.supervisor.tpm.wait_released(config)
    assert wait_no_processes(data_dir) == []


def _without_emulation(engine: DirectEngine) -> None:
    """This QEMU as a Windows build sees it: `-tpmdev` is not an option there."""
    runtime = engine.runtime()
    caps = Capabilities(**{**dataclasses.asdict(runtime.caps), "tpm_backends": [],
                           "notes": {"tpm": "this QEMU build has no TPM emulation (QEMU builds for Windows never have it)"}})
    engine._runtime = dataclasses.replace(runtime, caps=caps)


def test_host_without_tpm_emulation(engine: DirectEngine, make_vm, data_dir: Path) -> None:
    _without_emulation(engine)
    make_vm("plain", tpm="auto")
    config = engine.get("plain")
    engine.start("plain")
    argv = engine.supervisor.sessions[config.id].record.argv
    assert "-tpmdev" not in argv
    events = engine.data.vm_path(config.id, "logs", "events.log").read_text()
    assert "TPM: no TPM: this QEMU build has no TPM emulation" in events
    engine.stop("plain", force=True)

    for mode in ("on", "native", "helper"):
        engine.edit("plain", {"tpm": mode})
        with pytest.raises(TpmUnavailableError, match=f"TPM is '{mode}' but this QEMU build has no TPM emulation"):
            engine.start("plain")
        assert engine.status("plain")["state"] == "stopped"
    assert wait_no_processes(data_dir) == []


def test_helper_tpm_across_a_guest_reset(engine: DirectEngine, make_vm, data_dir: Path, helper_image: Path) -> None:
    """A reset re-initialises the TPM through the bridge (STOP, INIT mid-session); firmware measures again."""
    make_vm("reset", firmware="uefi", tpm="helper")
    config = engine.get("reset")
    engine.start("reset")
    boot_to_prompt(engine, "reset")
    extended = guest_run(engine, "reset", "cat /sys/class/tpm/tpm0/pcr-sha256/0", "BEFORE").strip()
    offset = len(engine.supervisor.serial_output(config))
    engine.reset("reset")
    assert wait_serial_after(engine, "reset", b"THALUNIX-GUEST-READY", offset, 240)
    assert wait_serial_after(engine, "reset", b"thalunix-guest:/# ", offset, 60)
    listing, after = pcr0(engine, "reset")
    assert_measured(listing, after)
    assert after == extended, "the same firmware must measure the same PCR 0 after a reset"
    engine.stop("reset", force=True)
    assert engine.supervisor.tpm.wait_released(config)
    assert wait_no_processes(data_dir) == []


def test_helper_killed_under_a_running_vm(engine: DirectEngine, make_vm, data_dir: Path, helper_image: Path) -> None:
    """The helper dies (SIGKILL): its host says so in the VM's log and leaves; the VM itself keeps running."""
    make_vm("orphan", tpm="helper")
    config = engine.get("orphan")
    engine.start("orphan")
    lease = engine.supervisor.tpm.lease(config)
    assert lease is not None and lease.backend == "helper"
    with engine.bus.subscribe(accept=lambda e: e["type"] == "vm.log" and e.get("vm") == config.id) as logs:
        os.kill(lease.info["helper_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        lines: list[str] = []
        while time.monotonic() < deadline and not any("ended (" in line for line in lines):
            event = logs.get(timeout=1)
            if event:
                lines.append(event["line"])
    assert any("the TPM helper VM stopped unexpectedly" in line for line in lines), lines
    assert wait_no_processes_but_qemu(data_dir, engine, config) == []
    assert engine.status("orphan")["state"] == "running"
    engine.stop("orphan", force=True)
    assert engine.supervisor.tpm.wait_released(config)
    assert wait_no_processes(data_dir) == []


def wait_no_processes_but_qemu(data_dir: Path, engine: DirectEngine, config) -> list[str]:
    qemu_pid = str(engine.status(config.name)["pid"])
    deadline = time.monotonic() + 30
    while True:
        left = [line for line in owned_processes(data_dir) if not line.startswith(qemu_pid + ":")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
