"""The QEMU guest agent: shutdown, the guest's OS and IP addresses, file copy, clock re-sync.

Every VM gets a virtio-serial channel ``org.qemu.guest_agent.0`` (``VMConfig.guest_agent``, on by
default; rendered in :mod:`thalunix.qemu.argv`), served by QEMU on ``run/qga.sock`` (a 127.0.0.1
port on Windows). A guest with ``qemu-guest-agent`` installed answers on it. Each conversation
starts with ``guest-sync-delimited`` and a fresh id, so a late answer to an earlier, timed-out
question is never taken for the current one; a guest without an agent simply never answers and
:class:`AgentUnavailable` says so after a short wait.

Copies move the file in 48 KiB pieces (``guest-file-open/write/read/close``) with job progress, and
end with a SHA-256 of the host's bytes checked against one computed in the guest
(``guest-exec`` of ``sha256sum``, or PowerShell on Windows) when the agent allows ``guest-exec``.

Example::

    from thalunix import agent
    agent.info(engine, "web")          # {"os": {...}, "hostname": "web", "ips": ["10.0.2.15", ...], ...}
    agent.copy_in(engine, "web", "report.pdf", "/tmp/report.pdf")     # {"sha256": ..., "verified": True}
    agent.shutdown(engine, "web")      # True if the agent took the request
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from thalunix.errors import ConflictError, ThalunixError, ValidationError
from thalunix.model import VMConfig

if TYPE_CHECKING:
    from thalunix.engine import DirectEngine
    from thalunix.qemu.runner import Supervisor

#: How long to wait for a guest that may have no agent before falling back.
PING_TIMEOUT = 3.0
CHUNK = 48 * 1024
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class AgentUnavailable(ThalunixError):
    """The guest agent did not answer (not installed, not started yet, or the guest is busy)."""

    code = "agent-unavailable"
    http_status = 409


class AgentError(ThalunixError):
    """The agent answered with an error."""

    code = "agent-error"
    http_status = 400


def _lock(vm_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(vm_id, threading.Lock())


class AgentConnection:
    """One conversation with a VM's guest agent (QEMU serves one client at a time)."""

    def __init__(self, supervisor: "Supervisor", config: VMConfig, timeout: float = PING_TIMEOUT) -> None:
        self.config = config
        self.label = config.label
        if not config.guest_agent:
            raise AgentUnavailable(f"{config.label} has no guest agent channel (setting guest_agent is off); turn "
                                   "it on while the VM is stopped")
        session = supervisor.require_session(config)
        endpoint = session.record.agent
        if endpoint is None:
            raise AgentUnavailable(f"{config.label} was started without a guest agent channel; restart it")
        self._lock = _lock(config.id)
        if not self._lock.acquire(timeout=60):
            raise ConflictError(f"{config.label}: another copy or agent request is still talking to the guest agent")
        try:
            if endpoint.kind == "unix":
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                address: Any = supervisor.unix_address(config, endpoint.path)
            else:
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                address = (endpoint.host, endpoint.port)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        except OSError as error:
            self._lock.release()
            raise AgentUnavailable(f"{config.label}: the guest agent channel cannot be reached ({error})") from None
        self.buffer = b""
        try:
            self.sync(timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(RuntimeError):
            self._lock.release()

    def __enter__(self) -> "AgentConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: dict[str, Any], flush: bool = False) -> None:
        data = json.dumps(message).encode()
        self.sock.sendall((b"\xff" if flush else b"") + data + b"\n")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while True:
            line, sep, rest = self.buffer.partition(b"\n")
            if sep:
                self.buffer = rest
                text = line.strip().lstrip(b"\xff").strip()
                if not text:
                    continue
                try:
                    return json.loads(text)
                except ValueError:
                    continue   # a fragment from before the delimiter
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise AgentUnavailable(f"{self.label}: the guest agent channel closed (the VM stopped?)")
            self.buffer += chunk

    def sync(self, timeout: float) -> None:
        token = secrets.randbelow(1 << 30)
        deadline = time.monotonic() + timeout
        try:
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}}, flush=True)
            while True:
                reply = self._read_message(deadline)
                if reply.get("return") == token:
                    return
        except (socket.timeout, TimeoutError):
            raise AgentUnavailable(f"{self.label}: the guest agent did not answer in {timeout:.0f} s (is "
                                   "qemu-guest-agent installed and running in the guest?)") from None
        except OSError as error:
            raise AgentUnavailable(f"{self.label}: the guest agent channel failed: {error}") from None

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0,
             expect_reply: bool = True) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self._send(message)
            if not expect_reply:
                return None
            reply = self._read_message(time.monotonic() + timeout)
        except (socket.timeout, TimeoutError):
            raise AgentUnavailable(f"{self.label}: the guest agent did not answer {command} in {timeout:.0f} s") \
                from None
        except OSError as error:
            raise AgentUnavailable(f"{self.label}: the guest agent channel failed during {command}: {error}") \
                from None
        if "error" in reply:
            detail = reply["error"].get("desc", reply["error"])
            raise AgentError(f"{self.label}: the guest agent refused {command}: {detail}")
        return reply.get("return")


def connect(engine: "DirectEngine", name: str, timeout: float = PING_TIMEOUT) -> AgentConnection:
    return AgentConnection(engine.supervisor, engine.get(name), timeout)


def ping(supervisor: "Supervisor", config: VMConfig, timeout: float = PING_TIMEOUT) -> bool:
    """True if the guest agent answers within ``timeout``."""
    try:
        with AgentConnection(supervisor, config, timeout):
            return True
    except (AgentUnavailable, ConflictError):
        return False


def info(engine: "DirectEngine", name: str, timeout: float = PING_TIMEOUT) -> dict[str, Any]:
    """The guest's OS, host name and network interfaces with their IP addresses, as its agent reports."""
    with connect(engine, name, timeout) as agent:
        result: dict[str, Any] = {"vm": engine.get(name).name, "agent": True}
        with contextlib.suppress(AgentError):
            details = agent.call("guest-info")
            result["agent_version"] = details.get("version")
            result["commands"] = sorted(c["name"] for c in details.get("supported_commands", []) if c.get("enabled"))
        with contextlib.suppress(AgentError):
            result["os"] = agent.call("guest-get-osinfo")
        with contextlib.suppress(AgentError):
            result["hostname"] = (agent.call("guest-get-host-name") or {}).get("host-name")
        interfaces = []
        with contextlib.suppress(AgentError):
            for interface in agent.call("guest-network-get-interfaces") or []:
                addresses = [f"{a['ip-address']}/{a.get('prefix', '')}".rstrip("/")
                             for a in interface.get("ip-addresses", [])]
                interfaces.append({"name": interface.get("name"), "mac": interface.get("hardware-address"),
                                   "addresses": addresses})
        result["interfaces"] = interfaces
        result["ips"] = [a.split("/")[0] for i in interfaces if i["name"] != "lo" for a in i["addresses"]]
        return result


def shutdown(supervisor: "Supervisor", config: VMConfig, timeout: float = PING_TIMEOUT) -> bool:
    """Ask the guest agent to power the guest off; False if no agent answered (the caller falls back)."""
    try:
        with AgentConnection(supervisor, config, timeout) as agent:
            # guest-shutdown answers nothing on success: the guest is going away.
            agent.call("guest-shutdown", {"mode": "powerdown"}, expect_reply=False)
            return True
    except (AgentUnavailable, AgentError, ConflictError):
        return False


def sync_time(supervisor: "Supervisor", config: VMConfig, timeout: float = PING_TIMEOUT) -> bool:
    """Set the guest clock to the host's (after resume or revert); False if no agent answered."""
    try:
        with AgentConnection(supervisor, config, timeout) as agent:
            agent.call("guest-set-time", {"time": time.time_ns()})
            return True
    except (AgentUnavailable, AgentError, ConflictError):
        return False


def sync_time_later(supervisor: "Supervisor", config: VMConfig) -> None:
    """:func:`sync_time` in a thread, logged: a resume must not wait for a guest without an agent."""
    session = supervisor.sessions.get(config.id)
    if not config.guest_agent or (session is not None and session.agent_open is False):
        return   # the guest never opened its agent port: nobody would answer

    def run() -> None:
        done = sync_time(supervisor, config)
        supervisor.vm_log(config, "guest clock re-synced through the guest agent" if done
                          else "guest clock not re-synced: no guest agent answered")
    threading.Thread(target=run, daemon=True, name=f"timesync-{config.name}").start()


def _check_guest_path(config: VMConfig, path: str) -> str:
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValidationError(f"{config.label}: give the full path of the file in the guest (e.g. /tmp/file or "
                              "C:\\Users\\me\\file)", "guest_path")
    return path


def _guest_sha256(agent: AgentConnection, path: str, timeout: float = 120.0) -> str | None:
    """The file's SHA-256 computed inside the guest, or None where the agent cannot run a program."""
    windows = (":" in path[:3]) or path.startswith("\\\\")
    if windows:
        command = {"path": "powershell.exe", "arg": ["-NoProfile", "-Command",
                   f"(Get-FileHash -Algorithm SHA256 -LiteralPath '{path}').Hash"], "capture-output": True}
    else:
        command = {"path": "sha256sum", "arg": [path], "capture-output": True}
    try:
        pid = agent.call("guest-exec", command)["pid"]
    except (AgentError, KeyError, TypeError):
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = agent.call("guest-exec-status", {"pid": pid})
        if status.get("exited"):
            if status.get("exitcode") != 0:
                return None
            out = base64.b64decode(status.get("out-data", "")).decode(errors="replace").strip()
            digest = out.split()[0].lower() if out else ""
            return digest if len(digest) == 64 else None
        time.sleep(0.1)
    return None


Progress = Callable[[float, str], None]


def copy_in(engine: "DirectEngine", name: str, host_file: str, guest_path: str, progress: Progress | None = None,
            cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Copy ``host_file`` to ``guest_path`` through the agent; the SHA-256 of both ends."""
    config = engine.get(name)
    guest_path = _check_guest_path(config, guest_path)
    source = Path(host_file).expanduser()
    if not source.is_file():
        raise ValidationError(f"{host_file!r} is not a file on this host; check the path", "host_file")
    size = source.stat().st_size
    digest = hashlib.sha256()
    started = time.monotonic()
    with connect(engine, name) as agent, open(source, "rb") as handle:
        guest_handle = agent.call("guest-file-open", {"path": guest_path, "mode": "wb"})
        done = 0
        try:
            while True:
                if cancelled and cancelled():
                    raise ConflictError(f"{config.label}: copy of {source.name} cancelled; {guest_path} is incomplete")
                chunk = handle.read(CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                agent.call("guest-file-write", {"handle": guest_handle, "buf-b64": base64.b64encode(chunk).decode()})
                done += len(chunk)
                if progress:
                    progress(100.0 * done / size if size else 100.0, f"{done >> 10} of {size >> 10} KiB")
        finally:
            with contextlib.suppress(ThalunixError):
                agent.call("guest-file-close", {"handle": guest_handle})
        guest_digest = _guest_sha256(agent, guest_path)
    host_digest = digest.hexdigest()
    if guest_digest is not None and guest_digest != host_digest:
        raise AgentError(f"{config.label}: {guest_path} arrived damaged (SHA-256 {guest_digest} in the guest, "
                         f"{host_digest} on the host); copy it again")
    return {"vm": config.name, "host_file": str(source.absolute()), "guest_path": guest_path, "bytes": size,
            "sha256": host_digest, "guest_sha256": guest_digest, "verified": guest_digest is not None,
            "seconds": round(time.monotonic() - started, 2)}


def copy_out(engine: "DirectEngine", name: str, guest_path: str, host_file: str, progress: Progress | None = None,
             cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Copy ``guest_path`` from the guest to ``host_file`` (written whole or not at all); both SHA-256s."""
    config = engine.get(name)
    guest_path = _check_guest_path(config, guest_path)
    target = Path(host_file).expanduser().absolute()
    if target.is_dir():
        target = target / Path(guest_path.replace("\\", "/")).name
    if not target.parent.is_dir():
        raise ValidationError(f"folder {target.parent} does not exist; choose where to save the file", "host_file")
    digest = hashlib.sha256()
    started = time.monotonic()
    temp = target.with_name(f".{target.name}.thalunix-part")
    size = 0
    try:
        with connect(engine, name) as agent, open(temp, "wb") as out:
            guest_handle = agent.call("guest-file-open", {"path": guest_path, "mode": "rb"})
            total = None
            with contextlib.suppress(AgentError, TypeError, KeyError):
                total = agent.call("guest-file-seek", {"handle": guest_handle, "offset": 0, "whence": "end"})["position"]
                agent.call("guest-file-seek", {"handle": guest_handle, "offset": 0, "whence": "set"})
            try:
                while True:
                    if cancelled and cancelled():
                        raise ConflictError(f"{config.label}: copy of {guest_path} cancelled; nothing was saved")
                    reply = agent.call("guest-file-read", {"handle": guest_handle, "count": CHUNK})
                    data = base64.b64decode(reply.get("buf-b64", ""))
                    out.write(data)
                    digest.update(data)
                    size += len(data)
                    if progress:
                        progress(100.0 * size / total if total else 0.0, f"{size >> 10} KiB")
                    if reply.get("eof") or not data:
                        break
            finally:
                with contextlib.suppress(ThalunixError):
                    agent.call("guest-file-close", {"handle": guest_handle})
            guest_digest = _guest_sha256(agent, guest_path)
        host_digest = digest.hexdigest()
        if guest_digest is not None and guest_digest != host_digest:
            raise AgentError(f"{config.label}: {guest_path} came out damaged (SHA-256 {guest_digest} in the guest, "
                             f"{host_digest} received); copy it again")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return {"vm": config.name, "host_file": str(target), "guest_path": guest_path, "bytes": size,
            "sha256": host_digest, "guest_sha256": guest_digest, "verified": guest_digest is not None,
            "seconds": round(time.monotonic() - started, 2)}
