"""Real libvirt daemons for the tests, each in its own mount namespace (and optionally its own network namespace).

Every daemon gets private copies of the folders libvirt keeps state in (``/etc/libvirt``, ``/var/lib/libvirt``,
``/run/libvirt``, ``/var/cache/libvirt``, ``/var/log/libvirt``) bind-mounted inside a private mount namespace, so
two daemons on one machine (and the machine's own libvirt, if any) never see each other's domains, pools or
sockets. The local daemon's socket lives in a plain folder outside those mounts, so the tests reach it with
``qemu:///system?socket=…``; the remote daemon listens on its default socket inside a network namespace where
an sshd made for it answers ``qemu+ssh://`` on the veth address.

Example::

    daemon = LibvirtDaemon("local", Path("/tmp/x")).start()
    libvirt.open(daemon.uri)          # qemu:///system?socket=/tmp/x/sock/libvirt-sock
    daemon.stop()
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

STATE_DIRS = ("/etc/libvirt", "/var/lib/libvirt", "/run/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
DRIVER_DIR = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver")

LIBVIRTD_CONF = """\
unix_sock_dir = "{sock_dir}"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:{root}/libvirtd.log"
max_clients = 64
keepalive_interval = 5
"""
# TCG guests run as root with no label juggling: the test files live in 0700 pytest folders.
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = []
swtpm_user = "root"
swtpm_group = "root"
"""


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode:
        raise RuntimeError(f"{shlex.join(command)[:300]} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return done


class LibvirtDaemon:
    """One virtlogd + libvirtd pair with private state; ``netns`` puts it (and an sshd) in a network namespace."""

    def __init__(self, name: str, root: Path, netns: str | None = None, drivers: tuple[str, ...] | None = None,
                 sshd: bool = False, address: str | None = None) -> None:
        self.name = name
        self.root = root
        self.netns = netns
        self.drivers = drivers          # None: every installed driver; else only these (e.g. no qemu)
        self.sshd = sshd
        self.address = address
        self.sock_dir = root / "sock"

    @property
    def socket_path(self) -> Path:
        return self.sock_dir / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket_path}"

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.root / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the daemons this object (or an earlier run with the same root) started; their guests die too."""
        for name in ("sshd", "libvirtd", "virtlogd"):
            pid = self._pid(name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            (self.root / f"{name}.pid").unlink(missing_ok=True)
        # Guests started by a killed libvirtd stay behind as orphans; their pid files are in our private run dir.
        for pidfile in (self.root / "state" / "run" / "libvirt" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)

    def start(self, timeout: float = 30) -> "LibvirtDaemon":
        self.stop()
        state = self.root / "state"
        for folder in STATE_DIRS:
            (state / folder.lstrip("/")).mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        etc = state / "etc" / "libvirt"
        sock_dir = "/run/libvirt" if self.netns else str(self.sock_dir)
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(sock_dir=sock_dir, root=self.root))
        (etc / "qemu.conf").write_text(QEMU_CONF)
        (etc / "virtlogd.conf").write_text(f'log_outputs = "3:file:{self.root}/virtlogd.log"\n')
        env = ""
        if self.drivers is not None:
            drivers = self.root / "drivers"
            drivers.mkdir(exist_ok=True)
            for old in drivers.iterdir():
                old.unlink()
            for driver in self.drivers:
                (drivers / f"libvirt_driver_{driver}.so").symlink_to(DRIVER_DIR / f"libvirt_driver_{driver}.so")
            env = f"LIBVIRT_DRIVER_DIR={shlex.quote(str(drivers))} "
        mounts = " && ".join(f"mkdir -p {d} && mount --bind {shlex.quote(str(state / d.lstrip('/')))} {d}" for d in STATE_DIRS)
        script = [mounts,
                  f"virtlogd -d -f {etc}/virtlogd.conf -p {self.root}/virtlogd.pid",
                  f"{env}libvirtd -d -f {etc}/libvirtd.conf -p {self.root}/libvirtd.pid"]
        if self.sshd:
            script.append(f"/usr/sbin/sshd -f {self.root}/ssh/sshd_config -E {self.root}/sshd.log")
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-ec", " && ".join(script)]
        if self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        _run(command, timeout=60)
        if self.netns:
            # The remote daemon's socket is inside its own mounts: readiness shows as sshd's port answering
            # and libvirtd's pid file; the tests then connect over ssh.
            self._wait(lambda: self._pid("libvirtd") is not None and (not self.sshd or self._port_open(22)), timeout)
        else:
            self._wait(self._socket_answers, timeout)
        return self

    def _socket_answers(self) -> bool:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(self.socket_path))
            return True
        return False

    def _port_open(self, port: int) -> bool:
        assert self.address
        with contextlib.suppress(OSError), socket.create_connection((self.address, port), timeout=1):
            return True
        return False

    def _wait(self, ready: "object", timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.1)
        log = (self.root / "libvirtd.log").read_text(errors="replace")[-2000:] if (self.root / "libvirtd.log").exists() else ""
        raise RuntimeError(f"libvirtd {self.name!r} did not come up within {timeout} s; its log ends:\n{log}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


class NetNamespace:
    """A network namespace joined to this one by a veth pair with a private /30 (the host end here, .2 inside)."""

    def __init__(self, name: str, host_address: str, ns_address: str, prefix: int = 30) -> None:
        self.name = name
        self.host_address = host_address
        self.ns_address = ns_address
        self.prefix = prefix
        self.host_link = f"{name[:10]}-h"
        self.ns_link = f"{name[:10]}-n"

    def create(self) -> "NetNamespace":
        self.delete()
        _run(["ip", "netns", "add", self.name])
        _run(["ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link])
        _run(["ip", "link", "set", self.ns_link, "netns", self.name])
        _run(["ip", "addr", "add", f"{self.host_address}/{self.prefix}", "dev", self.host_link])
        _run(["ip", "link", "set", self.host_link, "up"])
        inside = ["ip", "netns", "exec", self.name]
        _run([*inside, "ip", "addr", "add", f"{self.ns_address}/{self.prefix}", "dev", self.ns_link])
        _run([*inside, "ip", "link", "set", self.ns_link, "up"])
        _run([*inside, "ip", "link", "set", "lo", "up"])
        return self

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_link], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def make_ssh_setup(root: Path, address: str) -> dict[str, Path]:
    """Host keys and sshd_config for the namespace's sshd, a client key it accepts and one it does not,
    and an ssh wrapper the libvirt URI names (``command=``) so root's own known_hosts is never touched."""
    ssh = root / "ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    for old in ssh.iterdir():
        old.unlink()
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "host_key")])
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "thalunix-test", "-f", str(ssh / "client_key")])
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stranger", "-f", str(ssh / "wrong_key")])
    (ssh / "authorized_keys").write_text((ssh / "client_key.pub").read_text())
    (ssh / "sshd_config").write_text(
        f"ListenAddress {address}\nPort 22\nHostKey {ssh}/host_key\nPidFile {root}/sshd.pid\n"
        f"AuthorizedKeysFile {ssh}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "MaxStartups 30:30:60\nMaxSessions 30\n")
    Path("/run/sshd").mkdir(exist_ok=True)   # privilege separation folder sshd insists on
    wrapper = ssh / "ssh"
    wrapper.write_text("#!/bin/sh\nexec ssh -F none -o UserKnownHostsFile=" + str(ssh / "known_hosts")
                       + " -o StrictHostKeyChecking=accept-new -o ConnectTimeout=5 \"$@\"\n")
    wrapper.chmod(0o755)
    return {"client_key": ssh / "client_key", "wrong_key": ssh / "wrong_key", "ssh": wrapper}
