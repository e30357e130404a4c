"""Fixtures for the libvirt tests: real libvirtds started here (one local, one "remote" in a network namespace
reached over qemu+ssh), engines over them, and waiting for the guest's serial marker.

The daemons are session-scoped (starting one costs ~1 s; a guest boot under TCG costs far more, so the tests
boot as few guests as they can) and are torn down at the end with every guest they ran.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lv_daemons import LibvirtDaemon, NetNamespace, make_ssh_setup
from thalunix.events import EventBus

READY = b"THALUNIX-GUEST-READY"
PROMPT = b"thalunix-guest:"
BOOT_TIMEOUT = 240
#: The remote daemon's namespace: a private /30 on a veth pair, the host end here, the daemon's end inside.
NETNS = f"thx-lv-{os.getpid() % 100000}"
HOST_ADDRESS, NS_ADDRESS = "10.213.77.1", "10.213.77.2"


def _require_tools() -> None:
    missing = [tool for tool in ("libvirtd", "virtlogd", "virsh", "sshd", "unshare", "ip")
               if not shutil.which(tool) and not Path("/usr/sbin", tool).exists()]
    if missing:
        pytest.fail(f"libvirt tests need {', '.join(missing)}; run `python3 build.py test` (Debian packages "
                    "libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu openssh-server)")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        pytest.fail("libvirt-python is missing; `.venv/bin/pip install -e '.[libvirt,test]'`")


@pytest.fixture(scope="session")
def local_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtDaemon]:
    """A libvirtd on this machine with private state, reached by its own socket (``qemu:///system?socket=…``)."""
    _require_tools()
    daemon = LibvirtDaemon("local", tmp_path_factory.mktemp("lv-local")).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def remote_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A second libvirtd inside a network namespace, with an sshd there; its URI is qemu+ssh to the netns address."""
    _require_tools()
    root = tmp_path_factory.mktemp("lv-remote")
    namespace = NetNamespace(NETNS, HOST_ADDRESS, NS_ADDRESS).create()
    keys = make_ssh_setup(root, NS_ADDRESS)
    daemon = LibvirtDaemon("remote", root, netns=NETNS, sshd=True, address=NS_ADDRESS)
    try:
        daemon.start()
        query = f"keyfile={keys['client_key']}&command={keys['ssh']}&no_tty=1"
        yield {"daemon": daemon, "uri": f"qemu+ssh://root@{NS_ADDRESS}/system?{query}", "keys": keys,
               "namespace": namespace,
               "wrong_uri": f"qemu+ssh://root@{NS_ADDRESS}/system?keyfile={keys['wrong_key']}&command={keys['ssh']}"
                            "&no_tty=1"}
    finally:
        daemon.stop()
        namespace.delete()


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


def wait_serial(read: Callable[[], bytes], needle: bytes, timeout: float = BOOT_TIMEOUT, after: int = 0) -> bytes:
    """Poll a console buffer (fed by the libvirt stream's events) until ``needle`` shows after offset ``after``."""
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        data = read()
        if needle in data[after:]:
            return data
        time.sleep(0.25)
    raise AssertionError(f"{needle!r} did not appear within {timeout} s; the console ends with {data[-1500:]!r}")
