"""Model ⇄ domain XML: a domain defined with ``virsh define`` with devices Thalunix does not model keeps all of
them through an edit of its RAM (canonicalised XML compared), and the mapping's own round trips (pure)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from thalunix.errors import ConflictError, ValidationError
from thalunix.events import EventBus
from thalunix.libvirt import xml as domxml
from thalunix.libvirt.engine import LibvirtEngine
from thalunix.libvirt.hosts import Host, connect
from thalunix.model import CDRom, Disk, Nic, VMConfig

FOREIGN = """<domain type='qemu'>
  <name>foreign</name>
  <uuid>5d1c4e0a-4f1b-4d7e-9a53-0c6f3b1f2a10</uuid>
  <title>made by hand</title>
  <memory unit='MiB'>300</memory>
  <currentMemory unit='MiB'>300</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <cputune><shares>512</shares></cputune>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/><pae/></features>
  <clock offset='utc'><timer name='rtc' tickpolicy='catchup'/></clock>
  <on_crash>restart</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
      <serial>FOREIGN-0001</serial>
      <iotune><total_bytes_sec>10485760</total_bytes_sec></iotune>
    </disk>
    <interface type='user'><mac address='52:54:00:aa:bb:01'/><model type='e1000'/></interface>
    <watchdog model='i6300esb' action='poweroff'/>
    <memballoon model='virtio' autodeflate='on' freePageReporting='on'>
      <stats period='7'/>
    </memballoon>
    <rng model='virtio'><rate bytes='1024' period='1000'/><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>
"""


def _without_memory(text: str) -> str:
    root = domxml.parse(text)
    for tag in ("memory", "currentMemory"):
        element = root.find(tag)
        assert element is not None
        root.remove(element)
    return domxml.canonical(domxml.to_text(root))


def test_virsh_defined_domain_keeps_unknown_devices_through_a_ram_edit(local_daemon, tmp_path: Path) -> None:
    disk = tmp_path / "foreign.img"
    disk.write_bytes(b"\0" * (1 << 20))
    definition = tmp_path / "foreign.xml"
    definition.write_text(FOREIGN.format(disk=disk))
    virsh = ["virsh", "-c", local_daemon.uri]
    subprocess.run([*virsh, "define", str(definition)], check=True, capture_output=True, timeout=60)
    dump = [*virsh, "dumpxml", "--inactive", "--security-info", "foreign"]
    host = Host("lab", local_daemon.uri)
    engine = LibvirtEngine(host, connect(host), EventBus())
    try:
        before = subprocess.run(dump, check=True, capture_output=True, text=True, timeout=60).stdout
        row = next(r for r in engine.list() if r["name"] == "foreign")
        assert not row["managed"]
        assert {"devices/watchdog", "devices/rng", "cputune", "clock", "title", "features/pae"} <= set(row["unmodeled"])
        view = engine.describe("foreign")
        assert view["ram_mib"] == 300 and view["machine"] == "pc" and view["disks"][0]["format"] == "raw"

        engine.edit("foreign", {"ram_mib": 384})

        after = subprocess.run(dump, check=True, capture_output=True, text=True, timeout=60).stdout
        assert engine.get("foreign").ram_mib == 384
        assert domxml.parse(after).findtext("memory") == str(384 * 1024)
        # Everything else — the watchdog, the balloon's options, the disk's tuning, the CPU shares — is unchanged.
        assert _without_memory(after) == _without_memory(before)
        for kept in ("<watchdog model='i6300esb' action='poweroff'", "autodeflate='on'", "<stats period='7'/>",
                     "<total_bytes_sec>10485760</total_bytes_sec>", "<shares>512</shares>", "FOREIGN-0001"):
            assert kept in after

        # An edit that changes nothing rewrites nothing.
        engine.edit("foreign", {"ram_mib": 384})
        assert subprocess.run(dump, check=True, capture_output=True, text=True, timeout=60).stdout == after
        with pytest.raises(ValidationError):
            engine.edit("foreign", {"ram_mib": 1})
        with pytest.raises(ValidationError):
            engine.edit("foreign", {"id": "0" * 32})
        # Deleting a foreign domain leaves its disk alone: Thalunix did not make it.
        engine.delete("foreign")
        assert disk.is_file()
    finally:
        subprocess.run([*virsh, "undefine", "foreign"], capture_output=True, timeout=60)
        engine.close()


def test_rename_and_name_clash(local_daemon, tmp_path: Path) -> None:
    host = Host("lab", local_daemon.uri)
    engine = LibvirtEngine(host, connect(host), EventBus())
    virsh = ["virsh", "-c", local_daemon.uri]
    try:
        for name, uuid in (("one", "11111111-1111-4111-8111-111111111111"),
                           ("two", "22222222-2222-4222-8222-222222222222")):
            text = FOREIGN.replace("foreign", name).replace("5d1c4e0a-4f1b-4d7e-9a53-0c6f3b1f2a10", uuid)
            (tmp_path / f"{name}.xml").write_text(text.format(disk=tmp_path / f"{name}.img"))
            subprocess.run([*virsh, "define", str(tmp_path / f"{name}.xml")], check=True, capture_output=True)
        with pytest.raises(ConflictError):
            engine.edit("one", {"name": "two"})
        engine.edit("one", {"name": "uno", "cpus": 2})
        assert engine.get("uno").cpus == 2
        assert "<watchdog" in engine.describe("uno")["xml"]
    finally:
        for name in ("one", "uno", "two"):
            subprocess.run([*virsh, "undefine", name], capture_output=True)
        engine.close()


def _config(**changes: object) -> VMConfig:
    config = VMConfig(name="pure", ram_mib=512, cpus=2, firmware="uefi-secure", tpm="on", os="windows11",
                      disks=[Disk(path="/pool/pure-disk0.qcow2", bus="virtio"), Disk(path="/pool/data.img", bus="sata")],
                      cdroms=[CDRom(path="/isos/x.iso")], nics=[Nic(model="e1000e")], boot_order=["cdrom", "disk"])
    for key, value in changes.items():
        setattr(config, key, value)
    config.set_defaults()
    return config


@pytest.mark.parametrize("firmware", ["bios", "uefi", "uefi-secure"])
def test_new_domain_reads_back_as_the_same_config(firmware: str) -> None:
    config = _config(firmware=firmware)
    root = domxml.new_domain_xml(config, "qemu")
    back = domxml.config_from_xml(domxml.parse(domxml.to_text(root)))
    assert back.managed and back.notes == []
    expected = config.to_dict()
    expected["accel"] = "tcg"
    assert back.config.to_dict() == expected
    text = domxml.to_text(root)
    if firmware == "uefi-secure":
        assert "firmware=\"efi\"" in text and "name=\"secure-boot\"" in text and "<smm state=\"on\"" in text
    assert "<backend type=\"emulator\" version=\"2.0\"" in text and "websocket=\"-1\"" in text


def test_apply_changes_touches_only_what_changed() -> None:
    config = _config()
    root = domxml.new_domain_xml(config, "kvm")
    # Someone else's devices and settings in the tree:
    domxml.ET.SubElement(root.find("devices"), "watchdog", model="i6300esb", action="reset")
    original = domxml.canonical(domxml.to_text(root))
    assert domxml.apply_changes(root, config, _config(id=config.id, created=config.created,
                                                      nics=config.nics, disks=config.disks)) == []
    assert domxml.canonical(domxml.to_text(root)) == original
    changed = _config(id=config.id, created=config.created, nics=config.nics, cpus=4)
    changed.disks = [Disk(path="/pool/pure-disk0.qcow2", bus="virtio", id="disk0", format="qcow2"),
                     Disk(path="/pool/data.img", bus="scsi", id="disk1", format="raw")]
    assert domxml.apply_changes(root, config, changed) == ["cpus", "disks"]
    back = domxml.config_from_xml(root).config
    assert back.cpus == 4 and [d.bus for d in back.disks] == ["virtio", "scsi"]
    assert root.find("devices/watchdog") is not None
    targets = [t.get("dev") for t in root.iter("target") if t.get("dev")]
    assert len(targets) == len(set(targets))


def test_bad_xml_is_refused() -> None:
    with pytest.raises(ValidationError):
        domxml.parse("<domain><name>x</name>")
    with pytest.raises(ValidationError):
        domxml.parse("<network/>")
