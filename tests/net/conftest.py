"""Helpers for the network tests: boot the real test guest, run shell commands over its serial console,
configure its first card statically (user networking's 10.0.2.15, or a link-local address on a private network)."""

from __future__ import annotations

import itertools
import socket
from typing import Any

import pytest

from thalunix.engine import DirectEngine

READY = b"THALUNIX-GUEST-READY"
BOOT_TIMEOUT = 300
_counter = itertools.count(5000)


def boot(engine: DirectEngine, name: str) -> None:
    status = engine.start(name)
    assert status["state"] == "running", status
    config = engine.get(name)
    assert engine.supervisor.wait_serial(config, READY, BOOT_TIMEOUT), \
        engine.supervisor.serial_output(config)[-2000:]


def run(engine: DirectEngine, name: str, command: str, timeout: float = 120) -> str:
    """Run ``command`` in the guest; what it printed on stdout, stripped (framed by numbers the guest computes,
    so the echoed command line never matches)."""
    config = engine.get(name)
    number = next(_counter)
    engine.supervisor.send_serial(config, f"echo \"B$(({number}+0))<$({command})>E$(({number}+1))\"\n".encode())
    end = f"E{number + 1}".encode()
    assert engine.supervisor.wait_serial(config, end, timeout), engine.supervisor.serial_output(config)[-1500:]
    text = engine.supervisor.serial_output(config).decode("utf-8", "replace")
    begin = text.rindex(f"B{number}<")
    return text[begin + len(f"B{number}<"): text.rindex(f">E{number + 1}")].strip()


def nat_up(engine: DirectEngine, name: str) -> None:
    """The guest's eth0 on QEMU's user network, as its DHCP would set it (busybox has no udhcpc script)."""
    out = run(engine, name, "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && "
                            "ip route add default via 10.0.2.2 && echo NET-UP")
    assert out.endswith("NET-UP"), out


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def nat_vm(engine: DirectEngine, make_vm):
    """A stopped test-guest VM whose first card is edited by the caller."""
    def make(name: str, **nic: Any):
        make_vm(name)
        config = engine.get(name)
        nics = [n.to_dict() for n in config.nics]
        nics[0].update(nic)
        engine.edit(name, {"nics": nics})
        return engine.get(name)
    return make
