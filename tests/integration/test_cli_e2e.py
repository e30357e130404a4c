"""The CLI end to end, each command its own process, as a user or a script would run it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu


def thalunix(data: Path, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thalunix", "--data-dir", str(data), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def wait_for_file_text(path: Path, needle: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_bytes():
            return True
        time.sleep(0.2)
    return False


def test_cli_create_start_console_stop(tmp_path: Path, guest) -> None:
    data = tmp_path / "data"
    done = thalunix(data, "vm", "create", "cli", "--iso", str(guest.iso), "--ram", "256M", "--cpus", "1",
                    "--firmware", "bios", "--tpm", "off")
    assert done.returncode == 0, done.stderr
    try:
        done = thalunix(data, "vm", "start", "cli")
        assert done.returncode == 0, done.stderr
        assert "is running (accelerator tcg" in done.stdout
        shown = json.loads(thalunix(data, "vm", "show", "cli", "--json").stdout)
        assert shown["state"] == "running" and shown["status"]["pid"] > 0
        serial_log = data / "vms" / shown["id"] / "logs" / "serial.log"
        # QEMU itself keeps the serial log, so nothing is lost while no Thalunix is attached.
        assert wait_for_file_text(serial_log, b"THALUNIX-GUEST-READY", 120)

        console = thalunix(data, "vm", "console", "cli", stdin="echo $((6*7))abc\n")
        assert console.returncode == 0, console.stderr
        assert "42abc" in console.stdout

        assert thalunix(data, "vm", "pause", "cli").stdout.strip() == "VM 'cli' is paused"
        assert json.loads(thalunix(data, "vm", "show", "cli", "--json").stdout)["state"] == "paused"
        assert thalunix(data, "vm", "resume", "cli").stdout.strip() == "VM 'cli' is running"

        done = thalunix(data, "vm", "delete", "cli", "--yes")
        assert done.returncode == 1 and "is running; stop it before deleting it" in done.stderr

        done = thalunix(data, "vm", "stop", "cli")
        assert done.returncode == 0 and done.stdout.strip() == "VM 'cli' is stopped", done.stderr
        assert b"THALUNIX-GUEST-POWEROFF" in serial_log.read_bytes()
        log = thalunix(data, "vm", "log", "cli").stdout
        assert "pressing the ACPI power button" in log and "=== thalunix: start" in log
    finally:
        thalunix(data, "vm", "stop", "cli", "--force")
