"""A remote host for real: a second libvirtd in a network namespace, reached over qemu+ssh with a key the test made.
A portable VM moves there (disk uploaded as a volume, SHA-256 read back), boots (its serial marker arrives
through the console stream over ssh), stops, and comes back with its disk checksum unchanged. One guest boot."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from conftest import READY, wait_serial
from thalunix.errors import NotFoundError
from thalunix.libvirt.hosts import HostManager
from thalunix.libvirt.move import move_to_host, move_to_local

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(480)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_move_to_remote_host_boots_and_comes_back_unchanged(remote_daemon, engine, make_vm) -> None:
    config = make_vm("traveller", disk="16M", accel="tcg")
    disk = engine.data.resolve(config.disks[0].path)
    before = _sha256(disk)
    manager = HostManager(engine.data, engine.bus)
    manager.hosts.add("faraway", remote_daemon["uri"])
    remote = manager.engine("faraway")
    assert remote.host.remote and remote.version()["libvirt"].startswith("9.")
    try:
        with engine.bus.subscribe(accept=lambda e: e["type"] == "job.progress") as progress:
            started = time.monotonic()
            job = move_to_host(engine, "traveller", remote, wait=True)
            move_seconds = time.monotonic() - started
            percents = []
            while (event := progress.get(timeout=0.1)) is not None:
                percents.append(event.get("percent"))
        assert job["state"] == "done", job.get("error")
        assert job["result"]["checksums"] == {"disk0": before}
        assert len(percents) >= 3 and percents == sorted(percents)
        # The portable copy went only after the host's copy was verified.
        with pytest.raises(NotFoundError):
            engine.get("traveller")
        moved = remote.describe("traveller")
        assert moved["managed"] and moved["id"] == config.id
        assert moved["cdroms"][0]["path"].startswith("/var/lib/libvirt/images/thalunix/iso-")

        remote.start("traveller")
        boot_started = time.monotonic()
        wait_serial(lambda: remote.serial_output("traveller"), READY)
        boot_seconds = time.monotonic() - boot_started
        assert remote.stop("traveller", timeout=90)["state"] == "stopped"

        started = time.monotonic()
        back = move_to_local(remote, "traveller", engine, wait=True)
        back_seconds = time.monotonic() - started
        assert back["state"] == "done", back
        home = engine.get("traveller")
        assert home.id == config.id and home.cdroms[0].path == config.cdroms[0].path
        assert _sha256(engine.data.resolve(home.disks[0].path)) == before == back["result"]["checksums"]["disk0"]
        assert [row["name"] for row in remote.list()] == []
        # The disk volume went with the domain; the shared ISO volume stays for the next VM.
        pool = remote.pool()
        pool.refresh(0)
        assert [name for name in pool.listVolumes() if not name.startswith("iso-")] == []
        print(f"move to remote {move_seconds:.1f} s, boot there {boot_seconds:.1f} s, move back {back_seconds:.1f} s")
    finally:
        for domain in remote.conn.listAllDomains(0):
            if domain.isActive():
                domain.destroy()
            domain.undefineFlags(0)
        manager.close()
