"""Helpers of the TPM tests: leak checks and typing at the real guest's shell."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from thalunix.engine import DirectEngine

READY = b"THALUNIX-GUEST-READY"
PROMPT = b"thalunix-guest:/# "


def owned_processes(data_dir: Path) -> list[str]:
    """Processes (other than us) that belong to this data folder: by argv or by working folder."""
    found = []
    root = str(data_dir.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (root in argv or cwd.startswith(root)):
            found.append(f"{entry.name}: {argv[:160]}")
    return found


def wait_no_processes(data_dir: Path, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = owned_processes(data_dir)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def guest_run(engine: DirectEngine, name: str, command: str, marker: str, timeout: float = 60) -> str:
    """Type ``command`` at the guest's shell and return what it printed (between two computed markers)."""
    config = engine.get(name)
    supervisor = engine.supervisor
    tag = f"{marker}-{secrets.token_hex(4)}"   # the console keeps earlier runs' output
    # $((...)) keeps the markers out of the echoed command line, however the terminal wraps it.
    supervisor.send_serial(config, f"echo {tag}-$((1+1))B; {command}; echo {tag}-$((40+2))E\n".encode())
    assert supervisor.wait_serial(config, f"{tag}-42E".encode(), timeout), supervisor.serial_output(config)[-1500:]
    text = supervisor.serial_output(config).decode(errors="replace")
    return text.split(f"{tag}-2B", 1)[1].split(f"{tag}-42E", 1)[0]


def boot_to_prompt(engine: DirectEngine, name: str, timeout: float = 240) -> None:
    config = engine.get(name)
    assert engine.supervisor.wait_serial(config, READY, timeout), engine.supervisor.serial_output(config)[-2000:]
    assert engine.supervisor.wait_serial(config, PROMPT, 60)


def pcr0(engine: DirectEngine, name: str) -> tuple[str, str]:
    """(listing of /sys/class/tpm, PCR 0 in SHA-256) as the guest sees them."""
    listing = guest_run(engine, name, "ls /sys/class/tpm", "LS-END").strip()
    value = guest_run(engine, name, "cat /sys/class/tpm/tpm0/pcr-sha256/0", "PCR-END").strip()
    return listing, value


def wait_serial_after(engine: DirectEngine, name: str, needle: bytes, offset: int, timeout: float) -> bool:
    """Like ``wait_serial``, but only output after ``offset`` counts (the console keeps earlier boots)."""
    config = engine.get(name)
    supervisor = engine.supervisor
    deadline = time.monotonic() + timeout
    with engine.bus.subscribe(accept=lambda e: e.get("vm") == config.id) as events:
        while time.monotonic() < deadline:
            if needle in supervisor.serial_output(config)[offset:]:
                return True
            events.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
    return needle in supervisor.serial_output(config)[offset:]
