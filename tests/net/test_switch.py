"""The private-network switch on its own: MAC learning, flooding, frames from strangers dropped, the switch
process started on demand and leaving once its VMs are gone; the argv it leads to. Real UDP on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from thalunix import net
from thalunix.model import Nic, VMConfig
from thalunix.qemu.argv import Endpoint, LaunchPlan, build_argv
from thalunix.qemu.process import start_token
from thalunix.runtime import Capabilities
from thalunix.store import DataFolder, atomic_write_json


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def _frame(destination: str, source: str, payload: bytes = b"x" * 50) -> bytes:
    return bytes.fromhex(destination.replace(":", "")) + bytes.fromhex(source.replace(":", "")) + b"\x08\x00" + payload


def _record(data: DataFolder, vm_id: str, name: str, port: int, network: str = "lab") -> None:
    path = data.vm_path(vm_id, "run", "net.json")
    atomic_write_json(path, {"vm": name, "pid": os.getpid(), "token": start_token(os.getpid()),
                             "links": [{"network": network, "port": port, "switch": 0}]})


def test_switch_learns_floods_and_drops_strangers(tmp_path: Path) -> None:
    data = DataFolder.open(tmp_path / "data")
    net.create_network(data, "lab")
    switch = net.Switch(data, "lab")
    vms = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (*vms, stranger):
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.3)
    for index, sock in enumerate(vms):
        _record(data, f"{index:032x}", f"vm{index}", _port(sock))
    _record(data, "f" * 32, "elsewhere", _port(stranger), network="other")
    assert switch.scan() == 3

    def deliver(sock: socket.socket, frame: bytes) -> None:
        sock.sendto(frame, ("127.0.0.1", switch.port))
        data_, source = switch.sock.recvfrom(65536)
        switch.handle(data_, source)

    def got(sock: socket.socket) -> bytes | None:
        try:
            return sock.recv(65536)
        except socket.timeout:
            return None
    a, b, c = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"
    broadcast = _frame("ff:ff:ff:ff:ff:ff", a)
    deliver(vms[0], broadcast)                      # unknown/broadcast: everyone but the sender
    assert got(vms[1]) == broadcast and got(vms[2]) == broadcast and got(vms[0]) is None
    deliver(vms[1], _frame(a, b))                   # a is learnt: only vm0 gets it
    assert got(vms[0]) == _frame(a, b) and got(vms[2]) is None
    deliver(vms[0], _frame(b, a))
    assert got(vms[1]) == _frame(b, a) and got(vms[2]) is None
    deliver(stranger, _frame("ff:ff:ff:ff:ff:ff", c))   # not a VM on this network: dropped
    assert all(got(sock) is None for sock in vms)
    deliver(vms[2], b"\x01")                        # a nudge is no frame
    assert all(got(sock) is None for sock in vms[:2])
    assert switch.frames == 3


def test_switch_process_starts_on_demand_and_leaves_when_idle(tmp_path: Path) -> None:
    data = DataFolder.open(tmp_path / "data")
    with pytest.raises(Exception, match="no network 'lab'"):
        net.ensure_switch(data, "lab")
    net.create_network(data, "lab")
    port = net.ensure_switch(data, "lab")
    status = net.switch_status(data, "lab")
    assert status["running"] and status["port"] == port and status["pid"] != os.getpid()
    assert net.ensure_switch(data, "lab") == port          # the running one is reused
    # No VM runs on it: after its grace period (30 s in the process) and two idle scans it leaves.
    deadline = time.monotonic() + net.SWITCH_GRACE + 60
    while net.switch_status(data, "lab")["running"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not net.switch_status(data, "lab")["running"]
    assert net.ensure_switch(data, "lab") == port          # a new switch takes the same port again


def test_network_argv() -> None:
    config = VMConfig(name="n", firmware="bios", nics=[Nic(mode="user"), Nic(mode="private", network="lab"),
                                      Nic(mode="bridge", bridge="br0"), Nic(mode="bridge", tap="tap0")],
                      usb_devices=["0781:5567"])
    config.set_defaults()
    caps = Capabilities(netdevs=["user", "dgram", "bridge", "tap"])
    plan = LaunchPlan(qemu="qemu", qmp=Endpoint.unix("qmp.sock"), private_links=((1, 40001, 40002),),
                      agent=Endpoint.unix("qga.sock"), share=Endpoint.unix("share.sock"),
                      usb_host=(("usb-0781-5567", "0781:5567"),), bridge_helper="/usr/lib/qemu/qemu-bridge-helper")
    argv = build_argv(config, caps, plan)
    joined = " ".join(argv)
    assert "user,id=net0,guestfwd=tcp:10.0.2.100:80-unix:share.sock,,reconnect=1" in joined
    assert ("dgram,id=net1,local.type=inet,local.host=127.0.0.1,local.port=40001,remote.type=inet,"
            "remote.host=127.0.0.1,remote.port=40002") in joined
    assert "bridge,id=net2,br=br0,helper=/usr/lib/qemu/qemu-bridge-helper" in joined
    assert "tap,id=net3,ifname=tap0,script=no,downscript=no" in joined
    assert "usb-host,vendorid=0x0781,productid=0x5567,id=usb-0781-5567,bus=xhci.0" in joined
    assert "socket,id=qga0,path=qga.sock,server=on,wait=off" in joined
    assert "virtserialport,bus=vser0.0,chardev=qga0,id=qga0-port,name=org.qemu.guest_agent.0" in joined
    macs = [a for a in argv if a.startswith(("virtio-net-pci",))]
    assert len(macs) == 4 and len({m.split("mac=")[1].split(",")[0] for m in macs}) == 4
    old = build_argv(config, Capabilities(netdevs=["user", "socket"]), plan)
    assert "socket,id=net1,udp=127.0.0.1:40002,localaddr=127.0.0.1:40001" in " ".join(old)
    config.guest_agent = False
    assert "qga0" not in " ".join(build_argv(config, caps, plan))
