"""Disks and CD-ROM drives of a VM.

Paths are stored as written in ``vm.json``: relative to the data folder when the
file lives inside it (so the folder can move to another drive), absolute otherwise.

Example::

    disk = Disk(path="vms/1f2e/disks/system.qcow2")
    disk.set_defaults()          # format from the extension, bus virtio
"""

from __future__ import annotations

from dataclasses import dataclass

from thalunix.model.base import ModelObject, choice

DISK_FORMATS = ("qcow2", "raw")
DISK_BUSES = ("virtio", "sata", "nvme", "ide", "scsi")
CDROM_BUSES = ("sata", "ide", "scsi")


@dataclass
class Disk(ModelObject):
    path: str
    format: str = ""
    bus: str = ""
    readonly: bool = False
    #: Stable device id (``disk0``), used by QMP hot-plug and snapshots.
    id: str = ""

    def set_defaults(self, context: object = None) -> None:
        if not self.format:
            self.format = "raw" if self.path.lower().endswith((".img", ".raw")) else "qcow2"
        if not self.bus:
            # Windows Setup has no virtio driver of its own: SATA (AHCI) installs without extra media.
            windows = str(getattr(context, "os", "")).startswith("windows")
            self.bus = "sata" if windows else "virtio"

    def validate(self, where: str) -> None:
        if not self.path.strip():
            from thalunix.errors import ValidationError
            raise ValidationError(f"{where}.path: a disk needs a file path", f"{where}.path")
        choice(self.format, DISK_FORMATS, f"{where}.format", "disk format")
        choice(self.bus, DISK_BUSES, f"{where}.bus", "disk bus")


@dataclass
class CDRom(ModelObject):
    #: The ISO in the drive; empty for an empty drive.
    path: str = ""
    bus: str = ""
    id: str = ""

    def set_defaults(self, context: object = None) -> None:
        if not self.bus:
            machine = getattr(context, "machine", "q35")
            # i440fx (pc) has no AHCI controller by default; IDE is what its BIOSes boot from.
            self.bus = "ide" if machine == "pc" else "sata"

    def validate(self, where: str) -> None:
        choice(self.bus, CDROM_BUSES, f"{where}.bus", "CD-ROM bus")
