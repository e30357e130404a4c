"""The VM config: one dataclass holding every choice a user makes about a VM.

``VMConfig`` is plain data (what ``vm.json`` holds); :func:`validate` checks it
against the host and the files it names and raises :class:`ValidationError`
with the field and a message a person can act on.

Example::

    vm = VMConfig(name="debian", ram_mib=2048, cdroms=[CDRom(path="/isos/debian.iso")])
    vm.set_defaults()
    validate(vm, HostLimits.probe(), file_exists=lambda p: Path(p).exists())
"""

from __future__ import annotations

import datetime
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

from thalunix.errors import ValidationError
from thalunix.model.base import ModelObject, choice
from thalunix.model.devices import (ACCELERATORS, BOOT_DEVICES, FIRMWARES, MACHINES, OS_HINTS, TPM_MODES,
                                    Display)
from thalunix.model.disks import CDRom, Disk
from thalunix.model.network import Nic

SCHEMA_VERSION = 1
NAME_MAX = 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
# Windows refuses these as file names whatever the extension; a VM name may become
# a file name (exports, clones), so refuse them everywhere.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
MIN_RAM_MIB = 32
MAX_CPUS = 255
_USB_ID = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")


@dataclass
class VMConfig(ModelObject):
    name: str
    id: str = ""
    os: str = "linux"
    cpus: int = 2
    ram_mib: int = 2048
    machine: str = "q35"
    firmware: str = "uefi"
    disks: list[Disk] = field(default_factory=list)
    cdroms: list[CDRom] = field(default_factory=list)
    boot_order: list[str] = field(default_factory=lambda: ["cdrom", "disk"])
    nics: list[Nic] = field(default_factory=lambda: [Nic()])
    display: Display = field(default_factory=Display)
    serial: bool = True
    accel: str = "auto"
    tpm: str = "auto"
    usb_tablet: bool = True
    #: the QEMU guest agent's virtio-serial channel (shutdown, IP addresses, file copy, clock)
    guest_agent: bool = True
    #: host USB devices passed through, re-attached at start when present: "VVVV:PPPP" (vendor:product)
    usb_devices: list[str] = field(default_factory=list)
    #: a host folder offered to this guest only (WebDAV at http://10.0.2.100/ through its first NAT card)
    shared_folder: str = ""
    created: str = ""
    schema: int = SCHEMA_VERSION

    def set_defaults(self, context: object = None) -> None:
        if not self.id:
            self.id = uuid.uuid4().hex
        if not self.created:
            self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if self.firmware == "uefi-secure":
            # OVMF's Secure Boot build needs SMM, which only q35 has.
            self.machine = "q35"
        for index, disk in enumerate(self.disks):
            disk.set_defaults(self)
            disk.id = disk.id or f"disk{index}"
        for index, cdrom in enumerate(self.cdroms):
            cdrom.set_defaults(self)
            cdrom.id = cdrom.id or f"cd{index}"
        for nic in self.nics:
            nic.set_defaults(self)

    @property
    def label(self) -> str:
        """How messages name this VM."""
        return f"VM {self.name!r}"


@dataclass(frozen=True)
class HostLimits:
    """What the host can give a VM; validation checks RAM and vCPUs against it."""

    cpus: int
    ram_mib: int

    @classmethod
    def probe(cls) -> "HostLimits":
        return cls(cpus=os.cpu_count() or 1, ram_mib=_host_ram_mib())


def _host_ram_mib() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    except (ValueError, OSError, AttributeError):
        pass
    try:  # Windows
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]
        status = MemoryStatus()
        status.dwLength = ctypes.sizeof(status)
        ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))  # type: ignore[attr-defined]
        return int(status.ullTotalPhys >> 20)
    except Exception:  # noqa: BLE001 - an unknown host is not a reason to refuse every VM
        return 1 << 20


def validate_name(name: object) -> str:
    """Check a VM name; return it. Names never reach the filesystem as paths."""
    if not isinstance(name, str) or not name.strip():
        raise ValidationError("name: a VM needs a name (letters, digits, space, '.', '_', '-')", "name")
    if "\x00" in name or "/" in name or "\\" in name:
        raise ValidationError(f"name: {name!r} contains a path separator or NUL; use letters, digits, "
                              "space, '.', '_' and '-'", "name")
    if len(name) > NAME_MAX:
        raise ValidationError(f"name: {len(name)} characters is too long; at most {NAME_MAX}", "name")
    if not _NAME.fullmatch(name) or name.endswith((".", " ")):
        raise ValidationError(f"name: {name!r} is not allowed; start with a letter or digit, use letters, "
                              "digits, space, '.', '_' and '-', and do not end with a dot or space", "name")
    if name.split(".")[0].strip().lower() in _RESERVED:
        raise ValidationError(f"name: {name!r} is a reserved device name on Windows; pick another", "name")
    return name


def validate(config: VMConfig, host: HostLimits | None = None,
             file_exists: Callable[[str], bool] | None = None) -> None:
    """Raise :class:`ValidationError` on the first problem; the config is not changed."""
    validate_name(config.name)
    label = config.label
    if not re.fullmatch(r"[0-9a-f]{32}", config.id or ""):
        raise ValidationError(f"{label}: id {config.id!r} is not a 32-digit hex id", "id")
    choice(config.os, OS_HINTS, "os", "OS hint")
    choice(config.machine, MACHINES, "machine", "machine type")
    choice(config.firmware, FIRMWARES, "firmware", "firmware")
    choice(config.accel, ACCELERATORS, "accel", "accelerator")
    choice(config.tpm, TPM_MODES, "tpm", "TPM mode")
    if config.firmware == "uefi-secure" and config.machine != "q35":
        raise ValidationError(f"{label}: Secure Boot needs the q35 machine type", "machine")
    if config.cpus < 1:
        raise ValidationError(f"{label}: cpus must be at least 1 (got {config.cpus})", "cpus")
    cpu_limit = min(MAX_CPUS, host.cpus) if host else MAX_CPUS
    if config.cpus > cpu_limit:
        raise ValidationError(f"{label}: {config.cpus} vCPUs is more than this host's {cpu_limit}; "
                              f"give {cpu_limit} or fewer", "cpus")
    if config.ram_mib < MIN_RAM_MIB:
        raise ValidationError(f"{label}: RAM {config.ram_mib} MiB is too small; give at least {MIN_RAM_MIB} MiB",
                              "ram_mib")
    if host and config.ram_mib > host.ram_mib:
        raise ValidationError(f"{label}: RAM {config.ram_mib} MiB is more than this host has "
                              f"({host.ram_mib} MiB); give less", "ram_mib")
    if not config.boot_order:
        raise ValidationError(f"{label}: boot order is empty; list at least one of {', '.join(BOOT_DEVICES)}",
                              "boot_order")
    for index, device in enumerate(config.boot_order):
        choice(device, BOOT_DEVICES, f"boot_order[{index}]", "boot device")
    if len(set(config.boot_order)) != len(config.boot_order):
        raise ValidationError(f"{label}: boot order lists a device twice: {config.boot_order}", "boot_order")
    ids: set[str] = set()
    for index, disk in enumerate(config.disks):
        disk.validate(f"disks[{index}]")
        _check_file(label, f"disks[{index}].path", disk.path, "disk image", file_exists)
        ids.add(disk.id)
    for index, cdrom in enumerate(config.cdroms):
        cdrom.validate(f"cdroms[{index}]")
        if cdrom.path:
            _check_file(label, f"cdroms[{index}].path", cdrom.path, "ISO", file_exists)
        ids.add(cdrom.id)
    if len(ids) != len(config.disks) + len(config.cdroms):
        raise ValidationError(f"{label}: two drives share one id", "disks")
    macs: set[str] = set()
    host_ports: set[tuple[str, str, int]] = set()
    for index, nic in enumerate(config.nics):
        nic.validate(f"nics[{index}]")
        if nic.mac in macs:
            raise ValidationError(f"{label}: MAC address {nic.mac} is used by two network cards",
                                  f"nics[{index}].mac")
        macs.add(nic.mac)
        for forward in nic.forwards:
            key = (forward.protocol, forward.host_address, forward.host_port)
            if key in host_ports:
                raise ValidationError(f"{label}: host port {forward.protocol}/{forward.host_port} is forwarded "
                                      "by two network cards", f"nics[{index}].forwards")
            host_ports.add(key)
    config.display.validate("display")
    seen_usb: set[str] = set()
    for index, usb in enumerate(config.usb_devices):
        if not _USB_ID.match(usb) or usb.lower() in seen_usb:
            raise ValidationError(f"{label}: usb_devices[{index}] {usb!r} is not a vendor:product pair like "
                                  "0781:5567 (each device once)", f"usb_devices[{index}]")
        seen_usb.add(usb.lower())
    if config.shared_folder:
        _check_file(label, "shared_folder", config.shared_folder, "shared folder", None)
        if not any(nic.mode in ("user", "restricted") for nic in config.nics):
            raise ValidationError(f"{label}: a shared folder is reached through a NAT network card (mode user "
                                  "or restricted); add one or remove the shared folder", "shared_folder")


def _check_file(label: str, field_name: str, path: str, what: str,
                file_exists: Callable[[str], bool] | None) -> None:
    if "\x00" in path:
        raise ValidationError(f"{label}: {field_name} contains a NUL character", field_name)
    if file_exists is not None and not file_exists(path):
        raise ValidationError(f"{label}: {what} {path!r} does not exist; check the path or pick the file again",
                              field_name)
