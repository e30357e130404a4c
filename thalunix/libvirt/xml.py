"""The Thalunix model ⇄ libvirt domain XML, editing an existing domain's XML in place.

:func:`config_from_xml` reads any domain (one Thalunix made, or one another tool defined) into a
:class:`~thalunix.model.VMConfig` plus what Thalunix does not model (shown read-only). :func:`new_domain_xml`
writes a fresh domain for a config, and :func:`apply_changes` edits an existing domain's tree: it compares
the config read from that tree with the wanted one and rewrites only the families of elements whose value
changed (memory, vCPUs, disks, …). Every element Thalunix does not own — a ``<watchdog>``, a
``<memballoon>`` with its options, CPU tuning, hostdevs — is left exactly as it was.

Owned elements: ``name``, ``memory``/``currentMemory``, ``vcpu``, the domain ``type``, ``os`` (machine,
firmware selection with Secure Boot, boot order), ``features/smm``, and in ``devices``: ``disk`` (disks and
CD-ROMs), ``interface``, ``graphics``/``video`` (VNC with a websocket), ``serial``/``console``, ``tpm``
(emulator, TPM 2.0), the tablet ``input``; plus Thalunix's own ``<metadata>`` element.

Example::

    tree = parse(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
    old = config_from_xml(tree).config
    new = VMConfig.from_dict({**old.to_dict(), "ram_mib": 512})
    apply_changes(tree, old, new)
    connection.defineXML(to_text(tree))     # the watchdog, memballoon, … untouched
"""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Iterable

from thalunix.errors import ValidationError
from thalunix.model import CDRom, Disk, Nic, VMConfig

#: Thalunix's own element inside ``<metadata>``: the model fields libvirt has no place for.
NS = "https://thalunix.dev/xmlns/libvirt/1"
ET.register_namespace("thalunix", NS)
_T = f"{{{NS}}}"

BUS_PREFIX = {"virtio": "vd", "sata": "sd", "scsi": "sd", "ide": "hd", "usb": "sd", "nvme": "nvme"}
NIC_MODELS = {"virtio-net-pci": "virtio", "e1000e": "e1000e", "e1000": "e1000", "rtl8139": "rtl8139"}
VGA_MODELS = {"std": "vga", "virtio": "virtio", "qxl": "qxl", "cirrus": "cirrus", "none": "none"}
BOOT_DEVS = {"disk": "hd", "cdrom": "cdrom", "network": "network"}
#: Device elements Thalunix reads and writes; every other child of <devices> is someone else's.
OWNED_DEVICES = ("disk", "interface", "graphics", "video", "serial", "console", "tpm", "input")
#: Top-level elements Thalunix reads and writes.
OWNED_TOP = ("name", "uuid", "memory", "currentMemory", "vcpu", "os", "devices", "metadata", "features")
#: Elements libvirt adds to every domain by itself (kept like everything else, but not listed as unmodelled).
LIBVIRT_DEFAULTS = {"devices/emulator", "devices/controller", "devices/audio", "on_poweroff", "on_reboot",
                    "on_crash", "resource", "seclabel", "pm"}
_UNITS = {"b": 1, "bytes": 1, "kb": 1000, "k": 1024, "kib": 1024, "mb": 10**6, "m": 1 << 20, "mib": 1 << 20,
          "gb": 10**9, "g": 1 << 30, "gib": 1 << 30, "tb": 10**12, "t": 1 << 40, "tib": 1 << 40}


@dataclass
class DomainView:
    """A domain as Thalunix sees it: the config, and what it shows read-only because it does not model it."""

    config: VMConfig
    #: Elements (by path) Thalunix keeps but does not model: ``devices/watchdog``, ``cputune``, …
    unmodeled: list[str] = field(default_factory=list)
    #: Values Thalunix could not express exactly (a NIC on a bridge, a SPICE display): shown, kept on save.
    notes: list[str] = field(default_factory=list)
    #: Volumes Thalunix made for this domain (deleted with it), with their recorded checksums.
    owned_volumes: dict[str, str] = field(default_factory=dict)
    managed: bool = False


def parse(text: str) -> ET.Element:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        raise ValidationError(f"the domain XML is not well-formed: {error}", "xml") from None
    if root.tag != "domain":
        raise ValidationError(f"the XML's root element is <{root.tag}>, not <domain>", "xml")
    return root


def to_text(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def canonical(text: str) -> str:
    """C14N of a domain XML with insignificant whitespace dropped: two equal domains give equal strings."""
    return ET.canonicalize(text, strip_text=True)


# -- reading --------------------------------------------------------------------------------------------------
def _mib(element: ET.Element | None) -> int:
    if element is None or not (element.text or "").strip():
        return 0
    factor = _UNITS.get((element.get("unit") or "KiB").lower(), 1024)
    return int(element.text.strip()) * factor >> 20   # type: ignore[union-attr]


def _meta(root: ET.Element) -> ET.Element | None:
    metadata = root.find("metadata")
    return metadata.find(f"{_T}vm") if metadata is not None else None


def _disk_source(disk: ET.Element) -> str:
    source = disk.find("source")
    if source is None:
        return ""
    if source.get("pool") and source.get("volume"):
        return f"{source.get('pool')}/{source.get('volume')}"
    return source.get("file") or source.get("dev") or source.get("name") or ""


def config_from_xml(root: ET.Element, host_ram_mib: int | None = None) -> DomainView:
    """The model of a domain; whatever the model cannot hold goes to ``unmodeled``/``notes``, never lost."""
    meta = _meta(root)

    def meta_text(name: str, default: str) -> str:
        element = meta.find(f"{_T}{name}") if meta is not None else None
        return (element.text or default) if element is not None else default

    uuid = (root.findtext("uuid") or "").replace("-", "").lower()
    name = root.findtext("name") or ""
    notes: list[str] = []
    config = VMConfig(name=name, id=uuid, cpus=int((root.findtext("vcpu") or "1").strip() or 1),
                      ram_mib=_mib(root.find("memory")), os=meta_text("os", "linux" if meta is not None else "other"),
                      created=meta_text("created", ""))
    config.accel = "tcg" if root.get("type") == "qemu" else ("kvm" if root.get("type") == "kvm" else "auto")
    os_element = root.find("os")
    machine = os_element.find("type").get("machine", "") if os_element is not None and os_element.find("type") is not None else ""
    config.machine = "q35" if "q35" in machine or not machine else "pc"
    config.firmware = _read_firmware(os_element)
    boots = [dev for dev in (b.get("dev") for b in os_element.findall("boot")) if dev] if os_element is not None else []
    reverse_boot = {v: k for k, v in BOOT_DEVS.items()}
    config.boot_order = [reverse_boot[dev] for dev in boots if dev in reverse_boot] or ["disk"]
    if not boots and os_element is not None:
        notes.append("boot order is set per device (<boot order=…>); shown as disk first")
    devices = root.find("devices")
    devices = devices if devices is not None else ET.Element("devices")
    config.disks, config.cdroms = [], []
    for element in devices.findall("disk"):
        target = element.find("target")
        bus = target.get("bus", "virtio") if target is not None else "virtio"
        driver = element.find("driver")
        kind = element.get("device", "disk")
        if kind == "cdrom":
            config.cdroms.append(CDRom(path=_disk_source(element), bus=bus if bus in ("sata", "ide", "scsi") else "sata",
                                       id=f"cd{len(config.cdroms)}"))
        elif kind == "disk":
            fmt = driver.get("type", "raw") if driver is not None else "raw"
            if fmt not in ("qcow2", "raw"):
                notes.append(f"disk {_disk_source(element)!r} is {fmt}, shown as raw")
            config.disks.append(Disk(path=_disk_source(element) or "(none)", format=fmt if fmt in ("qcow2", "raw") else "raw",
                                     bus=bus if bus in ("virtio", "sata", "nvme", "ide", "scsi") else "virtio",
                                     readonly=element.find("readonly") is not None, id=f"disk{len(config.disks)}"))
        else:
            notes.append(f"a {kind} drive is not modelled; kept as is")
    config.nics = []
    for element in devices.findall("interface"):
        mac = element.find("mac")
        model = element.find("model")
        kind = element.get("type", "user")
        if kind != "user":
            source = element.find("source")
            where = (source.get("network") or source.get("bridge") or "") if source is not None else ""
            notes.append(f"network card {mac.get('address') if mac is not None else ''} is on libvirt {kind} "
                         f"{where!r}; shown as user networking, kept as is")
        wanted_model = model.get("type", "virtio") if model is not None else "virtio"
        models = {v: k for k, v in NIC_MODELS.items()}
        config.nics.append(Nic(mode="user", model=models.get(wanted_model, "virtio-net-pci"),
                               mac=(mac.get("address", "") if mac is not None else "").lower()))
    graphics = devices.find("graphics")
    video = devices.find("video/model")
    config.display.kind = "vnc" if graphics is not None else "none"
    if graphics is not None and graphics.get("type") != "vnc":
        notes.append(f"the display is {graphics.get('type')}, not VNC; the embedded screen needs VNC")
    vga = {v: k for k, v in VGA_MODELS.items()}
    config.display.vga = vga.get(video.get("type", "vga"), "std") if video is not None else "none"
    config.serial = devices.find("serial") is not None or devices.find("console") is not None
    config.tpm = meta_text("tpm", "on") if devices.find("tpm") is not None else "off"
    if config.tpm == "off" and meta is not None and meta_text("tpm", "off") == "auto":
        config.tpm = "auto"
    config.usb_tablet = any(i.get("type") == "tablet" for i in devices.findall("input"))
    unmodeled = [f"devices/{child.tag}" for child in devices if child.tag not in OWNED_DEVICES
                 and not (child.tag == "memballoon" and child.get("model") == "none")]
    unmodeled += [child.tag for child in root if child.tag not in OWNED_TOP]
    # What libvirt fills in on every domain is not worth a "read-only" mark; it is kept all the same.
    unmodeled = [item for item in unmodeled if item not in LIBVIRT_DEFAULTS]
    features = root.find("features")
    if features is not None:
        unmodeled += [f"features/{child.tag}" for child in features if child.tag not in ("acpi", "apic", "smm")]
    owned: dict[str, str] = {}
    if meta is not None:
        for volume in meta.findall(f"{_T}volume"):
            owned[volume.get("path", "")] = volume.get("sha256", "")
    return DomainView(config=config, unmodeled=sorted(set(unmodeled)), notes=notes, owned_volumes=owned,
                      managed=meta is not None)


def _read_firmware(os_element: ET.Element | None) -> str:
    if os_element is None:
        return "bios"
    loader = os_element.find("loader")
    efi = os_element.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash")
    if not efi:
        return "bios"
    secure = loader is not None and loader.get("secure") == "yes"
    for feature in os_element.findall("firmware/feature"):
        if feature.get("name") == "secure-boot" and feature.get("enabled") == "yes":
            secure = True
    return "uefi-secure" if secure else "uefi"


# -- writing ----------------------------------------------------------------------------------------------------
def new_domain_xml(config: VMConfig, domain_type: str, network: str | None = None) -> ET.Element:
    """A fresh domain for ``config``: the skeleton, then every owned family written by :func:`apply_changes`."""
    root = ET.Element("domain", type=domain_type)
    ET.SubElement(root, "name").text = config.name
    ET.SubElement(root, "uuid").text = _uuid(config.id)
    ET.SubElement(root, "memory", unit="KiB").text = "0"
    ET.SubElement(root, "currentMemory", unit="KiB").text = "0"
    ET.SubElement(root, "vcpu").text = "0"
    os_element = ET.SubElement(root, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine=config.machine).text = "hvm"
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(root, "on_poweroff").text = "destroy"
    ET.SubElement(root, "on_reboot").text = "restart"
    ET.SubElement(root, "on_crash").text = "destroy"
    devices = ET.SubElement(root, "devices")
    # Guest memory reporting without a balloon Thalunix does not drive; users may add one, it is kept.
    ET.SubElement(devices, "memballoon", model="none")
    blank = VMConfig(name=config.name, id=config.id, cpus=0, ram_mib=0, machine=config.machine, firmware="bios",
                     disks=[], cdroms=[], boot_order=[], nics=[], serial=False, tpm="off", usb_tablet=False)
    blank.display.kind, blank.display.vga = "none", "none"
    blank.accel = config.accel
    ensure_metadata(root)
    apply_changes(root, blank, config, network=network, domain_type=domain_type)
    return root


def _uuid(hex_id: str) -> str:
    h = hex_id.replace("-", "")
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def apply_changes(root: ET.Element, old: VMConfig, new: VMConfig, network: str | None = None,
                  domain_type: str | None = None) -> list[str]:
    """Rewrite in ``root`` only the owned families whose value differs between ``old`` and ``new``.

    ``old`` must be what :func:`config_from_xml` read from ``root``. Returns the names of the families
    touched (empty when nothing changed: the tree is then byte-for-byte what it was).
    """
    touched: list[str] = []
    if new.name != old.name:
        root.find("name").text = new.name   # type: ignore[union-attr]
        touched.append("name")
    if new.ram_mib != old.ram_mib:
        for tag in ("memory", "currentMemory"):
            element = root.find(tag)
            if element is None:
                element = ET.SubElement(root, tag)
            element.set("unit", "KiB")
            element.text = str(new.ram_mib * 1024)
        touched.append("ram_mib")
    if new.cpus != old.cpus:
        root.find("vcpu").text = str(new.cpus)   # type: ignore[union-attr]
        touched.append("cpus")
    if new.accel != old.accel and domain_type:
        root.set("type", domain_type)
        touched.append("accel")
    os_element = root.find("os")
    assert os_element is not None
    if new.machine != old.machine:
        os_element.find("type").set("machine", new.machine)   # type: ignore[union-attr]
        touched.append("machine")
    if new.firmware != old.firmware:
        _write_firmware(root, os_element, new.firmware)
        touched.append("firmware")
    if new.boot_order != old.boot_order:
        for boot in os_element.findall("boot"):
            os_element.remove(boot)
        position = _insert_position(os_element, ("type", "firmware", "loader", "nvram"))
        for offset, device in enumerate(new.boot_order):
            os_element.insert(position + offset, ET.Element("boot", dev=BOOT_DEVS[device]))
        touched.append("boot_order")
    devices = root.find("devices")
    assert devices is not None
    if [d.to_dict() for d in new.disks] != [d.to_dict() for d in old.disks] or \
            [c.to_dict() for c in new.cdroms] != [c.to_dict() for c in old.cdroms]:
        _write_drives(devices, old, new)
        touched.append("disks")
    if [n.to_dict() for n in new.nics] != [n.to_dict() for n in old.nics]:
        _write_nics(devices, old.nics, new.nics, network)
        touched.append("nics")
    if new.display.kind != old.display.kind:
        for element in devices.findall("graphics"):
            devices.remove(element)
        if new.display.kind != "none":
            # Native windows make no sense on a host somewhere else: the screen is VNC either way, with the
            # websocket noVNC uses, on the host's loopback (reached through an SSH tunnel from afar).
            graphics = _device(devices, "graphics", type="vnc", port="-1", autoport="yes", websocket="-1",
                               listen="127.0.0.1")
            ET.SubElement(graphics, "listen", type="address", address="127.0.0.1")
        touched.append("display")
    if new.display.vga != old.display.vga:
        for element in devices.findall("video"):
            devices.remove(element)
        video = _device(devices, "video")
        ET.SubElement(video, "model", type=VGA_MODELS[new.display.vga])
        touched.append("vga")
    if new.serial != old.serial:
        for tag in ("serial", "console"):
            for element in devices.findall(tag):
                devices.remove(element)
        if new.serial:
            serial = _device(devices, "serial", type="pty")
            ET.SubElement(serial, "target", port="0")
            console = _device(devices, "console", type="pty")
            ET.SubElement(console, "target", type="serial", port="0")
        touched.append("serial")
    if (new.tpm == "off") != (old.tpm == "off"):
        for element in devices.findall("tpm"):
            devices.remove(element)
        if new.tpm != "off":
            tpm = _device(devices, "tpm", model="tpm-crb" if new.machine == "q35" else "tpm-tis")
            ET.SubElement(tpm, "backend", type="emulator", version="2.0")
        touched.append("tpm")
    if new.usb_tablet != old.usb_tablet:
        for element in devices.findall("input"):
            if element.get("type") == "tablet":
                devices.remove(element)
        if new.usb_tablet:
            _device(devices, "input", type="tablet", bus="usb")
        touched.append("usb_tablet")
    # A foreign domain gets Thalunix's metadata only when a value that lives nowhere else changes.
    if new.os != old.os or new.tpm != old.tpm or (_meta(root) is not None and new.created != old.created):
        meta = ensure_metadata(root)
        for name, value in (("os", new.os), ("tpm", new.tpm), ("created", new.created)):
            element = meta.find(f"{_T}{name}")
            if element is None:
                element = ET.SubElement(meta, f"{_T}{name}")
            element.text = value
        touched.append("metadata")
    return touched


def ensure_metadata(root: ET.Element) -> ET.Element:
    """Thalunix's own ``<thalunix:vm>`` element in ``<metadata>`` (made if missing)."""
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.Element("metadata")
        root.insert(_insert_position(root, ("name", "uuid", "title", "description")), metadata)
    meta = metadata.find(f"{_T}vm")
    if meta is None:
        meta = ET.SubElement(metadata, f"{_T}vm")
    return meta


def set_owned_volumes(root: ET.Element, volumes: dict[str, str]) -> None:
    """Record the volumes Thalunix made for this domain (path → sha256 when known), replacing the list."""
    meta = ensure_metadata(root)
    for element in meta.findall(f"{_T}volume"):
        meta.remove(element)
    for path, digest in volumes.items():
        element = ET.SubElement(meta, f"{_T}volume", path=path)
        if digest:
            element.set("sha256", digest)


def _insert_position(parent: ET.Element, after: Iterable[str]) -> int:
    position = 0
    wanted = set(after)
    for index, child in enumerate(parent):
        if child.tag in wanted:
            position = index + 1
    return position


def _device(devices: ET.Element, tag: str, **attributes: str) -> ET.Element:
    """A new device element placed after the last of its kind (libvirt's own order), else at the end."""
    element = ET.Element(tag, **attributes)
    same = [index for index, child in enumerate(devices) if child.tag == tag]
    devices.insert(same[-1] + 1 if same else len(devices), element)
    return element


def _write_firmware(root: ET.Element, os_element: ET.Element, firmware: str) -> None:
    for tag in ("loader", "nvram", "firmware"):
        for element in os_element.findall(tag):
            os_element.remove(element)
    os_element.attrib.pop("firmware", None)
    features = root.find("features")
    if features is None:
        features = ET.Element("features")
        root.insert(_insert_position(root, ("os",)), features)
    for smm in features.findall("smm"):
        features.remove(smm)
    if firmware == "bios":
        return
    # libvirt's firmware auto-selection picks OVMF and makes the per-domain NVRAM from its template.
    os_element.set("firmware", "efi")
    position = _insert_position(os_element, ("type",))
    selector = ET.Element("firmware")
    secure = "yes" if firmware == "uefi-secure" else "no"
    ET.SubElement(selector, "feature", enabled=secure, name="secure-boot")
    ET.SubElement(selector, "feature", enabled=secure, name="enrolled-keys")
    os_element.insert(position, selector)
    if firmware == "uefi-secure":
        os_element.insert(position + 1, ET.Element("loader", secure="yes"))
        ET.SubElement(features, "smm", state="on")


def _next_target(bus: str, used: set[str]) -> str:
    prefix = BUS_PREFIX.get(bus, "sd")
    for index in range(26 * 27):
        suffix = chr(97 + index) if index < 26 else chr(96 + index // 26) + chr(97 + index % 26)
        name = prefix + suffix
        if name not in used:
            used.add(name)
            return name
    raise ValidationError(f"no free target name for another {bus} drive", "disks")


def _write_drives(devices: ET.Element, old: VMConfig, new: VMConfig) -> None:
    """Update drives by position: a drive whose settings are unchanged keeps its element whole."""
    pairs: list[tuple[str, list[Any], list[Any]]] = [("disk", old.disks, new.disks), ("cdrom", old.cdroms, new.cdroms)]

    def of_kind(kind: str) -> list[ET.Element]:
        return [d for d in devices.findall("disk") if d.get("device", "disk") == kind]
    for kind, _, after in pairs:
        for element in of_kind(kind)[len(after):]:
            devices.remove(element)
    used = {t.get("dev", "") for d in devices.findall("disk") for t in d.findall("target")}
    for kind, before, after in pairs:
        elements = of_kind(kind)
        for index, drive in enumerate(after):
            element = elements[index] if index < len(elements) else None
            if element is not None and index < len(before) and before[index].to_dict() == drive.to_dict():
                continue
            if element is None:
                element = _device(devices, "disk", type="file", device=kind)
            _fill_drive(element, kind, drive, used)


def _fill_drive(element: ET.Element, kind: str, drive: Disk | CDRom, used: set[str]) -> None:
    """Set what Thalunix owns on one drive element, keeping its other children (iotune, serial, address…)."""
    path = drive.path
    element.set("device", kind)
    driver = element.find("driver")
    if driver is None:
        driver = ET.Element("driver", name="qemu")
        element.insert(0, driver)
    driver.set("type", drive.format if isinstance(drive, Disk) else "raw")
    source = element.find("source")
    if path:
        if "/" in path and not path.startswith("/"):
            pool, volume = path.split("/", 1)
            element.set("type", "volume")
            attributes = {"pool": pool, "volume": volume}
        else:
            element.set("type", "file")
            attributes = {"file": path}
        if source is None:
            source = ET.Element("source")
            element.insert(list(element).index(driver) + 1, source)
        for key in ("file", "pool", "volume", "dev", "name", "protocol"):
            source.attrib.pop(key, None)
        source.attrib.update(attributes)
    elif source is not None:
        element.remove(source)
        element.set("type", "file")
    target = element.find("target")
    if target is None or target.get("bus") != drive.bus:
        if target is None:
            target = ET.SubElement(element, "target")
        else:
            used.discard(target.get("dev", ""))
            for address in element.findall("address"):
                element.remove(address)   # a new bus puts the drive elsewhere; libvirt picks the address
        target.set("dev", _next_target(drive.bus, used))
        target.set("bus", drive.bus)
    readonly = element.find("readonly")
    wants_readonly = kind == "cdrom" or (isinstance(drive, Disk) and drive.readonly)
    if wants_readonly and readonly is None:
        ET.SubElement(element, "readonly")
    elif not wants_readonly and readonly is not None:
        element.remove(readonly)


def _write_nics(devices: ET.Element, old: list[Nic], new: list[Nic], network: str | None) -> None:
    elements = devices.findall("interface")
    for index, nic in enumerate(new):
        element = elements[index] if index < len(elements) else None
        if index < len(old) and element is not None and old[index].to_dict() == nic.to_dict():
            continue
        if nic.mode == "none":
            if element is not None:
                devices.remove(element)
            continue
        if element is None:
            element = _device(devices, "interface", type="network" if network else "user")
            if network:
                ET.SubElement(element, "source", network=network)
        for key, tag in (("mac", "mac"),):
            child = element.find(tag)
            if child is None:
                child = ET.Element(tag)
                element.insert(0, child)
            child.set("address", nic.mac)
        model = element.find("model")
        if model is None:
            model = ET.SubElement(element, "model")
        model.set("type", NIC_MODELS[nic.model])
    for element in elements[len(new):]:
        devices.remove(element)


def rebase_drives(config: VMConfig, paths: dict[str, str]) -> VMConfig:
    """A copy of ``config`` with drive paths replaced (drive id → new path), e.g. for a move to a host."""
    moved = copy.deepcopy(config)
    for drive in [*moved.disks, *moved.cdroms]:
        if drive.id in paths:
            drive.path = paths[drive.id]
    return moved


def safe_volume_name(text: str) -> str:
    """A volume file name from a VM name and a drive id (no spaces, slashes or leading dots)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".")
    return cleaned or "volume"
