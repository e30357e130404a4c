"""Secure Boot for real, and UEFI variables that persist: real QEMU under TCG, Debian's OVMF.

* Debian's signed chain (shim signed by Microsoft → grub → kernel, signed by Debian) boots under
  ``uefi-secure`` (OVMF's Secure Boot build, variables with Microsoft's keys, SMM on, q35) and the
  guest's kernel says Secure Boot is enabled; the firmware's own ``SecureBoot`` variable is 1.
* The test guest's own grub-mkrescue ISO (unsigned grub) is refused by the firmware: OVMF's boot
  manager reports "Access Denied" for the DVD and the guest never comes up.
* A variable written from the guest (efivarfs) is there after a shutdown and a new start, and gone
  after "reset firmware settings" (which is refused while the VM runs).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from firmware.support import EFI_GLOBAL, READY, boot, efi_variable, guest_run, mount_efivarfs, serial
from thalunix.engine import DirectEngine
from thalunix.errors import ConflictError

pytestmark = pytest.mark.qemu
VARIABLE = "ThalunixTest-4a3f3e1c-5d1e-4c7b-9a1b-7468616c756e"
VALUE_HEX = "07000000" + b"hello".hex()   # attributes NV|BS|RT, then the data


def qemu_argv(engine: DirectEngine, name: str) -> str:
    log = engine.read_log(name, "qemu")
    return [line for line in log.splitlines() if line.startswith("=== argv: ")][-1]


def vars_format(engine: DirectEngine, name: str) -> str:
    store = engine.data.vm_path(engine.get(name).id, "firmware", "vars.qcow2")
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(store)], capture_output=True, text=True,
                         check=True).stdout
    return re.search(r'"format": "([^"]+)"', out).group(1)


@pytest.mark.timeout(1500)
def test_signed_chain_boots_with_secure_boot_and_variables_persist_until_reset(
        engine: DirectEngine, make_vm, secureboot_iso) -> None:
    make_vm("sb", iso=str(secureboot_iso), firmware="uefi-secure", ram="512M")

    # Boot 1: through shim, grub and the kernel, all checked by the firmware or by shim.
    boot(engine, "sb")
    text = serial(engine, "sb")
    assert b"EFI stub: UEFI Secure Boot is enabled" in text
    assert b"secureboot: Secure boot enabled" in text
    argv = qemu_argv(engine, "sb")
    assert "smm=on" in argv and "pflash0=fw-code,pflash1=fw-vars" in argv
    assert "driver=cfi.pflash01,property=secure,value=on" in argv and "OVMF_CODE_4M.secboot.fd" in argv
    assert '"driver":"qcow2","node-name":"fw-vars"' in argv
    with pytest.raises(ConflictError, match="shut it down before resetting"):
        engine.firmware_reset("sb")
    mount_efivarfs(engine, "sb")
    assert efi_variable(engine, "sb", f"SecureBoot-{EFI_GLOBAL}") == "0600000001"
    assert efi_variable(engine, "sb", VARIABLE) == "absent"
    guest_run(engine, "sb", f"printf '\\007\\000\\000\\000hello' > /sys/firmware/efi/efivars/{VARIABLE}")
    assert efi_variable(engine, "sb", VARIABLE) == VALUE_HEX
    assert engine.stop("sb", timeout=120)["state"] == "stopped"   # the guest's own ACPI shutdown
    assert vars_format(engine, "sb") == "qcow2"
    info = engine.firmware("sb")
    assert info["vars"]["made_for"] == "uefi-secure" and info["vars"]["template"] == "OVMF_VARS_4M.ms.fd"

    # Boot 2: the variable written in boot 1 is still there.
    boot(engine, "sb")
    mount_efivarfs(engine, "sb")
    assert efi_variable(engine, "sb", VARIABLE) == VALUE_HEX
    assert engine.stop("sb", timeout=120)["state"] == "stopped"

    # Reset, boot 3: the variable is gone, Secure Boot is still on (the template's Microsoft keys).
    result = engine.firmware_reset("sb")
    assert result["reset"] is True and result["backup"].endswith("vars.qcow2.prev")
    assert engine.firmware("sb")["vars"] is None
    boot(engine, "sb")
    assert b"secureboot: Secure boot enabled" in serial(engine, "sb")
    mount_efivarfs(engine, "sb")
    assert efi_variable(engine, "sb", VARIABLE) == "absent"
    assert efi_variable(engine, "sb", f"SecureBoot-{EFI_GLOBAL}") == "0600000001"
    engine.stop("sb", force=True)


@pytest.mark.timeout(600)
def test_unsigned_boot_loader_is_refused_by_the_firmware(engine: DirectEngine, make_vm, guest) -> None:
    # The test guest's ISO boots under plain UEFI (tests/integration); its grub is not signed.
    make_vm("unsigned", iso=str(guest.iso), firmware="uefi-secure", ram="512M")
    engine.start("unsigned")
    config = engine.get("unsigned")
    # OVMF's boot manager tries the DVD, is refused by the image verification, then runs out of options.
    assert engine.supervisor.wait_serial(config, b"No bootable option or device was found", 300), \
        serial(engine, "unsigned")[-3000:]
    text = re.sub(rb"\x1b\[[0-9;=?]*[A-Za-z]", b"", serial(engine, "unsigned")).decode(errors="replace")
    assert re.search(r'BdsDxe: failed to load Boot\d+ "UEFI QEMU DVD-ROM[^"]*" from \S+: Access Denied', text), text
    assert READY.decode() not in text and "Linux version" not in text
    assert engine.status("unsigned")["state"] == "running"   # the firmware waits at its menu: refused, not crashed
    engine.stop("unsigned", force=True)
