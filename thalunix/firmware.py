"""UEFI firmware for a VM: which OVMF build to run, and the VM's own persistent variable store.

Every UEFI VM keeps its variables (boot entries, Secure Boot keys, settings made in the
firmware's menu) in ``firmware/vars.qcow2``: qcow2, so internal snapshots include it. It is
made from the pristine template of the chosen firmware the first time the VM starts, remade
when the firmware kind changes (the old store kept as ``vars.qcow2.prev``), and checked before
every start so a damaged store is reported with the way out (reset) instead of as QEMU's words.

Firmware kinds: ``bios`` (SeaBIOS, no store), ``uefi`` (OVMF_CODE + OVMF_VARS), ``uefi-secure``
(OVMF's Secure Boot build + a variable template with Microsoft's keys enrolled; q35 with SMM).

Example::

    code, vars_path = prepare_firmware(vm, runtime, data)   # at start: ready-to-use paths
    firmware_info(vm, data)                                  # {"kind": "uefi", "vars": {...}, ...}
    reset_firmware(vm, data)                                 # forget the settings; next start is pristine
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from thalunix.errors import RuntimeMissingError, ThalunixError
from thalunix.model import VMConfig
from thalunix.qemu.img import QemuImg
from thalunix.runtime import _OVMF_NAMES as OVMF_NAMES, Runtime
from thalunix.store import DataFolder, atomic_write_bytes

VARS_NAME = "vars.qcow2"
KIND_NAME = "vars.kind"
BACKUP_NAME = VARS_NAME + ".prev"
#: What the messages call each kind.
KIND_WORDS = {"bios": "BIOS (SeaBIOS)", "uefi": "UEFI (OVMF)", "uefi-secure": "UEFI with Secure Boot (OVMF)"}


class FirmwareMissingError(RuntimeMissingError):
    """The OVMF code or variable template a VM needs is not on this host."""

    code = "firmware-missing"


class FirmwareVarsError(ThalunixError):
    """A VM's variable store cannot be used; resetting the firmware settings is the way out."""

    code = "firmware-vars-damaged"
    http_status = 409

    def __init__(self, message: str, vm: str, path: Path) -> None:
        super().__init__(message)
        self.vm = vm
        self.path = path
        #: What fixes it, for fronts that offer a button.
        self.fix = "reset-firmware"


def reset_command(config: VMConfig) -> str:
    name = f'"{config.name}"' if " " in config.name else config.name
    return f"thalunix vm firmware {name} reset"


def firmware_files(config: VMConfig, runtime: Runtime) -> tuple[Path, Path]:
    """(code, variable template) for the VM's firmware choice, or an error naming the missing file and the fix."""
    fw = runtime.firmware
    if config.firmware == "uefi-secure":
        roles = (("secure_code", fw.secure_code, "Secure Boot firmware code"),
                 ("secure_vars", fw.secure_vars, "variable template with Microsoft's keys enrolled"))
    else:
        roles = (("code", fw.code, "firmware code"), ("vars", fw.vars, "variable template"))
    missing = [(role, what) for role, path, what in roles if not path]
    if missing:
        names = " and ".join(f"{' or '.join(OVMF_NAMES[role][:2])} ({what})" for role, what in missing)
        where = fw.searched.replace(os.pathsep, ", ") if fw.searched else "the firmware folders"
        fix = ("install OVMF (Debian/Ubuntu: apt install ovmf; Fedora: edk2-ovmf) or use the portable Thalunix "
               "build, which carries it" if runtime.source == "system" else
               "the portable build is incomplete: unpack Thalunix again")
        raise FirmwareMissingError(
            f"{config.label}: {KIND_WORDS[config.firmware]} needs {names}, not found in {where}. To fix: {fix}; "
            "or switch the VM to BIOS firmware (Windows 11 and Secure Boot need UEFI)")
    return roles[0][1], roles[1][1]   # type: ignore[return-value]


def vars_path(config: VMConfig, data: DataFolder) -> Path:
    return data.vm_path(config.id, "firmware", VARS_NAME)


def prepare_firmware(config: VMConfig, runtime: Runtime, data: DataFolder) -> tuple[str, str]:
    """Return (code path, vars path) ready for QEMU; ('', '') for BIOS.

    Raises :class:`FirmwareMissingError` (nothing is changed) or :class:`FirmwareVarsError` for a
    store that is not a usable qcow2 of the template's size.
    """
    if config.firmware == "bios":
        return "", ""
    code, template = firmware_files(config, runtime)
    folder = data.vm_path(config.id, "firmware")
    store = folder / VARS_NAME
    kind_file = folder / KIND_NAME
    kind = f"{config.firmware}:{template.name}"
    current = kind_file.read_text().strip() if kind_file.exists() else ""
    img = QemuImg(runtime.require_qemu_img())
    if not store.exists() or current != kind:
        folder.mkdir(parents=True, exist_ok=True)
        if store.exists():
            store.replace(folder / BACKUP_NAME)
        img.convert(template, store, "qcow2", "raw")   # written beside and renamed: never half a store
        atomic_write_bytes(kind_file, kind.encode())
        return str(code), str(store)
    check_vars(config, img, store, template.stat().st_size)
    return str(code), str(store)


def check_vars(config: VMConfig, img: QemuImg, store: Path, size: int) -> None:
    """Refuse a store QEMU would choke on (not qcow2, damaged, or sized for another firmware build)."""
    def damaged(reason: str) -> FirmwareVarsError:
        return FirmwareVarsError(
            f"{config.label}: its UEFI variable store {store} is unusable ({reason}). Reset the firmware settings "
            f"(`{reset_command(config)}`, or 'Reset firmware settings' in the VM's settings) to start again from "
            "the firmware's defaults; boot entries and keys enrolled by hand are lost, the disks are not touched",
            config.name, store)
    try:
        info = img.info(store)
    except ThalunixError as error:
        raise damaged(str(error)) from None
    if info.get("format") != "qcow2":
        raise damaged(f"it is not a qcow2 image but {info.get('format') or 'unreadable'}")
    if (info.get("format-specific") or {}).get("data", {}).get("corrupt"):
        raise damaged("qcow2 marks it as corrupt")
    try:
        report = img.check(store)
    except ThalunixError as error:
        raise damaged(str(error)) from None
    if report.get("corruptions") or report.get("check-errors"):
        raise damaged(f"qemu-img check found {report.get('corruptions', 0)} corruptions and "
                      f"{report.get('check-errors', 0)} errors")
    if int(info.get("virtual-size", 0)) != size:
        raise damaged(f"it holds {info.get('virtual-size')} bytes, the firmware's template {size}")


def firmware_info(config: VMConfig, data: DataFolder) -> dict[str, Any]:
    """What a front shows about the VM's firmware and its variable store."""
    folder = data.vm_path(config.id, "firmware")
    store = folder / VARS_NAME
    kind_file = folder / KIND_NAME
    info: dict[str, Any] = {"vm": config.name, "firmware": config.firmware,
                            "description": KIND_WORDS.get(config.firmware, config.firmware),
                            "secure_boot": config.firmware == "uefi-secure", "vars": None,
                            "backup": (folder / BACKUP_NAME).is_file(), "reset_command": reset_command(config)}
    if store.is_file():
        stat = store.stat()
        made_for = kind_file.read_text().strip() if kind_file.is_file() else ""
        info["vars"] = {"path": data.to_stored_path(store), "size": stat.st_size,
                        "modified": datetime.datetime.fromtimestamp(stat.st_mtime).astimezone()
                        .isoformat(timespec="seconds"),
                        "template": made_for.partition(":")[2], "made_for": made_for.partition(":")[0],
                        # A store made for another kind is replaced at the next start.
                        "current": made_for.partition(":")[0] == config.firmware}
    return info


def reset_firmware(config: VMConfig, data: DataFolder) -> dict[str, Any]:
    """Forget the VM's firmware settings; the next start begins from the template.

    The old store is kept as ``vars.qcow2.prev`` (one level), so a reset by mistake can be undone
    by hand. The caller makes sure the VM is not running.
    """
    folder = data.vm_path(config.id, "firmware")
    store = folder / VARS_NAME
    had = store.is_file()
    if had:
        store.replace(folder / BACKUP_NAME)
    (folder / KIND_NAME).unlink(missing_ok=True)
    return {"vm": config.name, "reset": had, "backup": data.to_stored_path(folder / BACKUP_NAME) if had else None,
            "note": ("the firmware settings are forgotten; the next start begins from the firmware's defaults"
                     if had else "there were no stored firmware settings; the next start begins from the defaults")}
