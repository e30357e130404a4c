"""The TPM manager: chooses a VM's TPM backend, starts it before QEMU, and makes sure it ends with the VM.

``VMConfig.tpm`` is one of:

* ``off`` — no TPM;
* ``native`` — a swtpm process per VM, its state in the VM's ``tpm/`` folder;
* ``helper`` — the swtpm helper micro-VM (:mod:`thalunix.tpm.helper`) behind the bridge,
  run by a detached helper host (:mod:`thalunix.tpm.host`), its state disk in ``tpm/``;
* ``on`` — native where swtpm is available, else the helper; the start fails with both
  reasons when neither can be had;
* ``auto`` — like ``on``, but starts the VM without a TPM (and logs why) instead of failing.

A QEMU without TPM emulation (every Windows build) means no TPM whatever the backend:
``auto`` logs the reason, anything else fails. Whatever is started here outlives this
Thalunix together with its VM, and ends by itself when the VM's QEMU goes (native swtpm
on QEMU's SHUTDOWN or ``--terminate``; the helper host when QEMU closes the control
channel). :meth:`TpmManager.release` is the safety net: it waits briefly, then kills.
What runs is recorded in ``run/tpm.json`` so a later Thalunix can release it too.

Example (what the runner does)::

    tpm = supervisor.tpm.prepare(config, runtime)       # TpmLease or None; raises TpmError
    plan = LaunchPlan(..., tpm_socket=tpm.socket if tpm else "")
    ...                                                 # QEMU ran and exited, or failed to start:
    supervisor.tpm.release(config)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from thalunix.errors import ThalunixError
from thalunix.events import EventBus
from thalunix.model import VMConfig
from thalunix.qemu import process
from thalunix.runtime import Runtime
from thalunix.store import DataFolder, atomic_write_json
from thalunix.tpm.errors import HelperImageError, TpmError, TpmUnavailableError
from thalunix.tpm.helper import HelperImage

SOCKET_NAME = "tpm.sock"         # in the VM's run/ folder, where QEMU runs: short relative paths
RECORD_NAME = "tpm.json"
HELPER_DISK = "helper-state.img"
NATIVE_READY_TIMEOUT = 10.0
HELPER_START_TIMEOUT = 90.0
#: How long the helper host waits for the VM's QEMU to connect before giving up.
HELPER_ACCEPT_TIMEOUT = 120.0


@dataclass
class TpmChoice:
    """Which backend a VM gets and why (``backend`` None: no TPM)."""

    backend: str | None
    reason: str


@dataclass
class TpmLease:
    """A running TPM backend for one VM."""

    backend: str
    socket: str
    pid: int
    token: str
    started_at: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "socket": self.socket, "pid": self.pid, "token": self.token,
                "started_at": self.started_at, "info": dict(self.info)}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


class TpmManager:
    """TPM backends of the VMs of one data folder, as driven by this process."""

    def __init__(self, data: DataFolder, bus: EventBus) -> None:
        self.data = data
        self.bus = bus
        self._leases: dict[str, TpmLease] = {}
        self._releasing: dict[str, threading.Thread] = {}
        #: How long a helper may take from launch to its first answered TPM command.
        self.helper_ready_timeout = 60.0
        self._lock = threading.RLock()

    # -- choosing ---------------------------------------------------------------------------------------
    def choose(self, config: VMConfig, runtime: Runtime) -> TpmChoice:
        """Decide the backend for ``config`` on this host; raise :class:`TpmUnavailableError` when it must fail."""
        mode = config.tpm
        if mode == "off":
            return TpmChoice(None, "TPM is off in the VM's settings")
        if not runtime.caps.has_tpm_emulator:
            reason = runtime.caps.notes.get("tpm") or "this QEMU build has no TPM emulation"
            if mode == "auto":
                return TpmChoice(None, f"no TPM: {reason}")
            raise TpmUnavailableError(f"{config.label}: TPM is '{mode}' but {reason}; set TPM to auto or off, or "
                                      "use a QEMU with TPM emulation")
        native_problem = self.native_problem(runtime)
        if mode == "native" or (mode in ("on", "auto") and not native_problem):
            if native_problem:
                raise TpmUnavailableError(f"{config.label}: TPM is 'native' but {native_problem}; install swtpm "
                                          "(Debian/Ubuntu: apt install swtpm) or set TPM to helper or auto")
            return TpmChoice("native", f"native swtpm {runtime.swtpm}")
        helper_problem = self.helper_problem(runtime)
        if not helper_problem:
            why = f"swtpm is not usable here ({native_problem}); " if native_problem and mode != "helper" else ""
            return TpmChoice("helper", f"{why}swtpm helper VM {runtime.helper_vm}")
        if mode == "helper":
            raise HelperImageError(f"{config.label}: TPM is 'helper' but {helper_problem}")
        both = f"native: {native_problem}; helper VM: {helper_problem}"
        if mode == "auto":
            return TpmChoice(None, f"no TPM ({both})")
        raise TpmUnavailableError(f"{config.label}: TPM is 'on' but none can be had ({both}); install swtpm "
                                  "(apt install swtpm) or build the helper image, or set TPM to auto or off")

    @staticmethod
    def native_problem(runtime: Runtime) -> str:
        if runtime.swtpm is None:
            return "swtpm was not found (not bundled, not on PATH)"
        if not os.access(runtime.swtpm, os.X_OK):
            return f"swtpm at {runtime.swtpm} is not executable"
        return ""

    @staticmethod
    def helper_problem(runtime: Runtime) -> str:
        try:
            HelperImage.load(runtime.helper_vm)
        except HelperImageError as error:
            return str(error)
        if runtime.caps.machines and not {"microvm", "q35"} & set(runtime.caps.machines):
            return "this QEMU has neither the microvm nor the q35 machine the helper needs"
        return ""

    # -- starting ---------------------------------------------------------------------------------------
    def prepare(self, config: VMConfig, runtime: Runtime) -> TpmLease | None:
        """Start the VM's TPM backend; None when it gets none. On failure nothing is left running."""
        self.release(config, wait=0)
        choice = self.choose(config, runtime)
        if choice.backend is None:
            if config.tpm != "off":
                self._log(config, f"TPM: {choice.reason}")
            return None
        self.data.vm_path(config.id, "run", SOCKET_NAME).unlink(missing_ok=True)
        if choice.backend == "native":
            lease = self._start_native(config, runtime)
        else:
            lease = self._start_helper(config, runtime)
        with self._lock:
            self._leases[config.id] = lease
        try:
            atomic_write_json(self.data.vm_path(config.id, "run", RECORD_NAME), lease.to_dict())
        except BaseException:
            self.release(config, wait=0)
            raise
        return lease

    def _start_native(self, config: VMConfig, runtime: Runtime) -> TpmLease:
        assert runtime.swtpm is not None
        run_dir = self.data.vm_path(config.id, "run")
        state_dir = self.data.vm_path(config.id, "tpm")
        log_path = self.data.vm_path(config.id, "logs", "swtpm.log")
        for folder in (run_dir, state_dir, log_path.parent):
            folder.mkdir(parents=True, exist_ok=True)
        # Paths relative to run/: swtpm's options split on commas and sun_path is short.
        argv = [str(runtime.swtpm), "socket", "--tpm2",
                "--ctrl", f"type=unixio,path={SOCKET_NAME},mode=0600",
                "--tpmstate", f"dir={os.path.relpath(state_dir, run_dir)},mode=0600",
                "--log", f"file={os.path.relpath(log_path, run_dir)},level=1",
                "--terminate"]
        with open(log_path, "ab") as log:
            log.write(f"=== thalunix: start {_now()}\n".encode())
            log.flush()
            try:
                proc = process.spawn(argv, cwd=run_dir, log=log)
            except OSError as error:
                raise TpmError(f"{config.label}: cannot run swtpm at {runtime.swtpm}: {error}; reinstall swtpm "
                               "or set TPM to helper") from None
        socket_path = run_dir / SOCKET_NAME
        deadline = time.monotonic() + NATIVE_READY_TIMEOUT
        while not socket_path.exists():
            code = proc.poll()
            if code is not None or time.monotonic() > deadline:
                if code is None:
                    process.kill(proc.pid)
                    proc.wait(5)
                tail = _tail(log_path)
                what = f"exited (code {code})" if code is not None else "did not start"
                raise TpmError(f"{config.label}: swtpm {what} before creating its control socket: "
                               f"{tail or 'no output'}; see {log_path}")
            time.sleep(0.01)
        self._log(config, f"TPM: native swtpm pid {proc.pid}, state in {state_dir}")
        return TpmLease("native", SOCKET_NAME, proc.pid, process.start_token(proc.pid), _now(),
                        {"state": str(state_dir)}, proc)

    def _start_helper(self, config: VMConfig, runtime: Runtime) -> TpmLease:
        image = HelperImage.load(runtime.helper_vm)
        run_dir = self.data.vm_path(config.id, "run")
        tpm_dir = self.data.vm_path(config.id, "tpm")
        log_path = self.data.vm_path(config.id, "logs", "tpm-helper.log")
        for folder in (run_dir, tpm_dir, log_path.parent):
            folder.mkdir(parents=True, exist_ok=True)
        try:
            accel = runtime.accelerator("auto", self.data.cache_dir).chosen or "tcg"
        except ThalunixError:
            accel = "tcg"
        spec = {"qemu": str(runtime.qemu), "image": str(image.folder),
                "state_disk": str(tpm_dir / HELPER_DISK), "socket": SOCKET_NAME, "log_file": str(log_path),
                "accel": accel, "machines": runtime.caps.machines,
                "data_dir": str(runtime.data_dir) if runtime.data_dir else "",
                "accept_timeout": HELPER_ACCEPT_TIMEOUT, "ready_timeout": self.helper_ready_timeout,
                "name": f"{config.label}: TPM helper"}
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"=== thalunix: start {_now()} accel={accel}\n")
            log.flush()
            try:
                proc = subprocess.Popen(helper_host_command(spec), cwd=run_dir, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=log, close_fds=True,
                                        start_new_session=True)
            except OSError as error:
                raise TpmError(f"{config.label}: cannot start the TPM helper host: {error}") from None
        assert proc.stdout is not None
        ready = self._await_helper(config, proc, proc.stdout)
        if ready.get("event") != "ready":
            process.kill(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            message = ready.get("message") or f"the TPM helper host ended: {ready.get('reason', 'no reason given')}"
            raise TpmError(message if message.startswith(config.label) else f"{config.label}: {message}")
        # From now on its console lines go to the VM's log as they come, while we run.
        threading.Thread(target=self._pump_helper_log, args=(config, proc.stdout), daemon=True,
                         name=f"tpm-helper-{config.name}").start()
        self._log(config, f"TPM: helper VM on 127.0.0.1:{ready['data_port']} (control {ready['ctrl_port']}), "
                          f"ready in {ready['ready_seconds']:.2f} s")
        return TpmLease("helper", SOCKET_NAME, proc.pid, process.start_token(proc.pid), _now(),
                        {"data_port": ready["data_port"], "ctrl_port": ready["ctrl_port"],
                         "helper_pid": ready["helper_pid"], "ready_seconds": ready["ready_seconds"],
                         "state_disk": spec["state_disk"]}, proc)

    def _await_helper(self, config: VMConfig, proc: subprocess.Popen, stream: IO[bytes]) -> dict[str, Any]:
        """Read the host's reports until it is ready or has failed (it enforces its own boot timeout)."""
        result: dict[str, Any] = {}
        done = threading.Event()

        def read() -> None:
            for raw in iter(stream.readline, b""):
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if event.get("event") == "log":
                    self._log(config, f"tpm-helper: {event.get('line', '')}")
                else:
                    result.update(event)
                    if event.get("event") in ("ready", "error", "exit"):
                        break
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if not done.wait(HELPER_START_TIMEOUT):
            result = {"event": "error", "message": f"the TPM helper did not report within {HELPER_START_TIMEOUT:.0f} s"}
        return result

    def _pump_helper_log(self, config: VMConfig, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(stream.readline, b""):
                with contextlib.suppress(ValueError):
                    event = json.loads(raw)
                    if event.get("event") == "log":
                        self._log(config, f"tpm-helper: {event.get('line', '')}")
                    elif event.get("event") == "exit":
                        self._log(config, f"tpm-helper: ended ({event.get('reason')})")

    # -- ending -----------------------------------------------------------------------------------------
    def lease(self, config: VMConfig) -> TpmLease | None:
        with self._lock:
            lease = self._leases.get(config.id)
        if lease:
            return lease
        data = self.data.read_json(self.data.vm_path(config.id, "run", RECORD_NAME))
        if not data:
            return None
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return TpmLease(str(data["backend"]), str(data["socket"]), int(data["pid"]), str(data.get("token", "")),
                            str(data.get("started_at", "")), dict(data.get("info", {})))
        return None

    def release(self, config: VMConfig, wait: float = 10.0) -> None:
        """Make sure the VM's TPM backend is gone: let it end by itself for ``wait`` s, then SIGTERM, then kill.

        Both backends take SIGTERM as a clean stop (swtpm saves its state; the helper host
        shuts its helper down), so SIGKILL is only for one that hangs.
        """
        lease = self.lease(config)
        if lease is None:
            return
        if not self._wait_gone(lease, wait):
            with contextlib.suppress(OSError):
                os.kill(lease.pid, signal.SIGTERM)
            if not self._wait_gone(lease, 20.0):
                self._log(config, f"TPM: {lease.backend} backend pid {lease.pid} did not end; killing it")
                process.kill(lease.pid, lease.token)
                self._wait_gone(lease, 5.0)
        with self._lock:
            current = self._leases.get(config.id)
            if current is not None and current.pid != lease.pid:
                return   # a newer start owns the record and the socket now
            self._leases.pop(config.id, None)
            self.data.vm_path(config.id, "run", RECORD_NAME).unlink(missing_ok=True)
            self.data.vm_path(config.id, "run", SOCKET_NAME).unlink(missing_ok=True)

    @staticmethod
    def _wait_gone(lease: TpmLease, timeout: float) -> bool:
        if lease.proc is not None:
            try:
                lease.proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        return process.wait_gone(lease.pid, lease.token, timeout)

    def release_later(self, config: VMConfig) -> None:
        """:meth:`release` in a thread: for callers that must not block (the runner's event loop)."""
        thread = threading.Thread(target=self.release, args=(config,), daemon=True, name=f"tpm-release-{config.name}")
        with self._lock:
            self._releasing[config.id] = thread
        thread.start()

    def wait_released(self, config: VMConfig, timeout: float = 40.0) -> bool:
        """Wait for a :meth:`release_later` of this VM to finish; True when its TPM backend is gone."""
        with self._lock:
            thread = self._releasing.get(config.id)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        lease = self.lease(config)
        return lease is None or not process.is_alive(lease.pid, lease.token)

    # -- logging ----------------------------------------------------------------------------------------
    def _log(self, config: VMConfig, message: str) -> None:
        """One line in the VM's ``logs/events.log`` and a ``vm.log`` event (what the console panel shows)."""
        line = f"{_now()} {message}"
        with contextlib.suppress(OSError, ThalunixError):
            path = self.data.vm_path(config.id, "logs", "events.log")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        self.bus.publish("vm.log", vm=config.id, line=line)


def helper_host_command(spec: dict[str, Any]) -> list[str]:
    """How to run :mod:`thalunix.tpm.host` from this Thalunix (a source checkout or a frozen build)."""
    if getattr(sys, "frozen", False):
        # A frozen build has no `-m`: its entry point (thalunix/__main__.py) hands this hidden argument to
        # thalunix.tpm.host.main.
        return [sys.executable, "--tpm-helper-host", json.dumps(spec)]
    return [sys.executable, "-m", "thalunix.tpm.host", json.dumps(spec)]


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    text = text.rsplit("=== thalunix: start", 1)[-1].split("\n", 1)[-1]
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
