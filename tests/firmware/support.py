"""Helpers of the firmware tests: boot a VM to the test guest's shell, run a command there, read the store."""

from __future__ import annotations

import secrets

from thalunix.engine import DirectEngine

READY = b"THALUNIX-GUEST-READY"
PROMPT = b"thalunix-guest:/# "
#: Under TCG with SMM (Secure Boot), OVMF + shim + grub + kernel take ~25 s on an idle 2-core host.
BOOT_TIMEOUT = 300
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


def serial(engine: DirectEngine, name: str) -> bytes:
    return engine.supervisor.serial_output(engine.get(name))


def boot(engine: DirectEngine, name: str, timeout: float = BOOT_TIMEOUT) -> None:
    """Start the VM and wait for the guest's shell prompt on the serial console."""
    status = engine.start(name)
    assert status["state"] == "running", status
    config = engine.get(name)
    assert engine.supervisor.wait_serial(config, READY, timeout), serial(engine, name)[-3000:]
    assert engine.supervisor.wait_serial(config, PROMPT, 60), serial(engine, name)[-3000:]


def guest_run(engine: DirectEngine, name: str, command: str, timeout: float = 60) -> str:
    """Type ``command`` at the guest's shell; what it printed (between two computed markers)."""
    config = engine.get(name)
    tag = f"FW-{secrets.token_hex(4)}"
    # $((...)) keeps the markers out of the echoed command line, however the terminal wraps it.
    engine.supervisor.send_serial(config, f"echo {tag}-$((1+1))B; {command}; echo {tag}-$((40+2))E\n".encode())
    assert engine.supervisor.wait_serial(config, f"{tag}-42E".encode(), timeout), serial(engine, name)[-2000:]
    text = serial(engine, name).decode(errors="replace")
    return text.split(f"{tag}-2B", 1)[1].split(f"{tag}-42E", 1)[0].replace("\r", "")


def mount_efivarfs(engine: DirectEngine, name: str) -> None:
    """The Secure Boot test ISO's initrd carries efivarfs.ko (the test guest's does not)."""
    out = guest_run(engine, name, "insmod /lib/modules/efivarfs.ko; mount -t efivarfs none /sys/firmware/efi/efivars"
                                  " && echo MOUNTED-$((2+3))")
    assert "MOUNTED-5" in out, out


def efi_variable(engine: DirectEngine, name: str, variable: str) -> str:
    """The variable's bytes (attributes first) as hex, or 'absent'."""
    path = f"/sys/firmware/efi/efivars/{variable}"
    return guest_run(engine, name, f"if [ -e {path} ]; then od -An -v -tx1 {path} | tr -d ' \\n'; "
                                   "else echo absent; fi").strip()
