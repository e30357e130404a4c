"""The libvirt engine: the :class:`~thalunix.engine.Engine` verbs over one libvirt connection (a host).

Domains are defined, edited, started and stopped through libvirt; disks are storage volumes in the host's
pool (``thalunix`` by default, made as a directory pool when missing); the serial console is a libvirt
stream (virDomainOpenConsole) read by the event loop; snapshots and clones use libvirt's own APIs; lifecycle
events become ``vm.state`` events on the bus with ``host`` set. Domains other tools defined are listed and
driven too; their XML is only ever edited in place (:mod:`thalunix.libvirt.xml`).

Example::

    engine = HostManager(DataFolder.open()).engine("lab")      # a LibvirtEngine
    engine.create(CreateOptions(name="web", iso="/isos/debian.iso", disk="20G", accel="tcg"))
    engine.start("web")
    engine.serial_output("web")                               # what the guest printed on ttyS0
    engine.snapshot_create("web", "before-upgrade")
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import threading
import time
import uuid as uuidlib
import zlib
from pathlib import Path
from typing import Any, Callable

from thalunix.engine import CREATE_DEFAULTS, CreateOptions, Engine
from thalunix.errors import ConflictError, NotFoundError, StartError, ThalunixError, ValidationError
from thalunix.events import EventBus
from thalunix.libvirt import xml as domxml
from thalunix.libvirt.hosts import Host, classify, libvirt_module
from thalunix.model import (DISK_BUSES, DISK_FORMATS, CDRom, Disk, HostLimits, Nic, VMConfig, parse_ram_mib,
                            parse_size, random_mac, validate)
from thalunix.model.base import choice
from thalunix.store import DataFolder

SERIAL_BUFFER = 256 * 1024
CHUNK = 1 << 20
#: libvirt's domain states → Thalunix's (thalunix.qemu.runner.STATES).
_STATES = {0: "stopped", 1: "running", 2: "running", 3: "paused", 4: "stopping", 5: "stopped", 6: "crashed",
           7: "paused"}
DEFAULT_POOL_DIR = "/var/lib/libvirt/images/thalunix"


def _png(width: int, height: int, rgb: bytes) -> bytes:
    """RGB rows → PNG (libvirt screenshots arrive as PPM; the fronts show PNG)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[row * stride:(row + 1) * stride] for row in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def ppm_to_png(data: bytes) -> bytes:
    parts: list[bytes] = []
    position = 0
    while len(parts) < 4:
        while data[position:position + 1].isspace():
            position += 1
        if data[position:position + 1] == b"#":
            position = data.index(b"\n", position) + 1
            continue
        end = position
        while not data[end:end + 1].isspace():
            end += 1
        parts.append(data[position:end])
        position = end
    if parts[0] != b"P6" or int(parts[3]) != 255:
        raise ThalunixError(f"the host sent a screenshot in an unexpected format ({parts[0]!r})")
    width, height = int(parts[1]), int(parts[2])
    return _png(width, height, data[position + 1:position + 1 + width * height * 3])


class _Console:
    """A domain's serial console as a libvirt stream: output buffered and published, input sent on demand."""

    def __init__(self, engine: "LibvirtEngine", domain: Any, vm_id: str, name: str) -> None:
        libvirt = engine.libvirt
        self.engine = engine
        self.vm_id = vm_id
        self.name = name
        self.buffer = bytearray()
        self.lock = threading.Lock()
        self.closed = False
        self.stream = engine.conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        domain.openConsole(None, self.stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self.stream.eventAddCallback(libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR
                                     | libvirt.VIR_STREAM_EVENT_HANGUP, self._readable, None)

    def _readable(self, stream: Any, events: int, _opaque: Any) -> None:
        libvirt = self.engine.libvirt
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self.close()
            return
        while True:
            try:
                data = stream.recv(65536)
            except libvirt.libvirtError:
                self.close()
                return
            if data == -2:            # nothing more for now
                return
            if not data:
                self.close()
                return
            with self.lock:
                self.buffer += data
                del self.buffer[:-SERIAL_BUFFER]
            self.engine.bus.publish("vm.serial", vm=self.vm_id, name=self.name, host=self.engine.host.name,
                                    data=data.decode("utf-8", errors="replace"))

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 10
        while view:
            sent = self.stream.send(bytes(view[:4096]))
            if sent == -2:
                if time.monotonic() > deadline:
                    raise ThalunixError(f"VM {self.name!r}: the serial console does not take input; try again")
                time.sleep(0.01)
                continue
            if sent < 0:
                raise ThalunixError(f"VM {self.name!r}: the serial console closed; reopen it")
            view = view[sent:]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.stream.eventRemoveCallback()
        with contextlib.suppress(Exception):
            self.stream.abort()


class LibvirtEngine(Engine):
    """VMs on one libvirt host."""

    def __init__(self, host: Host, connection: Any, bus: EventBus | None = None,
                 data: DataFolder | None = None) -> None:
        self.libvirt = libvirt_module()
        self.host = host
        self.conn = connection
        self.bus = bus or EventBus()
        self.data = data
        self._consoles: dict[str, _Console] = {}
        self._stopped: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        info = connection.getInfo()
        self.limits = HostLimits(cpus=int(info[2]), ram_mib=int(info[1]))
        self._callback: int | None = None
        with contextlib.suppress(self.libvirt.libvirtError):
            self._callback = connection.domainEventRegisterAny(
                None, self.libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)

    # -- plumbing ---------------------------------------------------------------------------------------
    def alive(self) -> bool:
        try:
            return bool(self.conn.isAlive())
        except self.libvirt.libvirtError:
            return False

    def version(self) -> dict[str, Any]:
        def dotted(number: int) -> str:
            return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"
        return {"libvirt": dotted(self.conn.getLibVersion()), "qemu": dotted(self.conn.getVersion()),
                "hostname": self.conn.getHostname()}

    def close(self) -> None:
        for console in list(self._consoles.values()):
            console.close()
        self._consoles.clear()
        with contextlib.suppress(Exception):
            if self._callback is not None:
                self.conn.domainEventDeregisterAny(self._callback)
        with contextlib.suppress(Exception):
            self.conn.close()

    def _call(self, what: str, function: Callable[..., Any], *args: Any) -> Any:
        """A libvirt call whose error becomes a ThalunixError naming the host and what failed."""
        try:
            return function(*args)
        except self.libvirt.libvirtError as error:
            raise self._error(what, error) from None

    def _error(self, what: str, error: Any) -> ThalunixError:
        code = error.get_error_code()
        message = error.get_error_message() or str(error)
        libvirt = self.libvirt
        if code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL,
                    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT):
            return NotFoundError(f"{self.host.label}: {what}: {message}")
        if code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_OPERATION_FAILED) and \
                ("already" in message or "not running" in message or "is running" in message or "active" in message):
            return ConflictError(f"{self.host.label}: {what}: {message}")
        if code in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT,
                    libvirt.VIR_ERR_INTERNAL_ERROR) and not self.alive():
            return classify(error, self.host)
        return ThalunixError(f"{self.host.label}: {what} failed: {message}")

    def _domain(self, name: str) -> Any:
        try:
            return self.conn.lookupByName(name)
        except self.libvirt.libvirtError as error:
            if error.get_error_code() != self.libvirt.VIR_ERR_NO_DOMAIN:
                raise self._error(f"looking up VM {name!r}", error) from None
        text = str(name).replace("-", "").lower()
        if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
            with contextlib.suppress(self.libvirt.libvirtError):
                return self.conn.lookupByUUIDString(domxml._uuid(text))
        raise NotFoundError(f"no VM named {name!r} on {self.host.label}; `thalunix vm list --host "
                            f"{self.host.name}` shows its VMs")

    def _xml(self, domain: Any, live: bool = False) -> str:
        flags = self.libvirt.VIR_DOMAIN_XML_SECURE | (0 if live else self.libvirt.VIR_DOMAIN_XML_INACTIVE)
        return str(self._call("reading the domain XML", domain.XMLDesc, flags))

    def view(self, name: str) -> domxml.DomainView:
        return domxml.config_from_xml(domxml.parse(self._xml(self._domain(name))))

    def _state(self, domain: Any) -> str:
        state, reason = self._call("reading the state", domain.state)
        if state == self.libvirt.VIR_DOMAIN_SHUTOFF and reason == self.libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
            return "crashed"
        return _STATES.get(state, "stopped")

    def _lifecycle(self, _conn: Any, domain: Any, event: int, detail: int, _opaque: Any) -> None:
        libvirt = self.libvirt
        try:
            vm_id = domain.UUIDString().replace("-", "")
            name = domain.name()
        except Exception:  # noqa: BLE001 - a domain gone meanwhile: nothing to report
            return
        if event in (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            # Another tool (or this one) changed the definitions: fronts refresh their lists.
            self.bus.publish("vm.config", vm=vm_id, name=name, host=self.host.name,
                             change="defined" if event == libvirt.VIR_DOMAIN_EVENT_DEFINED else "undefined")
            return
        state = {libvirt.VIR_DOMAIN_EVENT_STARTED: "running", libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused",
                 libvirt.VIR_DOMAIN_EVENT_RESUMED: "running", libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
                 libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "stopping", libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "paused",
                 libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed"}.get(event)
        if state is None:
            return
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED:
            state = "crashed"
        if event == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN and detail == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED:
            return   # the STOPPED event follows
        if state in ("stopped", "crashed"):
            console = self._consoles.pop(vm_id, None)
            if console is not None:
                console.close()
            waiter = self._stopped.get(vm_id)
            if waiter is not None:
                waiter.set()
        self.bus.publish("vm.state", vm=vm_id, name=name, state=state, host=self.host.name)

    # -- definitions ------------------------------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        rows = []
        for domain in self._call("listing the VMs", self.conn.listAllDomains, 0):
            try:
                view = domxml.config_from_xml(domxml.parse(self._xml(domain)))
            except ThalunixError as error:
                rows.append({"id": domain.UUIDString().replace("-", ""), "name": domain.name(), "state": "broken",
                             "error": str(error), "host": self.host.name})
                continue
            config = view.config
            rows.append({"id": config.id, "name": config.name, "state": self._state(domain), "os": config.os,
                         "cpus": config.cpus, "ram_mib": config.ram_mib, "firmware": config.firmware,
                         "host": self.host.name, "managed": view.managed, "unmodeled": view.unmodeled})
        rows.sort(key=lambda row: str(row["name"]).lower())
        return rows

    def get(self, name: str) -> VMConfig:
        return self.view(name).config

    def describe(self, name: str) -> dict[str, Any]:
        domain = self._domain(name)
        view = domxml.config_from_xml(domxml.parse(self._xml(domain)))
        status = self.status(name)
        return {**view.config.to_dict(), "state": status["state"], "status": status, "host": self.host.name,
                "managed": view.managed, "unmodeled": view.unmodeled, "notes": view.notes,
                # read-only: everything the host keeps, including what Thalunix does not model
                "xml": self._call("reading the domain XML", domain.XMLDesc, self.libvirt.VIR_DOMAIN_XML_INACTIVE)}

    def domain_type(self, accel: str) -> str:
        """libvirt's domain type for an accelerator choice: ``tcg`` → qemu, ``kvm`` → kvm, ``auto`` → kvm where
        the host offers it. (On a host whose KVM is broken, choose tcg.)"""
        if accel == "tcg":
            return "qemu"
        if accel == "kvm":
            return "kvm"
        if accel != "auto":
            raise ValidationError(f"accel: {accel!r} does not exist on a libvirt host; choose auto, kvm or tcg",
                                  "accel")
        caps = self._call("reading the host's capabilities", self.conn.getCapabilities)
        return "kvm" if "<domain type='kvm'" in caps else "qemu"

    def _check_libvirt_model(self, config: VMConfig) -> None:
        for index, disk in enumerate(config.disks):
            if disk.bus == "nvme":
                raise ValidationError(f"{config.label}: disks[{index}].bus: nvme disks are not offered on libvirt "
                                      "hosts; choose virtio, sata or scsi", f"disks[{index}].bus")
        for index, nic in enumerate(config.nics):
            if nic.forwards:
                raise ValidationError(f"{config.label}: nics[{index}].forwards: port forwards are not offered on "
                                      "libvirt hosts; put the card on a libvirt network (host setting `network`) "
                                      "instead", f"nics[{index}].forwards")

    def create(self, options: CreateOptions) -> VMConfig:
        """Validate everything; make the disk volume; define the domain. Nothing is left behind on failure."""
        for key, fallback in CREATE_DEFAULTS.items():
            if getattr(options, key) is None:
                setattr(options, key, fallback)
        choice(options.disk_format, DISK_FORMATS, "disk_format", "disk format")
        if options.disk_bus:   # empty: the model picks by OS (as for portable VMs)
            choice(options.disk_bus, DISK_BUSES, "disk_bus", "disk bus")
        config = VMConfig(name=options.name, os=str(options.os), cpus=options.cpus,
                          ram_mib=parse_ram_mib(options.ram or "2G"), machine=options.machine,
                          firmware=str(options.firmware), tpm=str(options.tpm), accel=options.accel)
        config.display.kind = "none" if options.display == "none" else "vnc"
        if options.boot:
            config.boot_order = list(options.boot)
        config.nics = [Nic()]
        if options.forwards:
            raise ValidationError("forwards: port forwards are not offered on libvirt hosts; use a libvirt network "
                                  "(host setting `network`)", "forwards")
        config.cdroms = [CDRom()]
        new_size = 0
        if options.disk and options.disk.strip().lower() not in ("", "none"):
            if "/" in options.disk:
                config.disks = [Disk(path=options.disk, bus=options.disk_bus or "")]
            else:
                new_size = parse_size(options.disk, field="disk", default_unit="G")
                config.disks = [Disk(path="(new)", format=options.disk_format, bus=options.disk_bus or "")]
        config.set_defaults()
        config.id = uuidlib.uuid4().hex
        self._check_libvirt_model(config)
        validate(config, self.limits)
        domain_type = self.domain_type(config.accel)
        self._refuse_taken(config.name)
        made: list[Any] = []
        try:
            if options.iso:
                config.cdroms[0].path = self.place_iso(options.iso, made)
            if new_size:
                volume = self.new_volume(f"{config.name}-disk0.{'qcow2' if options.disk_format == 'qcow2' else 'img'}",
                                         new_size, options.disk_format)
                made.append(volume)
                config.disks[0].path = volume.path()
            elif config.disks:
                self._volume_by_path(config.disks[0].path)   # an existing image must be on the host
            root = domxml.new_domain_xml(config, domain_type, self.host.network)
            domxml.set_owned_volumes(root, {v.path(): "" for v in made if not _is_shared_iso(v)})
            self._call(f"defining VM {config.name!r}", self.conn.defineXML, domxml.to_text(root))
        except BaseException:
            for volume in made:
                if not _is_shared_iso(volume):
                    with contextlib.suppress(Exception):
                        volume.delete(0)
            raise
        self.bus.publish("vm.config", vm=config.id, name=config.name, change="created", host=self.host.name)
        return self.get(config.id)

    def _refuse_taken(self, name: str) -> None:
        try:
            self.conn.lookupByName(name)
        except self.libvirt.libvirtError as error:
            if error.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise self._error(f"checking the name {name!r}", error) from None
        raise ConflictError(f"{self.host.label} already has a VM named {name!r}; choose another name")

    def edit(self, name: str, changes: dict[str, Any]) -> VMConfig:
        """Apply field changes to the domain's XML in place; everything Thalunix does not own stays as it was."""
        domain = self._domain(name)
        if self._state(domain) not in ("stopped", "crashed"):
            raise ConflictError(f"VM {domain.name()!r} on {self.host.label} is running; stop it before changing "
                                "its settings")
        for key in changes:
            if key in ("id", "created", "schema"):
                raise ValidationError(f"{key} cannot be changed", key)
        root = domxml.parse(self._xml(domain))
        old = domxml.config_from_xml(root).config
        new = VMConfig.from_dict({**old.to_dict(), **changes})
        new.set_defaults()
        self._check_libvirt_model(new)
        validate(new, self.limits)
        for drive in [*new.disks, *[c for c in new.cdroms if c.path]]:
            if drive.path not in {d.path for d in [*old.disks, *old.cdroms]}:
                self._volume_by_path(drive.path)
        if new.name != old.name:
            self._refuse_taken(new.name)
            self._call(f"renaming VM {old.name!r}", domain.rename, new.name, 0)
            root = domxml.parse(self._xml(domain))
            old = domxml.config_from_xml(root).config
        touched = domxml.apply_changes(root, old, new, network=self.host.network,
                                       domain_type=self.domain_type(new.accel) if new.accel != old.accel else None)
        if touched:
            self._call(f"saving VM {new.name!r}", self.conn.defineXML, domxml.to_text(root))
        self.bus.publish("vm.config", vm=new.id, name=new.name, change="edited", host=self.host.name)
        return self.get(new.id)

    def delete(self, name: str, keep_disks: bool = False) -> None:
        domain = self._domain(name)
        if self._state(domain) not in ("stopped", "crashed"):
            raise ConflictError(f"VM {domain.name()!r} on {self.host.label} is running; stop it before deleting it")
        view = domxml.config_from_xml(domxml.parse(self._xml(domain)))
        libvirt = self.libvirt
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
                 | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_TPM", 0))
        self._call(f"deleting VM {view.config.name!r}", domain.undefineFlags, flags)
        if not keep_disks:
            # Only volumes Thalunix made for this VM: another tool's disks and shared ISOs are not ours to erase.
            for path in view.owned_volumes:
                with contextlib.suppress(self.libvirt.libvirtError):
                    self.conn.storageVolLookupByPath(path).delete(0)
        self.bus.publish("vm.config", vm=view.config.id, name=view.config.name, change="deleted", host=self.host.name)

    # -- running ----------------------------------------------------------------------------------------
    def start(self, name: str) -> dict[str, Any]:
        domain = self._domain(name)
        if self._state(domain) != "stopped" and self._state(domain) != "crashed":
            raise ConflictError(f"VM {domain.name()!r} on {self.host.label} is already {self._state(domain)}")
        try:
            domain.create()
        except self.libvirt.libvirtError as error:
            raise StartError(f"VM {domain.name()!r} on {self.host.label} did not start: "
                             f"{error.get_error_message()}", qemu_output=str(error)) from None
        with contextlib.suppress(ThalunixError):
            self._console(domain)   # from the first lines on
        return self.status(name)

    def stop(self, name: str, force: bool = False, timeout: float = 60) -> dict[str, Any]:
        domain = self._domain(name)
        vm_id = domain.UUIDString().replace("-", "")
        if self._state(domain) in ("stopped", "crashed"):
            return self.status(name)
        if not force:
            waiter = self._stopped.setdefault(vm_id, threading.Event())
            waiter.clear()
            self._call("sending the ACPI power button", domain.shutdownFlags,
                       self.libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._state(domain) not in ("stopped", "crashed"):
                waiter.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        if self._state(domain) not in ("stopped", "crashed"):
            with contextlib.suppress(self.libvirt.libvirtError):
                domain.destroy()
        return self.status(name)

    def pause(self, name: str) -> None:
        self._call("pausing", self._domain(name).suspend)

    def resume(self, name: str) -> None:
        self._call("resuming", self._domain(name).resume)

    def reset(self, name: str) -> None:
        self._call("resetting", self._domain(name).reset, 0)

    def status(self, name: str) -> dict[str, Any]:
        domain = self._domain(name)
        state = self._state(domain)
        status: dict[str, Any] = {"state": state, "host": self.host.name, "pid": None,
                                  "accel": "tcg" if "type='qemu'" in self._xml(domain)[:200] else "kvm",
                                  "websocket_port": None, "attached": True}
        if state in ("running", "paused"):
            graphics = domxml.parse(self._xml(domain, live=True)).find("devices/graphics")
            if graphics is not None and (graphics.get("websocket") or "-1") != "-1":
                status["websocket_port"] = int(graphics.get("websocket"))   # type: ignore[arg-type]
        return status

    # -- console, screen --------------------------------------------------------------------------------
    def _console(self, domain: Any) -> _Console:
        vm_id = domain.UUIDString().replace("-", "")
        with self._lock:
            console = self._consoles.get(vm_id)
            if console is not None and not console.closed:
                return console
            if self._state(domain) not in ("running", "paused"):
                raise ConflictError(f"VM {domain.name()!r} on {self.host.label} is not running; start it to use "
                                    "its serial console")
            try:
                console = _Console(self, domain, vm_id, domain.name())
            except self.libvirt.libvirtError as error:
                raise self._error(f"opening the serial console of VM {domain.name()!r}", error) from None
            if console.closed:
                raise ThalunixError(f"VM {domain.name()!r} on {self.host.label}: the serial console closed at once")
            if vm_id in self._consoles:   # a previous stream's buffer carries on
                console.buffer = self._consoles[vm_id].buffer
            self._consoles[vm_id] = console
            return console

    def send_serial(self, name: str, data: bytes) -> None:
        self._console(self._domain(name)).send(data)

    def serial_output(self, name: str) -> bytes:
        domain = self._domain(name)
        vm_id = domain.UUIDString().replace("-", "")
        console = self._consoles.get(vm_id)
        if console is None and self._state(domain) in ("running", "paused"):
            console = self._console(domain)
        if console is None:
            return b""
        with console.lock:
            return bytes(console.buffer)

    def read_log(self, name: str, kind: str = "events", tail: int = 1 << 20) -> str:
        if kind == "serial":
            return self.serial_output(name)[-tail:].decode("utf-8", errors="replace") if tail else ""
        if kind in ("events", "qemu"):
            self._domain(name)
            return ""   # libvirt keeps QEMU's log on the host (/var/log/libvirt/qemu/NAME.log), not reachable here
        raise ValidationError(f"log kind {kind!r} is unknown; choose one of events, qemu, serial", "kind")

    def screenshot(self, name: str) -> bytes:
        domain = self._domain(name)
        if self._state(domain) not in ("running", "paused"):
            raise ConflictError(f"VM {domain.name()!r} on {self.host.label} is not running; there is no screen")
        stream = self.conn.newStream(0)
        try:
            mime = self._call("taking a screenshot", domain.screenshot, stream, 0, 0)
            chunks = []
            while True:
                data = stream.recv(CHUNK)
                if not data:
                    break
                chunks.append(data)
            stream.finish()
        except BaseException:
            with contextlib.suppress(Exception):
                stream.abort()
            raise
        data = b"".join(chunks)
        return ppm_to_png(data) if "pixmap" in str(mime) or data[:2] == b"P6" else data

    def vnc_info(self, name: str) -> dict[str, Any]:
        domain = self._domain(name)
        graphics = domxml.parse(self._xml(domain, live=True)).find("devices/graphics")
        if self._state(domain) not in ("running", "paused") or graphics is None or \
                (graphics.get("websocket") or "-1") == "-1":
            raise ConflictError(f"VM {domain.name()!r} on {self.host.label} has no VNC websocket now; set its display "
                                "to vnc and start it")
        info = {"websocket_port": int(graphics.get("websocket")),   # type: ignore[arg-type]
                "password": graphics.get("passwd") or "", "host": "127.0.0.1"}
        if self.host.remote:
            # The host serves it on its own loopback; the screen is reached through an SSH tunnel to it.
            info["host_address"] = self.conn.getHostname()
            info["tunnel"] = f"ssh -N -L {info['websocket_port']}:127.0.0.1:{info['websocket_port']} " \
                             f"{_ssh_target(self.host.uri)}"
        return info

    # -- storage ----------------------------------------------------------------------------------------
    def pool(self) -> Any:
        """The host's Thalunix pool, made (a directory pool under /var/lib/libvirt/images) when missing."""
        libvirt = self.libvirt
        try:
            pool = self.conn.storagePoolLookupByName(self.host.pool)
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise self._error(f"looking up storage pool {self.host.pool!r}", error) from None
            path = DEFAULT_POOL_DIR if self.host.pool == "thalunix" else f"/var/lib/libvirt/images/{self.host.pool}"
            xml = (f"<pool type='dir'><name>{self.host.pool}</name><target><path>{path}</path></target></pool>")
            pool = self._call(f"making storage pool {self.host.pool!r}", self.conn.storagePoolDefineXML, xml, 0)
            self._call(f"making the folder of pool {self.host.pool!r}", pool.build, 0)
            with contextlib.suppress(libvirt.libvirtError):
                pool.setAutostart(1)
        if not pool.isActive():
            self._call(f"starting storage pool {self.host.pool!r}", pool.create, 0)
        return pool

    def new_volume(self, name: str, capacity: int, fmt: str) -> Any:
        pool = self.pool()
        name = domxml.safe_volume_name(name)
        with contextlib.suppress(self.libvirt.libvirtError):
            pool.refresh(0)
        if name in (pool.listVolumes() or []):
            raise ConflictError(f"{self.host.label}: pool {self.host.pool!r} already has a volume {name!r}; rename "
                                "the VM or delete that volume")
        xml = (f"<volume><name>{name}</name><capacity unit='bytes'>{capacity}</capacity>"
               f"<allocation unit='bytes'>0</allocation><target><format type='{fmt}'/></target></volume>")
        return self._call(f"making volume {name!r}", pool.createXML, xml, 0)

    def _volume_by_path(self, path: str) -> Any:
        try:
            if "/" in path and not path.startswith("/"):
                pool_name, volume = path.split("/", 1)
                return self.conn.storagePoolLookupByName(pool_name).storageVolLookupByName(volume)
            return self.conn.storageVolLookupByPath(path)
        except self.libvirt.libvirtError:
            raise ValidationError(f"{path!r} is not a storage volume on {self.host.label}; give a size for a new "
                                  "disk, or a volume the host has", "disk") from None

    def place_iso(self, iso: str, made: list[Any]) -> str:
        """The path on the host for an ISO: a local file as is (same machine), else uploaded once into the
        pool under a name made from its checksum (the same ISO is reused), or a volume the host already has."""
        local = Path(iso).expanduser()
        if local.is_file():
            if not self.host.remote:
                return str(local.absolute())
            digest = file_sha256(local)
            name = domxml.safe_volume_name(f"iso-{digest[:16]}-{local.name}")
            pool = self.pool()
            with contextlib.suppress(self.libvirt.libvirtError):
                return str(pool.storageVolLookupByName(name).path())
            volume = self.new_volume(name, local.stat().st_size, "raw")
            made.append(volume)
            self.upload(volume, local, expected=digest)
            return str(volume.path())
        return str(self._volume_by_path(iso).path())

    def upload(self, volume: Any, source: Path, progress: Callable[[float], None] | None = None,
               expected: str | None = None, cancelled: Callable[[], bool] | None = None) -> str:
        """Copy ``source`` into ``volume`` (virStorageVolUpload), then read it back and compare SHA-256.
        Returns the checksum; raises if the host's copy differs."""
        size = source.stat().st_size
        digest = hashlib.sha256()
        stream = self.conn.newStream(0)
        self._call("starting the upload", volume.upload, stream, 0, size, 0)
        sent = 0
        try:
            with open(source, "rb") as handle:
                while True:
                    if cancelled is not None and cancelled():
                        raise ThalunixError(f"upload of {source.name} cancelled")
                    block = handle.read(CHUNK)
                    if not block:
                        break
                    digest.update(block)
                    view = memoryview(block)
                    while view:
                        done = stream.send(bytes(view))
                        view = view[done:]
                    sent += len(block)
                    if progress:
                        progress(50.0 * sent / max(1, size))
            self._call("finishing the upload", stream.finish)
        except BaseException:
            with contextlib.suppress(Exception):
                stream.abort()
            raise
        local = digest.hexdigest()
        if expected and local != expected:
            raise ThalunixError(f"{source} changed while it was being uploaded; try again")
        remote = self.volume_sha256(volume, size, progress=(lambda p: progress(50 + p / 2)) if progress else None)
        if remote != local:
            raise ThalunixError(f"{self.host.label}: the uploaded copy of {source.name} differs from the original "
                                f"(SHA-256 {remote[:16]}… ≠ {local[:16]}…); nothing was moved")
        return local

    def volume_sha256(self, volume: Any, size: int | None = None,
                      progress: Callable[[float], None] | None = None, sink: Any = None) -> str:
        """SHA-256 of a volume's bytes, read through virStorageVolDownload (and written to ``sink`` if given)."""
        digest = hashlib.sha256()
        total = size or int(volume.info()[2]) or 1
        stream = self.conn.newStream(0)
        self._call("starting the download", volume.download, stream, 0, size or 0, 0)
        got = 0
        try:
            while True:
                data = stream.recv(CHUNK)
                if data == -2:
                    continue
                if not data:
                    break
                digest.update(data)
                if sink is not None:
                    sink.write(data)
                got += len(data)
                if progress:
                    progress(100.0 * min(got, total) / total)
            self._call("finishing the download", stream.finish)
        except BaseException:
            with contextlib.suppress(Exception):
                stream.abort()
            raise
        return digest.hexdigest()

    # -- snapshots and clones ---------------------------------------------------------------------------
    def snapshots(self, name: str) -> dict[str, Any]:
        domain = self._domain(name)
        current = None
        with contextlib.suppress(self.libvirt.libvirtError):
            current = domain.snapshotCurrent(0).getName()
        rows = []
        for snapshot in self._call("listing snapshots", domain.listAllSnapshots, 0):
            root = domxml.ET.fromstring(snapshot.getXMLDesc(0))
            rows.append({"name": snapshot.getName(), "description": root.findtext("description") or "",
                         "created": int(root.findtext("creationTime") or 0), "state": root.findtext("state") or "",
                         "live": (root.findtext("state") or "") in ("running", "paused"),
                         "current": snapshot.getName() == current})
        rows.sort(key=lambda row: row["created"])
        return {"vm": domain.name(), "host": self.host.name, "snapshots": rows}

    def snapshot_create(self, name: str, snapshot: str, description: str = "",
                        live: bool | None = None) -> dict[str, Any]:
        domain = self._domain(name)
        if not snapshot or any(c in snapshot for c in "/<>&'\"") or len(snapshot) > 64:
            raise ValidationError(f"snapshot: {snapshot!r} is not a snapshot name; use letters, digits, '.', '_' "
                                  "and '-'", "snapshot")
        if snapshot in (domain.snapshotListNames(0) or []):
            raise ConflictError(f"VM {domain.name()!r} already has a snapshot named {snapshot!r}")
        root = domxml.ET.Element("domainsnapshot")
        domxml.ET.SubElement(root, "name").text = snapshot
        domxml.ET.SubElement(root, "description").text = description
        flags = 0
        if live is False and self._state(domain) in ("running", "paused"):
            flags |= self.libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        self._call(f"taking snapshot {snapshot!r}", domain.snapshotCreateXML, domxml.to_text(root), flags)
        return next(row for row in self.snapshots(name)["snapshots"] if row["name"] == snapshot)

    def snapshot_revert(self, name: str, snapshot: str) -> dict[str, Any]:
        domain = self._domain(name)
        found = self._call(f"finding snapshot {snapshot!r}", domain.snapshotLookupByName, snapshot, 0)
        self._call(f"reverting to snapshot {snapshot!r}", domain.revertToSnapshot, found, 0)
        return {"reverted": snapshot, "state": self._state(domain)}

    def snapshot_delete(self, name: str, snapshot: str) -> dict[str, Any]:
        domain = self._domain(name)
        found = self._call(f"finding snapshot {snapshot!r}", domain.snapshotLookupByName, snapshot, 0)
        self._call(f"deleting snapshot {snapshot!r}", found.delete, 0)
        return {"deleted": snapshot}

    def clone(self, name: str, new_name: str, linked: bool = False, tpm: str = "fresh",
              wait: bool = False) -> dict[str, Any]:
        """A full clone: the domain's Thalunix-made volumes copied by the host, new UUID, name and MACs."""
        if linked:
            raise ValidationError("linked: linked clones are not offered on libvirt hosts; make a full clone",
                                  "linked")
        domain = self._domain(name)
        if self._state(domain) not in ("stopped", "crashed"):
            raise ConflictError(f"VM {domain.name()!r} on {self.host.label} is running; stop it before cloning it")
        self._refuse_taken(new_name)
        root = domxml.parse(self._xml(domain))
        view = domxml.config_from_xml(root)
        clone = domxml.config_from_xml(root).config
        clone.name = new_name
        clone.id = uuidlib.uuid4().hex
        for nic in clone.nics:
            nic.mac = random_mac()
        validate(clone, self.limits)
        made: list[Any] = []
        try:
            paths: dict[str, str] = {}
            for disk in view.config.disks:
                if disk.path not in view.owned_volumes:
                    continue   # a disk Thalunix did not make is shared, as libvirt would
                source = self._volume_by_path(disk.path)
                target_name = domxml.safe_volume_name(f"{new_name}-{disk.id}.{'qcow2' if disk.format == 'qcow2' else 'img'}")
                xml = (f"<volume><name>{target_name}</name><capacity unit='bytes'>{source.info()[1]}</capacity>"
                       f"<target><format type='{disk.format}'/></target></volume>")
                pool = source.storagePoolLookupByVolume()
                if target_name in (pool.listVolumes() or []):
                    raise ConflictError(f"{self.host.label}: pool already has a volume {target_name!r}")
                copy = self._call(f"copying {disk.path}", pool.createXMLFrom, xml, source, 0)
                made.append(copy)
                paths[disk.id] = copy.path()
            uuid_element = root.find("uuid")
            assert uuid_element is not None
            uuid_element.text = domxml._uuid(clone.id)
            rebased = domxml.rebase_drives(clone, paths)
            domxml.apply_changes(root, view.config, rebased)
            domxml.set_owned_volumes(root, {v.path(): "" for v in made})
            for graphics in root.findall("devices/graphics"):
                for key in ("port", "websocket"):
                    if graphics.get(key) not in (None, "-1"):
                        graphics.set(key, "-1")
            self._call(f"defining clone {new_name!r}", self.conn.defineXML, domxml.to_text(root))
        except BaseException:
            for volume in made:
                with contextlib.suppress(Exception):
                    volume.delete(0)
            raise
        self.bus.publish("vm.config", vm=clone.id, name=new_name, change="created", host=self.host.name)
        return {"id": None, "kind": "vm.clone", "state": "done", "result": {"name": new_name, "id": clone.id}}


def _is_shared_iso(volume: Any) -> bool:
    with contextlib.suppress(Exception):
        return str(volume.name()).startswith("iso-")
    return False


def _ssh_target(uri: str) -> str:
    import urllib.parse
    parsed = urllib.parse.urlsplit(uri)
    user = f"{parsed.username}@" if parsed.username else ""
    return f"{user}{parsed.hostname}" + (f" -p {parsed.port}" if parsed.port else "")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()
