"""Network cards and port forwards.

A forward is written the way people say it: ``tcp:8080:80`` forwards host port
8080 on 127.0.0.1 to guest port 80. Forwards bind to loopback unless a host
address is given on purpose (``tcp:0.0.0.0:8080:80``).

Example::

    >>> PortForward.parse("tcp:2222:22")
    PortForward(protocol='tcp', host_port=2222, guest_port=22, host_address='127.0.0.1')
"""

from __future__ import annotations

import ipaddress
import random
import re
from dataclasses import dataclass, field

from thalunix.errors import ValidationError
from thalunix.model.base import ModelObject, choice

#: user: NAT with forwards; restricted: NAT without outbound access; private: a Thalunix switch shared by
#: the VMs naming the same custom network (no admin rights); bridge: a host bridge or TAP device.
NIC_MODES = ("user", "restricted", "private", "bridge", "none")
NIC_MODELS = ("virtio-net-pci", "e1000e", "e1000", "rtl8139")
PROTOCOLS = ("tcp", "udp")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
#: Custom network names (files networks/<name>.json) and host interface names (br0, tap0, "TAP-Windows 1").
NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")


@dataclass
class PortForward(ModelObject):
    protocol: str
    host_port: int
    guest_port: int
    host_address: str = "127.0.0.1"

    @classmethod
    def parse(cls, spec: str) -> "PortForward":
        """Parse ``[tcp|udp:][HOSTADDR:]HOSTPORT:GUESTPORT``."""
        parts = spec.strip().split(":")
        protocol = "tcp"
        if parts and parts[0].lower() in PROTOCOLS:
            protocol = parts.pop(0).lower()
        address = "127.0.0.1"
        if len(parts) == 3:
            address = parts.pop(0)
            if address.isalpha() and protocol == "tcp" and spec.strip().lower().startswith(address.lower()):
                raise ValidationError(f"forward {spec!r}: protocol {address!r} is unknown; use tcp or udp",
                                      "forwards")
        if len(parts) != 2:
            raise ValidationError(
                f"forward {spec!r}: write it as tcp:HOSTPORT:GUESTPORT (e.g. tcp:2222:22), "
                "optionally with a host address (tcp:127.0.0.1:2222:22)", "forwards")
        try:
            host_port, guest_port = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValidationError(f"forward {spec!r}: ports must be numbers from 1 to 65535",
                                  "forwards") from None
        forward = cls(protocol, host_port, guest_port, address)
        forward.validate("forwards")
        return forward

    def validate(self, where: str) -> None:
        choice(self.protocol, PROTOCOLS, f"{where}.protocol", "protocol")
        for name in ("host_port", "guest_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise ValidationError(f"{where}.{name}: port {port} is out of range (1-65535)", f"{where}.{name}")
        try:
            ipaddress.IPv4Address(self.host_address)
        except ValueError:
            raise ValidationError(f"{where}.host_address: {self.host_address!r} is not an IPv4 address",
                                  f"{where}.host_address") from None

    def __str__(self) -> str:
        return f"{self.protocol}:{self.host_address}:{self.host_port}->{self.guest_port}"


def random_mac() -> str:
    """A locally administered MAC in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


@dataclass
class Nic(ModelObject):
    mode: str = "user"
    #: empty: chosen by set_defaults from the VM's OS hint
    model: str = ""
    mac: str = ""
    forwards: list[PortForward] = field(default_factory=list)
    #: mode private: the custom network's name (``thalunix net create NAME``)
    network: str = ""
    #: mode bridge: the host bridge (Linux, through qemu-bridge-helper) ...
    bridge: str = ""
    #: ... or an existing TAP device (Linux tap name, or the Windows TAP adapter's name)
    tap: str = ""

    def set_defaults(self, context: object = None) -> None:
        if not self.model:
            # Windows has an e1000e driver in the box; everything else does best with virtio.
            windows = str(getattr(context, "os", "")).startswith("windows")
            self.model = "e1000e" if windows else "virtio-net-pci"
        if not self.mac:
            self.mac = random_mac()
        self.mac = self.mac.lower()

    def validate(self, where: str) -> None:
        choice(self.mode, NIC_MODES, f"{where}.mode", "network mode")
        choice(self.model, NIC_MODELS, f"{where}.model", "network card model")
        if not _MAC.match(self.mac):
            raise ValidationError(f"{where}.mac: {self.mac!r} is not a MAC address like 52:54:00:12:34:56",
                                  f"{where}.mac")
        if int(self.mac[:2], 16) & 1:
            raise ValidationError(f"{where}.mac: {self.mac} is a multicast address; the first byte must be even",
                                  f"{where}.mac")
        if self.forwards and self.mode not in ("user", "restricted"):
            raise ValidationError(f"{where}.forwards: only a NAT card (mode user or restricted) forwards ports; "
                                  f"this one is {self.mode}", f"{where}.forwards")
        if self.mode == "private" and not NETWORK_NAME.match(self.network):
            raise ValidationError(f"{where}.network: a private card needs the name of a custom network "
                                  f"(letters, digits, '_', '-'; got {self.network!r}); create one with "
                                  "`thalunix net create NAME`", f"{where}.network")
        if self.mode == "bridge":
            if bool(self.bridge) == bool(self.tap):
                raise ValidationError(f"{where}: a bridged card needs either a host bridge (e.g. br0) or an "
                                      "existing TAP device, not both and not neither", f"{where}.bridge")
            for name in ("bridge", "tap"):
                value = getattr(self, name)
                if value and not _IFNAME.match(value):
                    raise ValidationError(f"{where}.{name}: {value!r} is not an interface name", f"{where}.{name}")
        seen: set[tuple[str, str, int]] = set()
        for index, forward in enumerate(self.forwards):
            forward.validate(f"{where}.forwards[{index}]")
            key = (forward.protocol, forward.host_address, forward.host_port)
            if key in seen:
                raise ValidationError(f"{where}.forwards[{index}]: host port {forward.protocol}/{forward.host_port} "
                                      "is forwarded twice", f"{where}.forwards[{index}]")
            seen.add(key)
