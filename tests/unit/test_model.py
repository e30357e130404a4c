"""The VM model: units, forwards, names and validation messages."""

from __future__ import annotations

import pytest

from thalunix.errors import ValidationError
from thalunix.model import (CDRom, Disk, HostLimits, Nic, PortForward, VMConfig, format_size, parse_ram_mib,
                            parse_size, validate, validate_name)

HOST = HostLimits(cpus=4, ram_mib=8192)


def vm(**fields) -> VMConfig:
    config = VMConfig(name=fields.pop("name", "test"), **fields)
    config.set_defaults()
    return config


@pytest.mark.parametrize("text, expected", [
    ("20G", 20 << 30), ("512M", 512 << 20), ("1.5G", 3 << 29), ("1 GiB", 1 << 30), ("100", 100), (4096, 4096),
    ("2t", 2 << 40), ("10kb", 10 << 10)])
def test_sizes_with_units(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "not a size"), ("abc", "not a size"), ("-1G", "not a size"), ("0", "zero"), ("5X", "unknown unit"),
    ("1e9", "not a size"), (True, "expected a size")])
def test_bad_sizes(text, message) -> None:
    with pytest.raises(ValidationError, match=message):
        parse_size(text)


def test_ram_bare_number_is_mib() -> None:
    assert parse_ram_mib("2048") == 2048
    assert parse_ram_mib("2G") == 2048
    assert parse_ram_mib(512) == 512
    with pytest.raises(ValidationError, match="whole number of MiB"):
        parse_ram_mib("1000K")
    with pytest.raises(ValidationError, match="zero"):
        parse_ram_mib("0")


def test_format_size() -> None:
    assert format_size(20 << 30) == "20 GiB"
    assert format_size(3 << 29) == "1.5 GiB"
    assert format_size(12) == "12 B"


@pytest.mark.parametrize("spec, expected", [
    ("tcp:2222:22", PortForward("tcp", 2222, 22, "127.0.0.1")),
    ("8080:80", PortForward("tcp", 8080, 80, "127.0.0.1")),
    ("udp:5353:53", PortForward("udp", 5353, 53, "127.0.0.1")),
    ("tcp:0.0.0.0:8080:80", PortForward("tcp", 8080, 80, "0.0.0.0")),
])
def test_forward_specs(spec, expected) -> None:
    assert PortForward.parse(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("tcp:22", "write it as"), ("tcp:a:22", "ports must be numbers"), ("tcp:70000:22", "out of range"),
    ("sctp:1:2:3:4", "write it as"), ("tcp:999.1.1.1:80:80", "not an IPv4"), ("", "write it as"),
    ("tcp:0:22", "out of range")])
def test_malformed_forwards(spec, message) -> None:
    with pytest.raises(ValidationError, match=message):
        PortForward.parse(spec)


@pytest.mark.parametrize("name", ["../x", "", "   ", "a" * 300, "bad\x00name", "a/b", "a\\b", "-x", ".hidden",
                                  "CON", "nul.txt", "trailing.", "emoji😀"])
def test_hostile_names_refused(name) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_name(name)
    assert caught.value.field == "name"


@pytest.mark.parametrize("name", ["web", "Debian 12", "win11-test_2", "a.b", "x" * 64])
def test_good_names(name) -> None:
    assert validate_name(name) == name


def test_defaults_are_filled() -> None:
    config = vm(disks=[Disk(path="a.img"), Disk(path="b.qcow2")], cdroms=[CDRom(path="x.iso")])
    assert len(config.id) == 32
    assert [d.format for d in config.disks] == ["raw", "qcow2"]
    assert [d.id for d in config.disks] == ["disk0", "disk1"]
    assert config.cdroms[0].bus == "sata" and config.cdroms[0].id == "cd0"
    assert config.nics[0].mac.startswith("52:54:00:")
    assert vm(machine="pc", cdroms=[CDRom()]).cdroms[0].bus == "ide"
    assert vm(machine="pc", firmware="uefi-secure").machine == "q35"


def test_round_trip_through_dict() -> None:
    config = vm(disks=[Disk(path="a.qcow2")], nics=[Nic(forwards=[PortForward.parse("tcp:2222:22")])])
    assert VMConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("fields, message", [
    ({"ram_mib": 0}, "too small"), ({"ram_mib": 10**6}, "more than this host has"),
    ({"cpus": 0}, "at least 1"), ({"cpus": 64}, "more than this host"),
    ({"firmware": "coreboot"}, "not a valid firmware"), ({"accel": "xen"}, "not a valid accelerator"),
    ({"boot_order": []}, "boot order is empty"), ({"boot_order": ["disk", "disk"]}, "twice"),
    ({"boot_order": ["floppy"]}, "not a valid boot device"), ({"tpm": "yes"}, "not a valid TPM mode"),
])
def test_validation_messages(fields, message) -> None:
    config = vm()
    for key, value in fields.items():
        setattr(config, key, value)
    with pytest.raises(ValidationError, match=message):
        validate(config, HOST)


def test_secure_boot_needs_q35() -> None:
    config = vm(firmware="uefi-secure")
    config.machine = "pc"
    with pytest.raises(ValidationError, match="q35"):
        validate(config, HOST)


def test_missing_files_named() -> None:
    config = vm(cdroms=[CDRom(path="/nowhere/debian.iso")])
    with pytest.raises(ValidationError, match="ISO '/nowhere/debian.iso' does not exist") as caught:
        validate(config, HOST, file_exists=lambda path: False)
    assert caught.value.field == "cdroms[0].path"


def test_duplicate_macs_and_ports() -> None:
    config = vm(nics=[Nic(mac="52:54:00:00:00:01"), Nic(mac="52:54:00:00:00:01")])
    with pytest.raises(ValidationError, match="used by two network cards"):
        validate(config, HOST)
    config = vm(nics=[Nic(forwards=[PortForward.parse("2222:22")]), Nic(forwards=[PortForward.parse("2222:23")])])
    with pytest.raises(ValidationError, match="forwarded by two"):
        validate(config, HOST)
    config = vm(nics=[Nic(mac="53:54:00:00:00:01")])
    with pytest.raises(ValidationError, match="multicast"):
        validate(config, HOST)


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "cpus": "two"}, "cpus: expected a whole number"),
    ({"name": "x", "cpus": True}, "cpus: expected a whole number"),
    ({"name": "x", "disks": [{"path": 3}]}, r"disks\[0\].path: expected a string"),
    ({"name": "x", "nics": "user"}, "nics: expected a list"),
    ({"name": "x", "colour": "red"}, "unknown field"),
    ({"cpus": 1}, "missing required field 'name'"),
])
def test_from_dict_type_errors(data, message) -> None:
    with pytest.raises(ValidationError, match=message):
        VMConfig.from_dict(data)


def test_windows_guests_get_devices_their_installer_knows() -> None:
    config = vm(os="windows11", disks=[Disk(path="w.qcow2")])
    assert config.disks[0].bus == "sata" and config.nics[0].model == "e1000e"
    config = vm(disks=[Disk(path="l.qcow2")])
    assert config.disks[0].bus == "virtio" and config.nics[0].model == "virtio-net-pci"
