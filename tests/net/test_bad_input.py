"""Bad input: malformed forwards, duplicate MACs, unknown networks, bridges without rights, USB ids,
and an agent that never answers (timeout, then the ACPI fallback) — clear errors, VM state unchanged."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from thalunix import agent, net, usb
from thalunix.cli import main as cli
from thalunix.engine import DirectEngine
from thalunix.errors import ConflictError, NotFoundError, ValidationError
from thalunix.model import Nic, PortForward, VMConfig

from .conftest import boot


@pytest.mark.parametrize("spec, words", [
    ("tcp:80", "tcp:HOSTPORT:GUESTPORT"), ("sctp:1:2", "use tcp or udp"), ("tcp:a:b", "must be numbers"),
    ("tcp:0:22", "out of range"), ("udp:70000:53", "out of range"), ("tcp:example.com:80:80", "not an IPv4"),
    ("", "tcp:HOSTPORT:GUESTPORT"), ("tcp:1:2:3:4", "tcp:HOSTPORT:GUESTPORT"),
])
def test_malformed_forward_specs(spec: str, words: str) -> None:
    with pytest.raises(ValidationError) as error:
        PortForward.parse(spec)
    assert words in str(error.value)


def test_bad_forwards_and_cards_leave_the_vm_unchanged(engine: DirectEngine, make_vm) -> None:
    make_vm("web")
    before = engine.get("web").to_dict()
    with pytest.raises(ValidationError, match="tcp:HOSTPORT:GUESTPORT"):
        engine.forward_add("web", "tcp:80")
    engine.forward_add("web", "tcp:8080:80")
    with pytest.raises(ValidationError, match="forwarded twice"):
        engine.forward_add("web", "tcp:8080:81")
    with pytest.raises(ValidationError, match="no card 3"):
        engine.forward_add("web", "tcp:8081:80", card=3)
    with pytest.raises(NotFoundError, match="forwards no host port"):
        engine.forward_remove("web", "9999")
    with pytest.raises(ValidationError, match="only a NAT card"):
        engine.nic_add("web", mode="private", network="lab", forwards=["tcp:2222:22"])
    with pytest.raises(ValidationError, match="needs either a host bridge"):
        engine.nic_add("web", mode="bridge")
    with pytest.raises(ValidationError, match="network name"):
        engine.network_create("../etc")
    assert engine.get("web").nics[0].forwards == [PortForward("tcp", 8080, 80)]
    engine.forward_remove("web", "tcp:8080")
    assert engine.get("web").to_dict()["nics"] == before["nics"]


def test_duplicate_macs_are_refused_and_generated_ones_are_unique(engine: DirectEngine, make_vm) -> None:
    first = make_vm("one")
    make_vm("two")
    taken = first.nics[0].mac
    with pytest.raises(ValidationError) as error:
        engine.edit("two", {"nics": [{"mode": "user", "mac": taken}]})
    assert taken in str(error.value) and "'one'" in str(error.value) and error.value.field == "nics[0].mac"
    with pytest.raises(ValidationError, match="used by two network cards"):
        engine.edit("two", {"nics": [{"mac": "52:54:00:aa:bb:cc"}, {"mac": "52:54:00:AA:BB:CC"}]})
    with pytest.raises(ValidationError, match="multicast"):
        engine.nic_add("two", mac="53:54:00:00:00:01")
    rows = engine.nic_add("two", mode="restricted")
    macs = [nic.mac for entry in engine.data.list_vms() for nic in entry.config.nics]
    assert len(macs) == len(set(macs)) == 3 and rows[1]["mode"] == "restricted"
    # A clone gets MACs of its own.
    engine.clone("one", "three", wait=True)
    macs = [nic.mac for entry in engine.data.list_vms() for nic in entry.config.nics]
    assert len(macs) == len(set(macs)) == 4


def test_unknown_network_is_refused_at_edit_and_at_start(engine: DirectEngine, make_vm) -> None:
    make_vm("lonely")
    with pytest.raises(ValidationError) as error:
        engine.nic_add("lonely", mode="private", network="nowhere")
    assert "'nowhere'" in str(error.value) and "thalunix net create nowhere" in str(error.value)
    assert len(engine.get("lonely").nics) == 1
    # A network deleted behind the VM's back (hand-edited data folder): the start says which.
    engine.network_create("gone")
    engine.nic_add("lonely", mode="private", network="gone")
    engine.data.network_file("gone").unlink()
    with pytest.raises(net.NetworkError) as error:
        engine.start("lonely")
    assert "card 2" in str(error.value) and "'gone'" in str(error.value)
    assert engine.status("lonely")["state"] == "stopped"
    with pytest.raises(NotFoundError, match="no network 'gone'"):
        engine.network_delete("gone")
    engine.network_create("used")
    engine.nic_add("lonely", mode="private", network="used")
    with pytest.raises(ConflictError, match="used by VM"):
        engine.network_delete("used")
    assert [row["name"] for row in engine.networks()] == ["used"]


def _bridge_vm(**nic: str) -> VMConfig:
    config = VMConfig(name="br", nics=[Nic(mode="bridge", **nic)])
    config.set_defaults()
    return config


def test_bridge_errors_name_what_is_missing(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    (sysfs / "br0" / "bridge").mkdir(parents=True)
    (sysfs / "tap7").mkdir(parents=True)
    (sysfs / "tap7" / "owner").write_text("4242\n")
    helper = tmp_path / "qemu-bridge-helper"
    helper.write_bytes(b"")
    conf = tmp_path / "bridge.conf"

    def error(config: VMConfig, **kwargs: object) -> str:
        with pytest.raises(net.NetworkError) as caught:
            net.check_bridge(config, 0, sysfs=sysfs, conf=conf, is_root=False, **kwargs)   # type: ignore[arg-type]
        return str(caught.value)

    assert "no bridge 'br9'" in error(_bridge_vm(bridge="br9"), helper=str(helper))
    assert "qemu-bridge-helper was not found" in error(_bridge_vm(bridge="br0"), helper="")
    helper.chmod(0o755)
    assert "lacks the setuid bit" in error(_bridge_vm(bridge="br0"), helper=str(helper))
    helper.chmod(0o4755)
    assert f"{conf} is missing" in error(_bridge_vm(bridge="br0"), helper=str(helper))
    conf.write_text("allow virbr0\n")
    assert "echo 'allow br0' >>" in error(_bridge_vm(bridge="br0"), helper=str(helper))
    conf.write_text("# comment\nallow br0\n")
    net.check_bridge(_bridge_vm(bridge="br0"), 0, sysfs=sysfs, conf=conf, is_root=False, helper=str(helper))
    assert "no TAP device 'tap9'" in error(_bridge_vm(tap="tap9"))
    if os.getuid() != 4242:
        assert "belongs to user id 4242" in error(_bridge_vm(tap="tap7"))
    assert "no TAP-Windows adapter" in _windows_error(_bridge_vm(tap="Ethernet 3"), [])
    assert "installed: TAP-Lab" in _windows_error(_bridge_vm(tap="Ethernet 3"), ["TAP-Lab"])


def _windows_error(config: VMConfig, adapters: list[str]) -> str:
    with pytest.raises(net.NetworkError) as caught:
        net._check_windows_tap(config, 0, adapters)
    return str(caught.value)


def test_windows_tap_adapters_are_found_by_component_id() -> None:
    rows = [{"ComponentId": "tap0901", "Name": "TAP-Lab"}, {"ComponentId": "PCI\\VEN_8086", "Name": "Ethernet"},
            {"ComponentId": "TAP0901", "Name": "OpenVPN TAP"}, {"ComponentId": "tap0901"}]
    assert net.parse_windows_adapters(rows) == ["OpenVPN TAP", "TAP-Lab"]


def test_host_usb_listing_from_a_sysfs_tree(tmp_path: Path) -> None:
    root = tmp_path / "devices"

    def device(name: str, **attrs: str) -> None:
        (root / name).mkdir(parents=True)
        for key, value in attrs.items():
            (root / name / key).write_text(value + "\n")
    device("usb1", idVendor="1d6b", idProduct="0002", bDeviceClass="09", busnum="1", devnum="1", product="xHCI Host")
    device("1-1", idVendor="0781", idProduct="5567", bDeviceClass="00", busnum="1", devnum="4",
           manufacturer="SanDisk", product="Cruzer Blade", serial="4C53", speed="480")
    device("1-1:1.0", bInterfaceClass="08")
    device("2-3.1", idVendor="046D", idProduct="C52B", bDeviceClass="00", busnum="2", devnum="7")
    rows = usb.parse_sysfs(root)
    assert [r["id"] for r in rows] == ["0781:5567", "046d:c52b"]
    assert rows[0]["product"] == "Cruzer Blade" and rows[0]["node"] == "/dev/bus/usb/001/004"
    assert rows[0]["manufacturer"] == "SanDisk" and rows[0]["port"] == "1-1" and rows[0]["speed"] == "480"
    assert rows[1]["product"] == "USB device" and rows[1]["bus"] == 2
    assert usb.parse_sysfs(tmp_path / "nothing") == []
    config = VMConfig(name="u", usb_devices=["0781:5567", "dead:beef"])
    assert usb.present_at_start(config, rows) == (("usb-0781-5567", "0781:5567"),)


def test_host_usb_listing_from_windows_pnp() -> None:
    rows = [{"DeviceID": "USB\\VID_0781&PID_5567\\4C530001230804117423", "Name": "USB Mass Storage Device",
             "Manufacturer": "Compatible USB storage device"},
            {"DeviceID": "USB\\VID_046D&PID_C52B&MI_00\\7&1A2B", "Name": "Logitech receiver part"},
            {"DeviceID": "USB\\VID_046D&PID_C52B\\6&2F0C", "Name": "USB Composite Device"},
            {"DeviceID": "USB\\ROOT_HUB30\\4&1", "Name": "USB Root Hub (USB 3.0)"},
            {"DeviceID": "USB\\VID_8087&PID_0029\\5&3", "Name": "Generic USB Hub"},
            {"DeviceID": "PCI\\VEN_8086&DEV_A36D", "Name": "xHCI controller"}]
    found = usb.parse_windows_pnp(rows)
    assert [(d["id"], d["product"]) for d in found] == [("046d:c52b", "USB Composite Device"),
                                                        ("0781:5567", "USB Mass Storage Device")]
    assert found[1]["serial"] == "4C530001230804117423"


def test_bad_usb_ids_and_a_vm_that_is_not_running(engine: DirectEngine, make_vm) -> None:
    make_vm("usbvm")
    for bad in ("0781-5567", "zzzz:0001", "", "usb-speaker"):
        with pytest.raises(ValidationError, match="vendor:product"):
            engine.usb_attach("usbvm", bad)
    with pytest.raises(ConflictError, match="not running"):
        engine.usb_attach("usbvm", "usb-kbd")
    with pytest.raises(ValidationError, match="usb_devices"):
        engine.edit("usbvm", {"usb_devices": ["0781:5567", "0781:5567"]})
    with pytest.raises(NotFoundError, match="neither plugged in nor remembered"):
        engine.usb_detach("usbvm", "0781:5567")
    assert engine.get("usbvm").usb_devices == []


def test_agent_that_never_answers_times_out_then_stop_falls_back_to_acpi(engine: DirectEngine, make_vm) -> None:
    make_vm("silent")   # the plain test guest has the channel but no agent behind it
    boot(engine, "silent")
    started = time.monotonic()
    with pytest.raises(agent.AgentUnavailable) as error:
        engine.agent_info("silent")
    waited = time.monotonic() - started
    assert "did not answer" in str(error.value) and "VM 'silent'" in str(error.value)
    assert agent.PING_TIMEOUT - 0.5 <= waited < agent.PING_TIMEOUT + 5, waited
    job = engine.copy_in("silent", __file__, "/tmp/x", wait=True)   # the job fails with the same reason
    assert job["state"] == "failed" and "did not answer" in job["error"] and job["error_code"] == "agent-unavailable"
    assert engine.status("silent")["state"] == "running"
    # After a re-attach Thalunix cannot know whether the guest runs an agent (agent_open is None), so stop asks
    # it first, waits PING_TIMEOUT, then presses the power button. (Re-attaching in this very process would leave
    # the first session's child waiter racing the second for last-exit.json.)
    session = engine.supervisor.sessions[engine.get("silent").id]
    session.agent_open = None
    started = time.monotonic()
    status = engine.stop("silent", timeout=120)
    log = engine.read_log("silent")
    assert status["state"] == "stopped", (status, log)
    assert "pressing the ACPI power button" in log and "asked the guest agent" not in log
    assert b"THALUNIX-GUEST-POWEROFF" in engine.serial_output("silent")
    assert time.monotonic() - started >= agent.PING_TIMEOUT - 0.5


def test_cli_network_commands(engine: DirectEngine, make_vm, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    make_vm("clivm")
    engine.close()

    def run(*args: str) -> tuple[int, str, str]:
        code = cli(["--data-dir", str(data_dir), *args])
        out, err = capsys.readouterr()
        return code, out, err
    assert run("net", "create", "lab", "--description", "test")[0] == 0
    code, out, _ = run("net", "list", "--json")
    assert code == 0 and json.loads(out)[0]["name"] == "lab"
    assert run("vm", "net", "clivm", "add", "--mode", "private", "--network", "lab")[0] == 0
    assert run("vm", "net", "clivm", "forward", "add", "udp:127.0.0.1:5353:53")[0] == 0
    code, out, _ = run("vm", "net", "clivm", "list")
    assert "private" in out and "lab" in out and "udp:127.0.0.1:5353:53" in out
    code, _, err = run("vm", "net", "clivm", "forward", "add", "tcp:99999:1")
    assert code == 1 and "out of range" in err
    code, _, err = run("vm", "net", "clivm", "add", "--mode", "private", "--network", "nope")
    assert code == 1 and "'nope'" in err
    code, _, err = run("net", "delete", "lab")
    assert code == 1 and "clivm" in err
    assert run("vm", "net", "clivm", "remove", "2")[0] == 0
    assert run("net", "delete", "lab")[0] == 0
    code, _, err = run("vm", "share", "clivm", "/no/such/folder")
    assert code == 1 and "not a folder" in err
    code, _, err = run("vm", "copy-in", "clivm", "/no/such/file", "/tmp/x")
    assert code == 1 and "not a file" in err
    code, _, err = run("vm", "agent", "clivm", "info")
    assert code == 1 and "not running" in err
    assert run("usb", "list")[0] == 0
    code, out, _ = run("doctor")
    assert code == 0 and "Networks: private networks ok (dgram on 127.0.0.1" in out
