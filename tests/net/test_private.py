"""Two real guests on one private network exchange packets through the Thalunix switch (no root-only setup:
QEMU's dgram backend on 127.0.0.1 and a switch process run by Thalunix)."""

from __future__ import annotations

import os

from thalunix import net
from thalunix.engine import DirectEngine

from .conftest import boot, run


def test_two_guests_ping_and_talk_tcp_on_a_private_network(engine: DirectEngine, make_vm) -> None:
    engine.network_create("lab", "two test guests")
    for name in ("alpha", "beta"):
        make_vm(name)
        engine.edit(name, {"nics": [{"mode": "private", "network": "lab"}]})
    assert engine.networks()[0]["vms"] == ["alpha", "beta"]
    assert not net.switch_status(engine.data, "lab")["running"]
    for name in ("alpha", "beta"):
        boot(engine, name)
    switch = net.switch_status(engine.data, "lab")
    assert switch["running"] and switch["pid"] != os.getpid(), switch   # its own process: VMs outlive us
    argv = " ".join(engine.supervisor.sessions[engine.get("alpha").id].record.argv)
    assert f"remote.port={switch['port']}" in argv and "remote.host=127.0.0.1" in argv

    # Link-local addresses: these frames never leave the switch.
    for name, address in (("alpha", "169.254.77.1"), ("beta", "169.254.77.2")):
        out = run(engine, name, f"ip link set eth0 up && ip addr add {address}/24 dev eth0 && echo UP")
        assert out.endswith("UP"), out
    out = run(engine, "alpha", "ping -c 3 -W 10 169.254.77.2 | grep -o '[0-9]* packets received'", timeout=180)
    assert out == "3 packets received", out
    # A TCP exchange with busybox nc, the other way round.
    run(engine, "alpha", "nc -l -p 7007 > /tmp/got 2>/dev/null & echo LISTENING")
    out = run(engine, "beta", "echo hello-from-beta | nc -w 10 169.254.77.1 7007; echo SENT", timeout=120)
    assert out.endswith("SENT"), out
    assert run(engine, "alpha", "sleep 1; cat /tmp/got") == "hello-from-beta"

    for name in ("alpha", "beta"):
        engine.stop(name, force=True)
    # The switch leaves by itself once none of its VMs runs (after its grace period).
    assert net.network_users(engine.data, "lab") == ["alpha", "beta"]
