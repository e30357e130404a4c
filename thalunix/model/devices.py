"""Firmware, TPM, display and serial console choices of a VM.

Small families, declared here together; each has its choices as constants so the
UI, the CLI and the validation all read the same list.
"""

from __future__ import annotations

from dataclasses import dataclass

from thalunix.model.base import ModelObject, choice

FIRMWARES = ("bios", "uefi", "uefi-secure")
#: ``on`` demands a TPM (start fails with the reason if none can be had); ``auto``
#: attaches one where the host can; ``native``/``helper`` force a backend.
TPM_MODES = ("auto", "on", "off", "native", "helper")
ACCELERATORS = ("auto", "kvm", "whpx", "hvf", "haxm", "tcg")
DISPLAYS = ("vnc", "native", "none")
VGA_MODELS = ("std", "virtio", "qxl", "cirrus", "none")
MACHINES = ("q35", "pc")
OS_HINTS = ("linux", "windows", "windows11", "bsd", "other")
BOOT_DEVICES = ("cdrom", "disk", "network")


@dataclass
class Display(ModelObject):
    #: ``vnc``: the embedded screen (QEMU's own websocket VNC on 127.0.0.1);
    #: ``native``: QEMU's own window; ``none``: headless.
    kind: str = "vnc"
    vga: str = "std"

    def validate(self, where: str) -> None:
        choice(self.kind, DISPLAYS, f"{where}.kind", "display")
        choice(self.vga, VGA_MODELS, f"{where}.vga", "graphics card")
