"""The VM model: plain dataclasses, defaults and validation, one module per device family.

Nothing here touches QEMU or the data folder: the store persists these objects,
the command builder turns them into argv.

Example::

    from thalunix.model import VMConfig, CDRom, validate
    vm = VMConfig(name="debian", cdroms=[CDRom(path="isos/debian.iso")])
    vm.set_defaults()
"""

from thalunix.model.devices import (ACCELERATORS, BOOT_DEVICES, DISPLAYS, FIRMWARES, MACHINES, OS_HINTS,
                                    TPM_MODES, VGA_MODELS, Display)
from thalunix.model.disks import CDROM_BUSES, DISK_BUSES, DISK_FORMATS, CDRom, Disk
from thalunix.model.network import NIC_MODELS, NIC_MODES, Nic, PortForward, random_mac
from thalunix.model.units import format_size, parse_ram_mib, parse_size
from thalunix.model.vm import HostLimits, VMConfig, validate, validate_name

__all__ = [
    "ACCELERATORS", "BOOT_DEVICES", "CDROM_BUSES", "DISK_BUSES", "DISK_FORMATS", "DISPLAYS", "FIRMWARES",
    "MACHINES", "NIC_MODELS", "NIC_MODES", "OS_HINTS", "TPM_MODES", "VGA_MODELS",
    "CDRom", "Disk", "Display", "HostLimits", "Nic", "PortForward", "VMConfig",
    "format_size", "parse_ram_mib", "parse_size", "random_mac", "validate", "validate_name",
]
