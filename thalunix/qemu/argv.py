"""The command builder: a pure function from (VM config, capabilities, launch plan) to QEMU's argv.

All knowledge of QEMU's command line lives here. No I/O: the runner allocates
sockets, ports and files first (a :class:`LaunchPlan`), and this module only
renders them, so every configuration can be tested without starting QEMU.

Example::

    plan = LaunchPlan(qmp=Endpoint.unix("/data/vms/1f/run/qmp.sock"), ...)
    argv = build_argv(vm, runtime.caps, plan)
    # ['/usr/bin/qemu-system-x86_64', '-name', 'guest=web', ...]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from thalunix.errors import ValidationError
from thalunix.model import VMConfig
from thalunix.runtime import Capabilities


@dataclass(frozen=True)
class Endpoint:
    """Where a QEMU socket listens: a UNIX socket, or TCP on loopback (Windows has no UNIX sockets in QEMU)."""

    kind: str
    path: str = ""
    host: str = "127.0.0.1"
    port: int = 0

    @classmethod
    def unix(cls, path: str) -> "Endpoint":
        return cls("unix", path=path)

    @classmethod
    def tcp(cls, port: int, host: str = "127.0.0.1") -> "Endpoint":
        return cls("tcp", host=host, port=port)

    def chardev(self, chardev_id: str, *extra: str) -> str:
        where = f"path={_escape(self.path)}" if self.kind == "unix" else f"host={self.host},port={self.port}"
        return ",".join([f"socket,id={chardev_id}", where, "server=on", "wait=off", *extra])

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "path": self.path, "host": self.host, "port": self.port}

    @classmethod
    def from_dict(cls, data: dict) -> "Endpoint":
        return cls(str(data["kind"]), str(data.get("path", "")), str(data.get("host", "127.0.0.1")),
                   int(data.get("port", 0)))


@dataclass(frozen=True)
class LaunchPlan:
    """What the runner allocated for one start: absolute paths, sockets, ports, accelerator args."""

    qemu: str
    qmp: Endpoint
    serial: Endpoint | None = None
    serial_log: str = ""
    #: stored path (as in vm.json) → absolute path on this host
    paths: dict[str, str] = field(default_factory=dict)
    accel_args: tuple[str, ...] = ("-accel", "tcg")
    accel: str = "tcg"
    firmware_code: str = ""
    firmware_vars: str = ""
    firmware_vars_format: str = "qcow2"
    #: QEMU's -L folder for a bundled runtime (BIOS and option ROMs)
    data_dir: str = ""
    vnc: Endpoint | None = None
    vnc_websocket_port: int = 0
    #: A file holding the per-start VNC password (given at launch: no window without one).
    vnc_password_file: str = ""
    #: A listening QMP socket the runner made and QEMU inherits: the runner can connect at once.
    qmp_fd: int = -1
    tpm_socket: str = ""
    #: private cards: (card index, local UDP port, the network switch's UDP port), all on 127.0.0.1
    private_links: tuple[tuple[int, int, int], ...] = ()
    #: the guest agent's chardev (None: no agent channel)
    agent: Endpoint | None = None
    #: the shared folder's WebDAV server (a UNIX socket, or TCP on 127.0.0.1), reached by the guest at 10.0.2.100:80
    share: Endpoint | None = None
    #: remembered host USB devices present at start: (device id, "vvvv:pppp")
    usb_host: tuple[tuple[str, str], ...] = ()
    #: qemu-bridge-helper for bridged cards (Linux)
    bridge_helper: str = ""


#: Spare PCIe root ports on q35 for disk hot-plug (see thalunix.disks).
HOTPLUG_PORTS = 2


def _escape(value: str) -> str:
    """QEMU's key=value syntax doubles commas inside values."""
    return value.replace(",", ",,")


def _blockdev(node: str, filename: str, fmt: str, read_only: bool) -> str:
    # JSON syntax: no comma escaping to get wrong in paths chosen by users.
    return json.dumps({"driver": fmt, "node-name": node, "read-only": read_only,
                       "file": {"driver": "file", "filename": filename, "read-only": read_only}},
                      separators=(",", ":"))


def _require(caps: Capabilities, device: str, config: VMConfig, what: str) -> None:
    if caps.devices and not caps.has_device(device):
        raise ValidationError(f"{config.label}: this QEMU has no {device} device, needed for {what}; "
                              "choose another option", what)


def _resolve(plan: LaunchPlan, stored: str, config: VMConfig) -> str:
    try:
        return plan.paths[stored]
    except KeyError:
        raise ValidationError(f"{config.label}: no resolved path for {stored!r}", "paths") from None


def build_argv(config: VMConfig, caps: Capabilities, plan: LaunchPlan) -> list[str]:
    """Render the full argv for ``config``; raise :class:`ValidationError` if QEMU cannot do it."""
    argv = [plan.qemu]
    if plan.data_dir:
        argv += ["-L", plan.data_dir]
    argv += ["-name", f"guest={_escape(config.name)}", "-uuid", _uuid(config.id),
             "-nodefaults", "-no-user-config", "-msg", "timestamp=on"]
    argv += _machine(config, caps, plan)
    argv += list(plan.accel_args)
    # "host" only exists with a hypervisor; under TCG "max" gives the guest every feature TCG emulates.
    argv += ["-cpu", "host" if plan.accel.split(",")[0] in ("kvm", "hvf") else "max"]
    argv += ["-smp", str(config.cpus), "-m", f"{config.ram_mib}M"]
    argv += ["-rtc", "base=localtime" if config.os.startswith("windows") else "base=utc"]
    qmp = f"socket,id=qmp,fd={plan.qmp_fd},server=on,wait=off" if plan.qmp_fd >= 0 else plan.qmp.chardev("qmp")
    argv += ["-chardev", qmp, "-mon", "chardev=qmp,mode=control"]
    argv += _drives(config, caps, plan)
    argv += _network(config, caps, plan)
    argv += _display(config, caps, plan)
    if config.serial and plan.serial:
        extra = (f"logfile={_escape(plan.serial_log)}", "logappend=on") if plan.serial_log else ()
        argv += ["-chardev", plan.serial.chardev("serial0", *extra), "-serial", "chardev:serial0"]
    if config.usb_tablet or config.usb_devices:
        _require(caps, "qemu-xhci", config, "usb_tablet")
        argv += ["-device", "qemu-xhci,id=xhci"]
        if config.usb_tablet:
            argv += ["-device", "usb-tablet,bus=xhci.0"]
        for device_id, usb in plan.usb_host:
            vendor, product = usb.split(":")
            argv += ["-device", f"usb-host,vendorid=0x{vendor},productid=0x{product},id={device_id},bus=xhci.0"]
    if config.guest_agent and plan.agent:
        _require(caps, "virtio-serial-pci", config, "guest_agent")
        argv += ["-device", "virtio-serial-pci,id=vser0", "-chardev", plan.agent.chardev("qga0"),
                 "-device", "virtserialport,bus=vser0.0,chardev=qga0,id=qga0-port,name=org.qemu.guest_agent.0"]
    if plan.tpm_socket:
        # An empty list means "not probed" unless the probe left a note (Windows builds have no -tpmdev at all).
        if (caps.tpm_backends or "tpm" in caps.notes) and not caps.has_tpm_emulator:
            raise ValidationError(f"{config.label}: this QEMU has no TPM emulation; set TPM to off", "tpm")
        argv += ["-chardev", f"socket,id=chrtpm,path={_escape(plan.tpm_socket)}",
                 "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                 "-device", "tpm-crb,tpmdev=tpm0" if config.machine == "q35" else "tpm-tis,tpmdev=tpm0"]
    if config.machine == "q35":
        # pcie.0 takes no hot-plugged devices: spare root ports (last, so no other device moves) let
        # disks be plugged in while the VM runs (thalunix.disks); i440fx's pci.0 hot-plugs by itself.
        for index in range(HOTPLUG_PORTS):
            argv += ["-device", f"pcie-root-port,id=hotplug{index},chassis={index + 1}"]
    return argv


def _uuid(hex_id: str) -> str:
    return f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:32]}"


def _machine(config: VMConfig, caps: Capabilities, plan: LaunchPlan) -> list[str]:
    if caps.machines and config.machine not in caps.machines:
        raise ValidationError(f"{config.label}: this QEMU has no {config.machine!r} machine", "machine")
    if config.firmware == "uefi-secure" and config.machine != "q35":
        # OVMF's Secure Boot build needs q35's SMM; on pc it never reaches its boot screen (tried: blank VGA).
        raise ValidationError(f"{config.label}: Secure Boot needs the q35 machine type", "machine")
    machine = [config.machine]
    argv: list[str] = []
    if config.firmware in ("uefi", "uefi-secure"):
        if not plan.firmware_code or not plan.firmware_vars:
            raise ValidationError(f"{config.label}: UEFI firmware (OVMF) was not found; install ovmf or "
                                  "choose BIOS firmware", "firmware")
        argv += ["-blockdev", json.dumps({"driver": "file", "filename": plan.firmware_code, "read-only": True,
                                          "node-name": "fw-code"}, separators=(",", ":")),
                 "-blockdev", _blockdev("fw-vars", plan.firmware_vars, plan.firmware_vars_format, False)]
        machine += ["pflash0=fw-code", "pflash1=fw-vars"]
        if config.firmware == "uefi-secure":
            machine.append("smm=on")
            # Without this the guest OS could write the variable store behind the firmware's back.
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return ["-machine", ",".join(machine)] + argv


def _boot_indexes(config: VMConfig) -> dict[str, int]:
    """bootindex per device id, following the VM's boot order (cdrom/disk/network)."""
    order: dict[str, int] = {}
    index = 1
    for kind in config.boot_order:
        if kind == "cdrom":
            devices = [c.id for c in config.cdroms]
        elif kind == "disk":
            devices = [d.id for d in config.disks]
        else:
            devices = [f"net{i}" for i, nic in enumerate(config.nics) if nic.mode != "none"]
        for device in devices:
            order[device] = index
            index += 1
    return order


class _Buses:
    """Hands out controller slots: q35's built-in AHCI ports, i440fx's IDE units, SCSI and AHCI added on demand."""

    def __init__(self, config: VMConfig, caps: Capabilities) -> None:
        self.config, self.caps = config, caps
        self.argv: list[str] = []
        self.ahci_next = 0
        self.ide_next = 0
        self.scsi = False
        self.extra_ahci = False

    def ata(self, bus: str) -> str:
        """The ``bus=`` for an IDE/SATA device."""
        if self.config.machine == "q35":
            # q35's ICH9 AHCI has six ports, ide.0 … ide.5; IDE devices live there too.
            if self.ahci_next >= 6:
                raise ValidationError(f"{self.config.label}: more than 6 SATA/IDE drives", "disks")
            self.ahci_next += 1
            return f"ide.{self.ahci_next - 1}"
        if bus == "sata":
            if not self.extra_ahci:
                self.argv += ["-device", "ich9-ahci,id=ahci"]
                self.extra_ahci = True
            if self.ahci_next >= 6:
                raise ValidationError(f"{self.config.label}: more than 6 SATA drives", "disks")
            self.ahci_next += 1
            return f"ahci.{self.ahci_next - 1}"
        if self.ide_next >= 4:
            raise ValidationError(f"{self.config.label}: the pc machine has room for 4 IDE drives", "disks")
        unit = self.ide_next
        self.ide_next += 1
        return f"ide.{unit // 2},unit={unit % 2}"

    def scsi_bus(self) -> str:
        if not self.scsi:
            _require(self.caps, "virtio-scsi-pci", self.config, "disks")
            self.argv += ["-device", "virtio-scsi-pci,id=scsi0"]
            self.scsi = True
        return "scsi0.0"


def _drives(config: VMConfig, caps: Capabilities, plan: LaunchPlan) -> list[str]:
    boot = _boot_indexes(config)
    buses = _Buses(config, caps)
    argv: list[str] = []
    for index, disk in enumerate(config.disks):
        if disk.readonly and disk.bus in ("sata", "ide"):
            # ide-hd always asks for write access ("Block node is read-only"); ATA disks have no write protect.
            raise ValidationError(f"{config.label}: disk {index + 1} is read-only, which a {disk.bus.upper()} disk "
                                  "cannot be; use the virtio, scsi or nvme bus, or make it writable",
                                  f"disks[{index}].readonly")
        argv += ["-blockdev", _blockdev(disk.id, _resolve(plan, disk.path, config), disk.format, disk.readonly)]
        bootindex = f",bootindex={boot[disk.id]}" if disk.id in boot else ""
        if disk.bus == "virtio":
            _require(caps, "virtio-blk-pci", config, "disks")
            device = f"virtio-blk-pci,drive={disk.id},id={disk.id}-dev"
        elif disk.bus == "nvme":
            _require(caps, "nvme", config, "disks")
            device = f"nvme,drive={disk.id},id={disk.id}-dev,serial={disk.id}"
        elif disk.bus == "scsi":
            device = f"scsi-hd,drive={disk.id},id={disk.id}-dev,bus={buses.scsi_bus()}"
        else:
            device = f"ide-hd,drive={disk.id},id={disk.id}-dev,bus={buses.ata(disk.bus)}"
        argv += ["-device", device + bootindex]
    for cdrom in config.cdroms:
        drive = ""
        if cdrom.path:
            argv += ["-blockdev", _blockdev(cdrom.id, _resolve(plan, cdrom.path, config), "raw", True)]
            drive = f",drive={cdrom.id}"
        bootindex = f",bootindex={boot[cdrom.id]}" if cdrom.id in boot else ""
        if cdrom.bus == "scsi":
            argv += ["-device", f"scsi-cd,id={cdrom.id}-dev,bus={buses.scsi_bus()}{drive}{bootindex}"]
        else:
            argv += ["-device", f"ide-cd,id={cdrom.id}-dev,bus={buses.ata(cdrom.bus)}{drive}{bootindex}"]
    return buses.argv + argv


#: Where the guest finds the shared folder (a guestfwd address inside user networking's 10.0.2.0/24).
SHARE_GUEST_ADDRESS = "10.0.2.100"


def _netdev(config: VMConfig, caps: Capabilities, plan: LaunchPlan, index: int, share: bool) -> list[str]:
    nic = config.nics[index]
    if nic.mode == "private":
        links = {link[0]: link for link in plan.private_links}
        if index not in links:
            raise ValidationError(f"{config.label}: no switch port for card {index + 1} on network "
                                  f"{nic.network!r}", f"nics[{index}].network")
        _, local, remote = links[index]
        if not caps.netdevs or "dgram" in caps.netdevs:
            return [f"dgram,id=net{index}", "local.type=inet", "local.host=127.0.0.1", f"local.port={local}",
                    "remote.type=inet", "remote.host=127.0.0.1", f"remote.port={remote}"]
        # QEMU before 7.2: the older UDP backend carries the same frames.
        return [f"socket,id=net{index}", f"udp=127.0.0.1:{remote}", f"localaddr=127.0.0.1:{local}"]
    if nic.mode == "bridge":
        if nic.tap:
            return [f"tap,id=net{index}", f"ifname={_escape(nic.tap)}", "script=no", "downscript=no"]
        helper = [f"helper={_escape(plan.bridge_helper)}"] if plan.bridge_helper else []
        return [f"bridge,id=net{index}", f"br={_escape(nic.bridge)}", *helper]
    netdev = [f"user,id=net{index}"]
    if nic.mode == "restricted":
        netdev.append("restrict=on")
    for forward in nic.forwards:
        netdev.append(f"hostfwd={forward.protocol}:{forward.host_address}:{forward.host_port}-:{forward.guest_port}")
    if share:
        # The chardev reconnects: a Thalunix started later serves the same socket again.
        assert plan.share is not None
        target = (f"unix:{_escape(_escape(plan.share.path))}" if plan.share.kind == "unix"
                  else f"tcp:{plan.share.host}:{plan.share.port}")
        netdev.append(f"guestfwd=tcp:{SHARE_GUEST_ADDRESS}:80-{target},,reconnect=1")
    return netdev


def _network(config: VMConfig, caps: Capabilities, plan: LaunchPlan) -> list[str]:
    argv: list[str] = []
    boot = _boot_indexes(config)
    share_nic = next((i for i, nic in enumerate(config.nics) if nic.mode in ("user", "restricted")), -1) \
        if plan.share else -1
    for index, nic in enumerate(config.nics):
        if nic.mode == "none":
            continue
        netdev = _netdev(config, caps, plan, index, index == share_nic)
        _require(caps, nic.model, config, f"nics[{index}].model")
        device = f"{nic.model},netdev=net{index},id=net{index}-dev,mac={nic.mac}"
        if f"net{index}" in boot:
            device += f",bootindex={boot[f'net{index}']}"
        else:
            # No option ROM when the card is not a boot device: iPXE costs boot time for nothing.
            device += ",romfile="
        argv += ["-netdev", ",".join(netdev), "-device", device]
    return argv


_VGA_DEVICES = {"std": "VGA", "virtio": "virtio-vga", "qxl": "qxl-vga", "cirrus": "cirrus-vga"}


def _display(config: VMConfig, caps: Capabilities, plan: LaunchPlan) -> list[str]:
    argv: list[str] = []
    if config.display.vga != "none":
        device = _VGA_DEVICES[config.display.vga]
        _require(caps, device, config, "display.vga")
        argv += ["-device", f"{device},id=video0"]
    if config.display.kind == "native":
        return argv  # QEMU's own default window (GTK, SDL or the Windows one)
    argv += ["-display", "none"]
    if config.display.kind == "vnc" and plan.vnc:
        if plan.vnc.kind == "unix":
            vnc = f"unix:{_escape(plan.vnc.path)}"
        else:
            vnc = f"{plan.vnc.host}:{plan.vnc.port - 5900}"
        if plan.vnc_websocket_port:
            vnc += f",websocket={plan.vnc.host}:{plan.vnc_websocket_port}"
        if plan.vnc_password_file:
            # A fresh password each start, read by QEMU itself at launch.
            argv += ["-object", f"secret,id=vncpw,file={_escape(plan.vnc_password_file)}"]
            argv += ["-vnc", vnc + ",password-secret=vncpw"]
        else:
            # Without a password file nobody gets in until one is set over QMP.
            argv += ["-vnc", vnc + ",password=on"]
    return argv
