"""UEFI firmware for a VM: which OVMF build to run and the VM's own variable store.

Every UEFI VM keeps its variables in ``firmware/vars.qcow2`` (qcow2, so internal
snapshots can include it), made from the pristine template of the chosen
firmware the first time the VM starts, and remade when the firmware kind changes.

Example::

    code, vars_path = prepare_firmware(vm, runtime, data)
"""

from __future__ import annotations

from pathlib import Path

from thalunix.errors import RuntimeMissingError
from thalunix.model import VMConfig
from thalunix.qemu.img import QemuImg
from thalunix.runtime import Runtime
from thalunix.store import DataFolder, atomic_write_bytes

VARS_NAME = "vars.qcow2"
KIND_NAME = "vars.kind"


def firmware_files(config: VMConfig, runtime: Runtime) -> tuple[Path, Path]:
    """(code, variable template) for the VM's firmware choice, or a clear error if missing."""
    fw = runtime.firmware
    if config.firmware == "uefi-secure":
        code, template = fw.secure_code, fw.secure_vars
        what = "UEFI Secure Boot firmware (OVMF_CODE*.secboot.fd with OVMF_VARS*.ms.fd)"
    else:
        code, template = fw.code, fw.vars
        what = "UEFI firmware (OVMF_CODE*.fd with OVMF_VARS*.fd)"
    if not code or not template:
        raise RuntimeMissingError(f"{config.label}: {what} was not found; install the ovmf package, use the "
                                  "portable Thalunix build, or switch the VM to BIOS firmware")
    return code, template


def prepare_firmware(config: VMConfig, runtime: Runtime, data: DataFolder) -> tuple[str, str]:
    """Return (code path, vars path) ready for QEMU; ('', '') for BIOS."""
    if config.firmware == "bios":
        return "", ""
    code, template = firmware_files(config, runtime)
    folder = data.vm_path(config.id, "firmware")
    vars_path = folder / VARS_NAME
    kind_file = folder / KIND_NAME
    kind = f"{config.firmware}:{template.name}"
    current = kind_file.read_text().strip() if kind_file.exists() else ""
    if not vars_path.exists() or current != kind:
        if vars_path.exists():
            vars_path.replace(vars_path.with_name(VARS_NAME + ".prev"))
        QemuImg(runtime.require_qemu_img()).convert(template, vars_path, "qcow2", "raw")
        atomic_write_bytes(kind_file, kind.encode())
    return str(code), str(vars_path)


def reset_firmware(config: VMConfig, data: DataFolder) -> None:
    """Forget the VM's firmware settings; the next start begins from the template."""
    folder = data.vm_path(config.id, "firmware")
    for name in (VARS_NAME, KIND_NAME):
        (folder / name).unlink(missing_ok=True)
