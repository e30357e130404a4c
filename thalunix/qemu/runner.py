"""The runner: starts QEMU as a supervised child, speaks QMP to it, and re-attaches after a restart.

Each running VM has a :class:`VMSession` holding its QMP connection (the official
``qemu.qmp`` client), a reader of its serial console, and its state. QMP events
drive the state (STOP → paused, RESUME → running, SHUTDOWN → stopping, process
exit → stopped or crashed); nothing polls. What a restarted Thalunix needs to
find a VM again is in ``run/state.json``: pid (with its start token, as pids get
reused), sockets, VNC password, accelerator.

One asyncio loop in a background thread serves every session; the public
methods of :class:`Supervisor` are synchronous, for the CLI and the API alike.

Example::

    supervisor = Supervisor(data, runtime_provider, bus)
    supervisor.start(vm)                 # returns once QMP answers
    supervisor.pause(vm); supervisor.resume(vm)
    supervisor.stop(vm)                  # ACPI power button, wait, then quit
    supervisor.detach_all()              # leave VMs running; the next Thalunix re-attaches
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import datetime
import json
import logging
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from qemu.qmp import QMPClient
from qemu.qmp.protocol import Runstate

from thalunix import accel as accel_module
from thalunix.errors import ConflictError, StartError, ThalunixError
from thalunix.events import EventBus
from thalunix.firmware import prepare_firmware
from thalunix.model import HostLimits, VMConfig, validate
from thalunix.qemu import process
from thalunix.qemu.argv import Endpoint, LaunchPlan, build_argv
from thalunix.runtime import Runtime
from thalunix.store import DataFolder, atomic_write_json
from thalunix.tpm import TpmManager

# qemu.qmp reports every EOF of a dying QEMU as an error; a VM powering off is not one.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

STATES = ("stopped", "starting", "running", "paused", "stopping", "crashed")
SERIAL_BUFFER = 256 * 1024
QMP_CONNECT_TIMEOUT = 30.0
UNIX_PATH_MAX = 100   # sun_path is 108 bytes on Linux, 104 on macOS
T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread; :meth:`run` executes a coroutine there from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="thalunix-qmp", daemon=True)
        self.thread.start()

    def run(self, coroutine: Awaitable[T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(callback, *args)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


@dataclass
class RunRecord:
    """``run/state.json``: what it takes to find a running VM again."""

    pid: int
    token: str
    qmp: Endpoint
    serial: Endpoint | None
    vnc: Endpoint | None
    websocket_port: int
    vnc_password: str
    accel: str
    ladder: list[str]
    started_at: str
    state: str = "starting"
    argv: list[str] = field(default_factory=list)
    #: the guest agent's chardev (thalunix.agent connects to it)
    agent: Endpoint | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "token": self.token, "qmp": self.qmp.to_dict(),
                "serial": self.serial.to_dict() if self.serial else None,
                "vnc": self.vnc.to_dict() if self.vnc else None, "websocket_port": self.websocket_port,
                "vnc_password": self.vnc_password, "accel": self.accel, "ladder": self.ladder,
                "started_at": self.started_at, "state": self.state, "argv": self.argv,
                "agent": self.agent.to_dict() if self.agent else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        return cls(pid=int(data["pid"]), token=str(data.get("token", "")), qmp=Endpoint.from_dict(data["qmp"]),
                   serial=Endpoint.from_dict(data["serial"]) if data.get("serial") else None,
                   vnc=Endpoint.from_dict(data["vnc"]) if data.get("vnc") else None,
                   websocket_port=int(data.get("websocket_port", 0)), vnc_password=str(data.get("vnc_password", "")),
                   accel=str(data.get("accel", "")), ladder=list(data.get("ladder", [])),
                   started_at=str(data.get("started_at", "")), state=str(data.get("state", "running")),
                   argv=list(data.get("argv", [])),
                   agent=Endpoint.from_dict(data["agent"]) if data.get("agent") else None)


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z\s+")
_OPTION_JSON = re.compile(r'^-(blockdev|device|drive) (\{.*\}|\S+): ')


def qemu_error_message(output: str) -> str:
    """QEMU's last error line, made readable: no timestamp, no binary name, the drive named instead of its JSON."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "qemu-system" in line or "qemu:" in line] or lines
    if not errors:
        return ""
    line = _TIMESTAMP.sub("", errors[-1])
    line = re.sub(r"^\S*qemu-system-\w+(\.exe)?: ", "", line)
    match = _OPTION_JSON.match(line)
    if match:
        what = match.group(2)
        try:
            spec = json.loads(what)
            node = spec.get("node-name", "")
            filename = spec.get("file", {}).get("filename") or spec.get("filename", "")
            what = f"{node} ({filename})" if filename else node
        except ValueError:
            pass
        line = f"{what}: {line[match.end():]}"
    return line


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_vnc_port() -> int:
    """A free TCP port of the form 5900+N, since QEMU's -vnc takes a display number, not a port."""
    for display in secrets.SystemRandom().sample(range(100, 2000), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", 5900 + display))
            except OSError:
                continue
            return 5900 + display
    raise StartError("no free VNC port between 6000 and 7900 on 127.0.0.1; close some programs and try again")


class VMSession:
    """One running VM, attached: its QMP client, serial reader, state and exit."""

    def __init__(self, supervisor: "Supervisor", config: VMConfig, record: RunRecord,
                 proc: subprocess.Popen | None) -> None:
        self.supervisor = supervisor
        self.config = config
        self.record = record
        self.proc = proc
        self.state = "starting"
        self.qmp = QMPClient(f"thalunix-{config.name}")
        self.serial_buffer = bytearray()
        self.exited = threading.Event()
        self.exit_code: int | None = None
        self.stop_requested = False
        self.clean_shutdown = False
        self.accel_error = ""
        #: True until start() returns; an accelerator failure seen meanwhile is retried by start() itself.
        self.starting = proc is not None
        self.fallback: list[str] = []
        self.detached = False
        #: whether the guest has its agent port open (VSERPORT_CHANGE); None after a re-attach: unknown
        self.agent_open: bool | None = False if proc is not None else None
        self._serial_writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    @property
    def data(self) -> DataFolder:
        return self.supervisor.data

    def log(self, message: str) -> None:
        self.supervisor.vm_log(self.config, message)

    def set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        self.record.state = state
        if state not in ("stopped", "crashed"):
            with contextlib.suppress(OSError, ThalunixError):
                atomic_write_json(self.data.vm_path(self.config.id, "run", "state.json"), self.record.to_dict(),
                                  durable=False)
        self.supervisor.bus.publish("vm.state", vm=self.config.id, name=self.config.name, state=state)

    # -- connecting -------------------------------------------------------------------------------------
    def _address(self, endpoint: Endpoint) -> str | tuple[str, int]:
        if endpoint.kind == "tcp":
            return (endpoint.host, endpoint.port)
        return self.supervisor.unix_address(self.config, endpoint.path)

    async def attach(self, timeout: float = QMP_CONNECT_TIMEOUT) -> None:
        """Connect QMP (retrying while QEMU creates its socket), then read state, events and serial."""
        address = self._address(self.record.qmp)
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise StartError("QEMU exited before its monitor answered")
            if self.proc is None and not process.is_alive(self.record.pid, self.record.token):
                raise StartError("QEMU is no longer running")
            try:
                await self.qmp.connect(address)
                break
            except Exception as error:  # noqa: BLE001 - any connect failure means "not yet"
                if time.monotonic() > deadline:
                    raise StartError(f"QEMU's monitor did not answer in {timeout:.0f} s ({error})") from None
                with contextlib.suppress(Exception):
                    await self.qmp.disconnect()
                self.qmp = QMPClient(f"thalunix-{self.config.name}")
                await asyncio.sleep(delay)
                delay = min(delay * 1.2, 0.02)
        if self.proc is None and not self.serial_buffer:
            # Re-attached: what the guest printed meanwhile is in QEMU's own serial log.
            with contextlib.suppress(OSError):
                log = self.data.vm_path(self.config.id, "logs", "serial.log")
                with open(log, "rb") as handle:
                    handle.seek(max(0, log.stat().st_size - SERIAL_BUFFER))
                    self.serial_buffer += handle.read()
        self._tasks.append(asyncio.ensure_future(self._watch_events()))
        status = await self.qmp.execute("query-status")
        self._apply_status(status)  # type: ignore[arg-type]
        if self.record.serial:
            self._tasks.append(asyncio.ensure_future(self._read_serial()))
        self._tasks.append(asyncio.ensure_future(self._watch_disconnect()))

    def _apply_status(self, status: dict[str, Any]) -> None:
        name = status.get("status", "")
        if name == "running":
            self.set_state("running")
        elif name in ("internal-error",):
            line = accel_module.accel_failure_line(self.supervisor.qemu_log_tail(self.config)) or ""
            self.accel_error = (f"accelerator {self.record.accel} failed inside the guest"
                                f"{': ' + line if line else ' (QEMU run state: internal-error)'}")
            self.log(f"QEMU stopped the guest: {self.accel_error}")
            self.set_state("crashed")
            self.supervisor._accelerator_failed(self)
        elif name == "guest-panicked":
            self.set_state("crashed")
        elif name == "shutdown":
            self.set_state("stopping")
        else:
            self.set_state("paused")

    async def _watch_events(self) -> None:
        async for event in self.qmp.events:
            kind = event["event"]
            details = event.get("data", {})
            self.log(f"QMP event {kind} {details if details else ''}".rstrip())
            if kind == "STOP":
                if self.state in ("stopping",):
                    continue
                # A STOP may be a pause or QEMU parking a guest its accelerator could not run.
                with contextlib.suppress(Exception):
                    self._apply_status(await self.qmp.execute("query-status"))  # type: ignore[arg-type]
            elif kind == "RESUME":
                self.set_state("running")
            elif kind == "SHUTDOWN":
                self.clean_shutdown = True
                self.set_state("stopping")
            elif kind == "GUEST_PANICKED":
                self.set_state("crashed")
            elif kind == "VSERPORT_CHANGE" and details.get("id") == "qga0-port":
                self.agent_open = bool(details.get("open"))
            self.supervisor.bus.publish("vm.qmp", vm=self.config.id, event=kind, data=details)

    async def _read_serial(self) -> None:
        assert self.record.serial
        address = self._address(self.record.serial)
        try:
            if isinstance(address, tuple):
                reader, writer = await asyncio.open_connection(*address)
            else:
                reader, writer = await asyncio.open_unix_connection(address)
        except OSError as error:
            self.log(f"serial console not reachable: {error}")
            return
        self._serial_writer = writer
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            self.serial_buffer += chunk
            if len(self.serial_buffer) > SERIAL_BUFFER:
                del self.serial_buffer[: len(self.serial_buffer) - SERIAL_BUFFER]
            self.supervisor.bus.publish("vm.serial", vm=self.config.id, data=self._decoder.decode(chunk))
        self._serial_writer = None

    async def _watch_disconnect(self) -> None:
        """QMP closing is how a VM we did not spawn tells us it exited."""
        while self.qmp.runstate == Runstate.RUNNING:
            await self.qmp.runstate_changed()
        if self.proc is None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, process.wait_gone, self.record.pid, self.record.token, 10.0)
            self.on_exit(None)

    def on_exit(self, code: int | None) -> None:
        """Called once when QEMU is gone (from the waiter thread or the disconnect watcher)."""
        if self.exited.is_set() or self.detached:
            return   # a detached session no longer speaks for the VM: whoever re-attached does
        self.exit_code = code
        crashed = self.state == "crashed" or (
            not self.stop_requested and not self.clean_shutdown) or (code not in (0, None))
        final = "crashed" if crashed else "stopped"
        tail = self.supervisor.qemu_log_tail(self.config) if crashed else ""
        self.log(f"QEMU exited (code {code if code is not None else 'unknown'}) → {final}")
        with contextlib.suppress(OSError, ThalunixError):
            atomic_write_json(self.data.vm_path(self.config.id, "run", "last-exit.json"),
                              {"code": code, "state": final, "time": _now(), "qemu_output": tail,
                               "accel_error": self.accel_error})
            self.data.vm_path(self.config.id, "run", "state.json").unlink(missing_ok=True)
        self.supervisor.tpm.release_later(self.config)   # normally it has ended by itself already
        # Let go of the VM (session, lock) before anyone hears it stopped: whoever is told may start it again.
        self.supervisor._session_ended(self)
        self.exited.set()
        self.set_state(final)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._serial_writer:
            self._serial_writer.close()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()

    async def send_serial(self, data: bytes) -> None:
        if not self._serial_writer:
            raise ConflictError(f"{self.config.label}: the serial console is not connected")
        self._serial_writer.write(data)
        await self._serial_writer.drain()


RuntimeProvider = Callable[[], Runtime]


class Supervisor:
    """Starts, drives and watches the VMs of one data folder from this process."""

    def __init__(self, data: DataFolder, runtime: RuntimeProvider, bus: EventBus | None = None,
                 host: HostLimits | None = None) -> None:
        self.data = data
        self._runtime = runtime
        self.bus = bus or EventBus()
        self.host = host or HostLimits.probe()
        self.tpm = TpmManager(data, self.bus)
        self.loop = LoopThread()
        self.sessions: dict[str, VMSession] = {}
        self._lock = threading.RLock()
        self._dir_fds: dict[str, int] = {}

    # -- helpers ----------------------------------------------------------------------------------------
    def vm_log(self, config: VMConfig, message: str) -> None:
        """One timestamped line in the VM's ``logs/events.log``, and on the bus."""
        line = f"{_now()} {message}"
        with contextlib.suppress(OSError):
            with open(self.data.vm_path(config.id, "logs", "events.log"), "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        self.bus.publish("vm.log", vm=config.id, line=line)

    def unix_address(self, config: VMConfig, name: str) -> str:
        """The path to reach socket ``name`` in the VM's run/ folder, short enough for sun_path."""
        path = self.data.vm_path(config.id, "run", name)
        if len(str(path)) < UNIX_PATH_MAX:
            return str(path)
        # A deep data folder overflows sun_path; /proc/self/fd/N/name is short and reaches the same socket.
        return f"/proc/self/fd/{self.run_dir_fd(config.id)}/{name}"

    def run_dir_fd(self, vm_id: str) -> int:
        if vm_id not in self._dir_fds:
            self._dir_fds[vm_id] = os.open(self.data.vm_path(vm_id, "run"), os.O_RDONLY)
        return self._dir_fds[vm_id]

    def qemu_log_tail(self, config: VMConfig, lines: int = 20) -> str:
        """QEMU's own last words from this run (after our start marker)."""
        try:
            text = self.data.vm_path(config.id, "logs", "qemu.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        text = text.rsplit("=== thalunix: start", 1)[-1].split("\n", 1)[-1] if "=== thalunix: start" in text else text
        return "\n".join([line for line in text.strip().splitlines() if not line.startswith("=== ")][-lines:])

    def _record(self, config: VMConfig) -> RunRecord | None:
        data = self.data.read_json(self.data.vm_path(config.id, "run", "state.json"))
        if not data:
            return None
        try:
            return RunRecord.from_dict(data)
        except (KeyError, TypeError, ValueError):
            return None

    def _session(self, config: VMConfig) -> VMSession | None:
        session = self.sessions.get(config.id)
        if session and not session.exited.is_set():
            return session
        return None

    # -- state ------------------------------------------------------------------------------------------
    def status(self, config: VMConfig) -> dict[str, Any]:
        """The VM's state and run facts, attaching to it if it runs and nobody else drives it."""
        session = self._session(config) or self.try_attach(config)
        last_exit = self.data.read_json(self.data.vm_path(config.id, "run", "last-exit.json"), {}) or {}
        if session:
            record = session.record
            return {"state": session.state, "pid": record.pid, "accel": record.accel,
                    "started_at": record.started_at, "websocket_port": record.websocket_port,
                    "attached": True, "last_exit": last_exit, "tpm": self._tpm_in_use(config)}
        record = self._record(config)
        if record and process.is_alive(record.pid, record.token):
            # Driven by another Thalunix process: report what it last recorded.
            return {"state": record.state, "pid": record.pid, "accel": record.accel,
                    "started_at": record.started_at, "websocket_port": record.websocket_port,
                    "attached": False, "last_exit": last_exit, "tpm": self._tpm_in_use(config)}
        state = "crashed" if last_exit.get("state") == "crashed" else "stopped"
        return {"state": state, "pid": None, "accel": None, "started_at": None, "websocket_port": None,
                "attached": False, "last_exit": last_exit, "tpm": None}

    def _tpm_in_use(self, config: VMConfig) -> dict[str, str] | None:
        """The running VM's TPM backend, in words (which one ``auto`` picked matters to the user)."""
        lease = self.tpm.lease(config)
        if lease is None:
            return None
        if lease.backend == "helper":
            detail = (f"swtpm in the helper VM, on 127.0.0.1:{lease.info.get('data_port', '?')} "
                      f"(control {lease.info.get('ctrl_port', '?')})")
        else:
            detail = f"native swtpm, pid {lease.pid}"
        return {"backend": lease.backend, "detail": detail}

    def try_attach(self, config: VMConfig) -> VMSession | None:
        """Re-attach to a VM left running by an earlier Thalunix; None if it is not running or is locked."""
        record = self._record(config)
        if not record:
            return None
        if not process.is_alive(record.pid, record.token):
            self.data.vm_path(config.id, "run", "state.json").unlink(missing_ok=True)
            return None
        try:
            self.data.lock_vm(config)
        except ThalunixError:
            return None
        with self._lock:
            session = self._session(config)
            if session:
                return session
            session = VMSession(self, config, record, None)
            try:
                self.loop.run(session.attach(timeout=5.0), timeout=10.0)
            except Exception:  # noqa: BLE001 - a VM we cannot reach is reported as such, not fatal
                self.loop.run(session.close(), timeout=5.0)
                self.data.unlock_vm(config)
                return None
            session.log(f"re-attached to QEMU pid {record.pid}")
            self.sessions[config.id] = session
            return session

    def attach_all(self, configs: list[VMConfig]) -> list[str]:
        """Re-attach every VM still running; returns their names."""
        return [config.name for config in configs if self.try_attach(config)]

    def require_session(self, config: VMConfig) -> VMSession:
        session = self._session(config) or self.try_attach(config)
        if session:
            return session
        record = self._record(config)
        if record and process.is_alive(record.pid, record.token):
            self.data.lock_vm(config)   # raises LockedError naming the other process
        raise ConflictError(f"{config.label} is not running; start it first")

    # -- actions ----------------------------------------------------------------------------------------
    def start(self, config: VMConfig, accel_override: str | None = None) -> dict[str, Any]:
        """Start the VM and return once QMP answers; on an accelerator failure in auto mode, try the next rung."""
        if self._session(config) or self.try_attach(config):
            raise ConflictError(f"{config.label} is already running")
        self.data.lock_vm(config)
        try:
            validate(config, self.host, self.data.exists)
            runtime = self._runtime()
            choice = runtime.accelerator(accel_override or config.accel, self.data.cache_dir)
            rungs = list(choice.ladder) or [choice.chosen]
            while True:
                try:
                    return self._start_once(config, runtime, rungs)
                except StartError as error:
                    if not error.accel_failure:
                        raise
                    self._remember_accel_failure(runtime, rungs[0], str(error))
                    if config.accel != "auto" or len(rungs) < 2:
                        raise
                    self.vm_log(config, f"accelerator {rungs[0]} failed ({error}); trying {rungs[1]}")
                    rungs = rungs[1:]
        except BaseException:
            if not self._session(config):
                self.tpm.release(config, wait=0)
                self.data.unlock_vm(config)
            raise

    def _start_once(self, config: VMConfig, runtime: Runtime, rungs: list[str]) -> dict[str, Any]:
        run_dir = self.data.vm_path(config.id, "run")
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("qmp.sock", "serial.sock", "vnc.sock", "vnc.secret", "qga.sock"):
            (run_dir / stale).unlink(missing_ok=True)
        code, vars_path = prepare_firmware(config, runtime, self.data)
        tpm = self.tpm.prepare(config, runtime)   # TpmError: the VM does not start, nothing is left running
        windows = os.name == "nt"
        if windows:
            qmp, serial = Endpoint.tcp(free_port()), Endpoint.tcp(free_port())
            vnc = Endpoint.tcp(free_vnc_port()) if config.display.kind == "vnc" else None
        else:
            # Relative names: QEMU runs in run/, which keeps socket paths short however deep the data folder.
            qmp, serial = Endpoint.unix("qmp.sock"), Endpoint.unix("serial.sock")
            vnc = Endpoint.unix("vnc.sock") if config.display.kind == "vnc" else None
        websocket_port = free_port() if vnc else 0
        from thalunix import net   # forwards checked, switches and the shared folder up before QEMU runs
        network = net.prepare_launch(self.data, config, runtime,
                                     Endpoint.tcp(free_port()) if windows else Endpoint.unix("qga.sock"))
        vnc_password = secrets.token_urlsafe(6)[:8]   # VNC passwords stop at 8 characters
        password_file = ""
        if vnc:
            password_file = str(run_dir / "vnc.secret")
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(vnc_password)
        qmp_listener = self._listen_qmp(config, qmp)
        accel_args: list[str] = []
        for rung in rungs[:1]:
            accel_args += ["-accel", rung]
        paths = {disk.path: str(self.data.resolve(disk.path)) for disk in config.disks}
        paths.update({cd.path: str(self.data.resolve(cd.path)) for cd in config.cdroms if cd.path})
        serial_log = str(self.data.vm_path(config.id, "logs", "serial.log"))
        plan = LaunchPlan(qemu=str(runtime.qemu), qmp=qmp, serial=serial if config.serial else None,
                          serial_log=serial_log, paths=paths, accel_args=tuple(accel_args), accel=rungs[0],
                          firmware_code=code, firmware_vars=vars_path,
                          data_dir=str(runtime.data_dir) if runtime.data_dir else "", vnc=vnc,
                          vnc_websocket_port=websocket_port, vnc_password_file=password_file,
                          qmp_fd=qmp_listener.fileno() if qmp_listener else -1,
                          tpm_socket=tpm.socket if tpm else "", **network)
        argv = build_argv(config, runtime.caps, plan)
        log_path = self.data.vm_path(config.id, "logs", "qemu.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"=== thalunix: start {_now()} accel={rungs[0]}\n".encode())
            log.write(("=== argv: " + " ".join(argv) + "\n").encode())
            log.flush()
            try:
                proc = process.spawn(argv, cwd=run_dir, log=log,
                                     pass_fds=(qmp_listener.fileno(),) if qmp_listener else ())
            except OSError as error:
                raise StartError(f"{config.label}: cannot run {runtime.qemu}: {error}") from None
            finally:
                if qmp_listener:
                    qmp_listener.close()   # QEMU holds it now; if QEMU dies, connecting fails at once
        record = RunRecord(pid=proc.pid, token=process.start_token(proc.pid), qmp=qmp,
                           serial=plan.serial, vnc=vnc, websocket_port=websocket_port,
                           vnc_password=vnc_password, accel=rungs[0], ladder=rungs,
                           started_at=_now(), argv=argv, agent=plan.agent)
        net.launched(self.data, config, proc.pid, record.token)
        (self.data.vm_path(config.id, "run", "last-exit.json")).unlink(missing_ok=True)
        session = VMSession(self, config, record, proc)
        session.set_state("starting")
        session.log(f"starting QEMU pid {proc.pid} with accelerator {rungs[0]}")
        try:
            self.loop.run(session.attach(), timeout=QMP_CONNECT_TIMEOUT + 5)
        except BaseException as error:
            with contextlib.suppress(Exception):
                self.loop.run(session.close(), timeout=5)
            process.kill(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            output = self.qemu_log_tail(config)
            accel_failure = accel_module.is_accel_failure(output)
            self.data.vm_path(config.id, "run", "state.json").unlink(missing_ok=True)
            session.set_state("stopped")
            message = qemu_error_message(output) or str(error)
            raise StartError(f"{config.label} did not start: {message}", output, accel_failure) from None
        with self._lock:
            self.sessions[config.id] = session
        threading.Thread(target=self._wait_child, args=(session,), daemon=True,
                         name=f"wait-{config.name}").start()
        session.starting = False
        if session.fallback:
            self._kill(session)
            self.data.lock_vm(config)
            return self._start_once(config, runtime, session.fallback)
        if session.state == "crashed" and session.accel_error:
            self._kill(session)
            raise StartError(f"{config.label}: {session.accel_error}", self.qemu_log_tail(config), True)
        return self.status(config)

    def _remember_accel_failure(self, runtime: Runtime, rung: str, reason: str) -> None:
        """The next start skips a rung that passed its self-test but failed a real guest (until reboot)."""
        accel_module.VerdictCache(self.data.cache_dir, runtime.qemu).put(
            accel_module.AccelVerdict(rung, False, f"failed a real guest: {reason}"))

    def _accelerator_failed(self, session: VMSession) -> None:
        """The accelerator passed its self-test yet failed this guest: remember that, and in auto mode
        restart the VM on the next rung of the ladder (from a thread: start() blocks on the QMP loop)."""
        runtime = self._runtime()
        self._remember_accel_failure(runtime, session.record.accel, session.accel_error)
        remaining = session.record.ladder[1:]
        if session.config.accel != "auto" or not remaining:
            session.log("start it again with another accelerator (VM setting accel), e.g. tcg")
            return
        session.log(f"restarting on the next accelerator: {remaining[0]}")

        def restart() -> None:
            self._kill(session)
            try:
                self.data.lock_vm(session.config)
                self._start_once(session.config, runtime, remaining)
            except ThalunixError as error:
                self.tpm.release(session.config, wait=0)
                self.data.unlock_vm(session.config)
                self.vm_log(session.config, f"restart on {remaining[0]} failed: {error}")
        if session.starting:
            session.fallback = remaining   # start() is still on the stack: it restarts itself
        else:
            threading.Thread(target=restart, daemon=True, name=f"fallback-{session.config.name}").start()

    def _listen_qmp(self, config: VMConfig, endpoint: Endpoint) -> socket.socket | None:
        """Make QMP's listening socket ourselves and hand it to QEMU: the runner connects without retrying."""
        if endpoint.kind != "unix" or not hasattr(socket, "AF_UNIX"):
            return None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.unix_address(config, endpoint.path))
            listener.listen(1)
            listener.set_inheritable(True)
        except OSError:
            listener.close()
            return None   # QEMU makes the socket itself, the runner retries
        return listener

    def _wait_child(self, session: VMSession) -> None:
        assert session.proc is not None
        code = session.proc.wait()
        self.loop.call_soon(session.on_exit, code)

    def _session_ended(self, session: VMSession) -> None:
        asyncio.ensure_future(session.close())
        with self._lock:
            if self.sessions.get(session.config.id) is session:
                del self.sessions[session.config.id]
        fd = self._dir_fds.pop(session.config.id, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.data.unlock_vm(session.config)

    def _execute(self, session: VMSession, command: str, arguments: dict[str, Any] | None = None,
                 timeout: float = 30) -> Any:
        try:
            return self.loop.run(session.qmp.execute(command, arguments), timeout)
        except TimeoutError:
            raise ThalunixError(f"{session.config.label}: QEMU did not answer {command} in {timeout:.0f} s") from None
        except Exception as error:  # qemu.qmp's ExecuteError carries QEMU's message
            if session.exited.is_set():
                raise ConflictError(f"{session.config.label} stopped while running {command}") from None
            raise ThalunixError(f"{session.config.label}: QEMU refused {command}: {error}") from None

    def qmp(self, config: VMConfig, command: str, arguments: dict[str, Any] | None = None,
            timeout: float = 30) -> Any:
        """Run any QMP command on a running VM."""
        return self._execute(self.require_session(config), command, arguments, timeout)

    def pause(self, config: VMConfig) -> None:
        session = self.require_session(config)
        self._execute(session, "stop")
        # QEMU answers `stop` once the guest is stopped; its STOP event may still be on its way.
        self.loop.run(self._refresh_state(session), 10)

    def resume(self, config: VMConfig) -> None:
        session = self.require_session(config)
        self._execute(session, "cont")
        self.loop.run(self._refresh_state(session), 10)

    async def _refresh_state(self, session: VMSession) -> None:
        session._apply_status(await session.qmp.execute("query-status"))  # type: ignore[arg-type]

    def reset(self, config: VMConfig) -> None:
        self.qmp(config, "system_reset")

    def stop(self, config: VMConfig, force: bool = False, timeout: float = 60.0) -> dict[str, Any]:
        """Graceful: press the ACPI power button, wait up to ``timeout``, then quit. Force: quit now."""
        session = self.require_session(config)
        session.stop_requested = True
        if not force:
            session.set_state("stopping")
            from thalunix import agent
            # The agent first (a guest that ignores ACPI still shuts down), when the guest has it running.
            if session.agent_open is not False and session.record.agent and agent.shutdown(self, config):
                session.log("asked the guest agent to shut the guest down")
            else:
                session.log("pressing the ACPI power button")
                self._execute(session, "system_powerdown")
            if session.exited.wait(timeout):
                return self.status(config)
            session.log(f"the guest did not power off in {timeout:.0f} s; quitting QEMU")
        self._kill(session)
        return self.status(config)

    def _kill(self, session: VMSession) -> None:
        session.stop_requested = True
        session.set_state("stopping")
        with contextlib.suppress(ThalunixError):
            self._execute(session, "quit", timeout=5)
        if not session.exited.wait(10):
            session.log("QEMU did not quit; killing it")
            process.kill(session.record.pid, session.record.token)
            session.exited.wait(10)

    def serial_output(self, config: VMConfig) -> bytes:
        session = self._session(config)
        if session:
            return bytes(session.serial_buffer)
        with contextlib.suppress(OSError):
            return self.data.vm_path(config.id, "logs", "serial.log").read_bytes()[-SERIAL_BUFFER:]
        return b""

    def send_serial(self, config: VMConfig, data: bytes) -> None:
        session = self.require_session(config)
        self.loop.run(session.send_serial(data), 10)

    def wait_serial(self, config: VMConfig, needle: bytes, timeout: float) -> bool:
        """Block until ``needle`` shows on the serial console (event-driven, via the bus)."""
        session = self.require_session(config)
        with self.bus.subscribe(accept=lambda e: e.get("vm") == config.id) as events:
            if needle in session.serial_buffer:
                return True
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                events.get(timeout=max(0.0, deadline - time.monotonic()))
                if needle in session.serial_buffer:
                    return True
                if session.exited.is_set():
                    return needle in session.serial_buffer
        return False

    def wait_state(self, config: VMConfig, states: set[str], timeout: float) -> str:
        """Block until the VM reaches one of ``states`` (event-driven); return the state."""
        with self.bus.subscribe(accept=lambda e: e.get("vm") == config.id and e["type"] == "vm.state") as events:
            current = self.status(config)["state"]
            deadline = time.monotonic() + timeout
            while current not in states and time.monotonic() < deadline:
                event = events.get(timeout=max(0.0, deadline - time.monotonic()))
                if event:
                    current = event["state"]
            return current

    def detach_all(self) -> None:
        """Let go of every VM without stopping it (they keep running; a later Thalunix re-attaches)."""
        with self._lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        for session in sessions:
            session.detached = True
            with contextlib.suppress(Exception):
                self.loop.run(session.close(), timeout=5)
            self.data.unlock_vm(session.config)

    def stop_all(self, timeout: float = 60.0) -> None:
        for session in list(self.sessions.values()):
            with contextlib.suppress(ThalunixError):
                self.stop(session.config, timeout=timeout)
