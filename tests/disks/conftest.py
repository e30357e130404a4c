"""Helpers for the disk tests: a real ext4 data disk (label THALUNIXDATA, mounted by the guest at /mnt/data),
talking to the guest over its serial console with unique answers, and file hashes."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
from pathlib import Path

import pytest

from thalunix.engine import DirectEngine

READY = b"THALUNIX-GUEST-READY"
BOOT_TIMEOUT = {"bios": 180, "uefi": 480}
_counter = itertools.count(1000)


def make_data_disk(folder: Path, marker: str, size: str = "16M") -> Path:
    """A raw ext4 image labelled THALUNIXDATA holding marker.txt."""
    content = folder / f"content-{marker}"
    content.mkdir(parents=True)
    (content / "marker.txt").write_text(marker + "\n")
    disk = folder / f"data-{marker}.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "THALUNIXDATA", "-d", str(content), str(disk), size],
                   check=True)
    return disk


def add_data_disk(engine: DirectEngine, name: str, folder: Path, marker: str) -> str:
    """Attach a fresh marker disk and convert it to qcow2 inside the VM's folder (snapshots need qcow2)."""
    row = engine.disk_add(name, path=str(make_data_disk(folder, marker)))
    job = engine.disk_convert(name, row["id"], "qcow2", wait=True)
    assert job["state"] == "done", job
    return row["id"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def boot(engine: DirectEngine, name: str) -> None:
    status = engine.start(name)
    assert status["state"] == "running", status
    config = engine.get(name)
    timeout = BOOT_TIMEOUT["bios" if config.firmware == "bios" else "uefi"]
    assert engine.supervisor.wait_serial(config, READY, timeout), \
        engine.supervisor.serial_output(config)[-2000:]


def run(engine: DirectEngine, name: str, command: str, timeout: float = 60) -> str:
    """Run ``command`` in the guest shell; return what it printed (one line, stripped).

    The answer is framed by a number computed in the guest, so the echoed command line never matches.
    """
    config = engine.get(name)
    number = next(_counter)
    start = f"B{number}"
    engine.supervisor.send_serial(config, f"echo \"{start[0]}$(({number}+0))<$({command})>E$(({number}+1))\"\n".encode())
    end = f"E{number + 1}".encode()
    assert engine.supervisor.wait_serial(config, end, timeout), engine.supervisor.serial_output(config)[-1500:]
    text = engine.supervisor.serial_output(config).decode("utf-8", "replace")
    begin = text.rindex(f"B{number}<")
    return text[begin + len(f"B{number}<"): text.rindex(f">E{number + 1}")].strip()


def shell(engine: DirectEngine, name: str, command: str, timeout: float = 60) -> None:
    """Run a command in the guest's own shell (so ``export`` sticks) and wait until it has finished."""
    config = engine.get(name)
    number = next(_counter)
    engine.supervisor.send_serial(config, f"{command}; echo \"D$(({number}+0))\"\n".encode())
    assert engine.supervisor.wait_serial(config, f"D{number}".encode(), timeout), \
        engine.supervisor.serial_output(config)[-1500:]


@pytest.fixture
def vm_with_marker(engine: DirectEngine, make_vm, tmp_path: Path):
    """A stopped VM (BIOS unless told) with a qcow2 data disk holding marker.txt = ``marker``."""
    def make(name: str, marker: str = "alpha", **overrides):
        make_vm(name, **overrides)
        disk_id = add_data_disk(engine, name, tmp_path / name, marker)
        return engine.get(name), disk_id
    return make
