"""Bad input against real daemons: an unreachable host, wrong credentials, a host without the QEMU driver, a name
clash on the target (nothing half-moved: the portable VM whole, no volume left on the host), bad host entries,
and libvirt-python missing. No guest boots."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import NS_ADDRESS
from lv_daemons import LibvirtDaemon
from thalunix.errors import ConflictError, NotFoundError, ValidationError
from thalunix.libvirt.hosts import Host, HostConnectionError, HostList, HostManager, connect
from thalunix.libvirt.move import move_to_host

REPO = Path(__file__).resolve().parents[2]


def test_unreachable_host_is_named_as_such_and_does_not_block_the_others(remote_daemon, local_daemon, engine) -> None:
    manager = HostManager(engine.data, engine.bus, timeout=8)
    # Nothing listens on that port in the namespace: refused at once. The other address of the /30 on this side
    # answers nothing on port 22 either.
    manager.hosts.add("refusing", f"qemu+ssh://root@{NS_ADDRESS}:2222/system?command={remote_daemon['keys']['ssh']}"
                                  "&no_tty=1")
    manager.hosts.add("nosocket", "qemu:///system?socket=/nonexistent/libvirt-sock")
    manager.hosts.add("good", local_daemon.uri)
    try:
        started = time.monotonic()
        rows = {row["name"]: row for row in manager.overview()}
        took = time.monotonic() - started
        assert rows["good"]["state"] == "connected" and rows["good"]["vms"] == []
        for name in ("refusing", "nosocket"):
            assert rows[name]["state"] == "error" and rows[name]["cause"] == "unreachable", rows[name]
            assert name in rows[name]["error"] and "unreachable" in rows[name]["error"]
        assert took < 20
        with pytest.raises(HostConnectionError) as caught:
            manager.engine("refusing")
        assert caught.value.cause == "unreachable" and "refused" in str(caught.value).lower()
    finally:
        manager.close()


def test_wrong_credentials(remote_daemon) -> None:
    with pytest.raises(HostConnectionError) as caught:
        connect(Host("wrongkey", remote_daemon["wrong_uri"]), timeout=20)
    assert caught.value.cause == "authentication"
    assert "'wrongkey'" in str(caught.value) and "authorized_keys" in str(caught.value)
    with pytest.raises(HostConnectionError) as caught:
        connect(Host("nobody", remote_daemon["uri"].replace("root@", "nobody@")), timeout=20)
    assert caught.value.cause == "authentication"


def test_host_without_qemu_driver(tmp_path: Path, local_daemon) -> None:
    # A libvirtd with only the storage and network drivers (a host where libvirt-daemon-driver-qemu is missing).
    daemon = LibvirtDaemon("noqemu", tmp_path / "noqemu", drivers=("storage", "network")).start()
    try:
        with pytest.raises(HostConnectionError) as caught:
            connect(Host("bare", daemon.uri), timeout=20)
        assert caught.value.cause == "no-qemu"
        assert "libvirt-daemon-driver-qemu" in str(caught.value)
    finally:
        daemon.stop()


def test_name_clash_on_the_target_moves_nothing(remote_daemon, engine, make_vm) -> None:
    config = make_vm("clash", disk="16M", accel="tcg")
    disk = engine.data.resolve(config.disks[0].path)
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    manager = HostManager(engine.data, engine.bus)
    manager.hosts.add("faraway", remote_daemon["uri"])
    remote = manager.engine("faraway")
    pool = remote.pool()
    pool.refresh(0)
    volumes_before = sorted(pool.listVolumes())
    remote.conn.defineXML("<domain type='qemu'><name>clash</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                          "<os><type arch='x86_64'>hvm</type></os></domain>")
    try:
        with pytest.raises(ConflictError) as caught:
            move_to_host(engine, "clash", remote, wait=True)
        assert "already has a VM named 'clash'" in str(caught.value)
        # A volume of the same name as the VM's disk would get: refused too, before any byte moves.
        remote.conn.lookupByName("clash").undefine()
        squatter = remote.new_volume("clash-disk0.qcow2", 1 << 20, "raw")
        with pytest.raises(ConflictError) as caught:
            move_to_host(engine, "clash", remote, wait=True)
        assert "clash-disk0.qcow2" in str(caught.value)
        squatter.delete(0)
        # Running VMs, a running VM's sibling name … : nothing half-moved in every case.
        assert engine.get("clash").id == config.id
        assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
        pool.refresh(0)
        assert sorted(pool.listVolumes()) == volumes_before
        assert [d.name() for d in remote.conn.listAllDomains(0)] == []
        # A port forward cannot be expressed on libvirt's user networking here: refused, named.
        engine.edit("clash", {"nics": [{**config.nics[0].to_dict(), "forwards": [
            {"protocol": "tcp", "host_port": 2222, "guest_port": 22}]}]})
        with pytest.raises(ValidationError) as refused:
            move_to_host(engine, "clash", remote, wait=True)
        assert refused.value.field == "nics[0].forwards"
    finally:
        for domain in remote.conn.listAllDomains(0):
            domain.undefine()
        manager.close()


def test_host_list_refuses_bad_entries(engine) -> None:
    hosts = HostList(engine.data)
    for name, uri, field in (("local", "qemu:///system", "name"), ("bad name", "qemu:///system", "name"),
                             ("x", "http://example.invalid/", "uri"), ("x", "xen:///system", "uri"),
                             ("x", "qemu+carrier://h/system", "uri"), ("x", "", "uri")):
        with pytest.raises(ValidationError) as caught:
            hosts.add(name, uri)
        assert caught.value.field == field
    hosts.add("lab", "qemu:///session")
    with pytest.raises(ConflictError):
        hosts.add("LAB", "qemu:///system")
    with pytest.raises(NotFoundError):
        hosts.remove("nowhere")
    assert json.loads(engine.data.hosts_file.read_text())["hosts"] == [
        {"name": "lab", "uri": "qemu:///session", "network": None, "pool": "thalunix"}]
    engine.data.hosts_file.write_text("{not json")
    with pytest.raises(Exception) as broken:
        hosts.list()
    assert "hosts.json" in str(broken.value)


def test_missing_libvirt_python_is_said_clearly(tmp_path: Path) -> None:
    # The exe ships without libvirt-python: host commands say what to install; the rest works.
    script = ("import sys; sys.modules['libvirt'] = None\n"
              "from thalunix.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    data = tmp_path / "data"
    run = lambda *args: subprocess.run([sys.executable, "-c", script, "--data-dir", str(data), *args],  # noqa: E731
                                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run("host", "add", "lab", "qemu:///system").returncode == 0
    listed = run("vm", "list", "--host", "lab")
    assert listed.returncode == 1
    assert "libvirt-python" in listed.stderr and "pip install 'thalunix[libvirt]'" in listed.stderr
    assert run("vm", "list").returncode == 0
