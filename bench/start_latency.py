#!/usr/bin/env python3
"""VM start to "QMP ready": through the library vs the same QEMU argv run bare.

What is measured (issue goal: library ≤ 1.05 × bare, median of ≥ 5 runs):

* library — ``t0 = perf_counter(); engine.start(name); t1``. ``Supervisor.start`` returns once
  QMP answered ``query-status`` and the VNC password is set. The VM is then force-stopped (not timed).
* bare — the exact argv the library just used (from ``run/state.json``), started with ``Popen``
  in the same cwd (the VM's ``run/`` folder: socket paths are relative), same spawn flags as
  :func:`thalunix.qemu.process.spawn`; a minimal raw QMP client retries ``connect()`` every 1 ms
  until the socket accepts, then reads the greeting, sends ``qmp_capabilities`` and
  ``query-status``; timing stops at the ``query-status`` answer. Then ``quit`` and wait (not timed).

One temporary data folder and one VM (BIOS, 256 MiB, 1 vCPU, the test ISO, a 1 GiB qcow2 disk).
The first library start probes QEMU's capabilities and runs the accelerator self-test; it is a
warm-up and excluded, as is one bare warm-up run. Then N rounds alternate library / bare so that
drift (page cache, CPU frequency, other load) hits both sides alike. Ratio = median(library) /
median(bare).

If the ratio is over the goal (or with ``--breakdown``) a few extra library starts (not part of
the verdict) run with every step of ``Supervisor.start`` wrapped in ``perf_counter`` timers: a
critical-path table (library phase vs the same phase of the bare runs) and the exclusive time per
step, medians over the instrumented starts. ``--what-if`` times the library again with proposed
runner fixes simulated by monkeypatching (see :func:`proposed_fixes`; ``thalunix/`` is not changed).

The lock barrier after each stop (:func:`wait_unlocked`) works around a runner race: ``stop()`` can
return before the VM lock is released, and an immediate ``start()`` then fails with LockedError.

Usage::

    .venv/bin/python bench/start_latency.py                 # 7 rounds, ~5 s
    .venv/bin/python bench/start_latency.py --runs 21 --breakdown --what-if
    .venv/bin/python bench/start_latency.py --results bench/RESULTS.md   # also update RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from thalunix.engine import CreateOptions, DirectEngine  # noqa: E402

GOAL = 1.05
VM_NAME = "bench"
SECTION = "## VM start to QMP ready"
# step labels the timeline looks for
SPAWN = "spawn QEMU (Popen)"
CONNECT = "qemu.qmp connect attempts (socket → greeting → qmp_capabilities)"
SLEEP = "connect retry back-off sleeps (asyncio.sleep in VMSession.attach)"
STATE_WRITE = "run/state.json writes (atomic_write_json: fsync file + dir)"
QUERY = "QMP query-status (round trip)"
VNC = "QMP change-vnc-password (round trip)"
FALLBACK_ISOS = ["/usr/lib/ipxe/ipxe.iso", "/usr/lib/ipxe/qemu/ipxe.iso", "/usr/share/ipxe/ipxe.iso"]


# --------------------------------------------------------------------------- helpers

def find_iso(explicit: str | None) -> tuple[Path, str]:
    """The test guest ISO (tests/guest/build.py), else a small system ISO (apt-get install ipxe)."""
    if explicit:
        return Path(explicit), "given with --iso"
    try:
        from guest.build import ensure_guest
        return Path(ensure_guest().iso), "test guest (tests/guest/build.py)"
    except Exception as error:  # noqa: BLE001 - any build problem: fall back, the ISO does not matter here
        print(f"note: test guest unavailable ({type(error).__name__}: {error}); trying a system ISO",
              file=sys.stderr)
    for candidate in FALLBACK_ISOS:
        if Path(candidate).is_file():
            return Path(candidate), "system ISO"
    sys.exit("no ISO: the test guest failed to build and no iPXE ISO is installed (apt-get install ipxe), "
             "or pass --iso PATH")


def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def wait_unlocked(engine: DirectEngine) -> None:
    """A barrier after ``stop``: the exit handler runs on the QMP loop thread and releases the VM lock
    there, possibly *after* ``stop`` returned (see the report: that is a race in the runner). Running
    a no-op on the same loop waits for it to finish."""
    engine.supervisor.loop.run(asyncio.sleep(0), 5)


def loadavg() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "unknown"


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f}"


# --------------------------------------------------------------------------- the bare side

class RawQMP:
    """Just enough QMP: line-delimited JSON over a unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QEMU closed the QMP socket")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def command(self, name: str, deadline: float) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            message = self.read(deadline)
            if "event" in message:
                continue
            if "error" in message:
                raise RuntimeError(f"QMP {name}: {message['error']}")
            return message


def run_bare(argv: list[str], run_dir: Path, log_path: Path, timeout: float = 30.0) -> dict[str, float]:
    """Spawn ``argv`` like the library does and time Popen → query-status answered."""
    for stale in ("qmp.sock", "serial.sock", "vnc.sock"):
        (run_dir / stale).unlink(missing_ok=True)
    qmp_path = str(run_dir / "qmp.sock")
    # The library hands QEMU a QMP socket it made itself (fd=N); bare QEMU makes its own, as a user's would.
    argv = [re.sub(r"^socket,id=qmp,fd=\d+,", "socket,id=qmp,path=qmp.sock,", arg) for arg in argv]
    with open(log_path, "ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=run_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                close_fds=True, start_new_session=True)
    t_spawned = time.perf_counter()
    deadline = time.monotonic() + timeout
    sock = None
    try:
        while True:
            candidate = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                candidate.connect(qmp_path)
                sock = candidate
                break
            except OSError:
                candidate.close()
                if proc.poll() is not None:
                    raise RuntimeError(f"bare QEMU exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError("bare QEMU: QMP socket never accepted")
                time.sleep(0.001)
        t_connected = time.perf_counter()
        qmp = RawQMP(sock)
        greeting = qmp.read(deadline)
        assert "QMP" in greeting, greeting
        t_greeting = time.perf_counter()
        qmp.command("qmp_capabilities", deadline)
        status = qmp.command("query-status", deadline)
        t1 = time.perf_counter()
        assert "return" in status, status
        with contextlib.suppress(OSError, ConnectionError, RuntimeError):
            qmp.command("quit", time.monotonic() + 10)   # read the answer: closing first may drop the quit
    finally:
        if sock is not None:
            sock.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return {"total": t1 - t0, "popen": t_spawned - t0, "socket_accepts": t_connected - t0,
            "greeting": t_greeting - t0}


# --------------------------------------------------------------------------- the library side

def run_library(engine: DirectEngine, state_json: Path) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    engine.start(VM_NAME)
    t1 = time.perf_counter()
    argv = json.loads(state_json.read_text())["argv"]
    engine.stop(VM_NAME, force=True)
    wait_unlocked(engine)
    return t1 - t0, argv


# --------------------------------------------------------------------------- breakdown

class Recorder:
    """Exclusive wall time per labelled step (per thread: a step's nested steps are subtracted)."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.times: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.marks: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def _stack(self) -> list[list[float]]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def enter(self, label: str = "") -> None:
        now = time.perf_counter()
        self._stack().append([now, 0.0])   # [start, time spent in children]
        if label:
            with self.lock:
                self.marks.append((label + ":start", now))

    def leave(self, label: str) -> float:
        start, children = self._stack().pop()
        now = time.perf_counter()
        elapsed = now - start
        with self.lock:
            self.marks.append((label + ":end", now))
        if self._stack():
            self._stack()[-1][1] += elapsed
        with self.lock:
            self.times[label] = self.times.get(label, 0.0) + elapsed - children
            self.counts[label] = self.counts.get(label, 0) + 1
        return elapsed

    def mark(self, name: str) -> None:
        with self.lock:
            self.marks.append((name, time.perf_counter()))


@contextlib.contextmanager
def instrumented(engine: DirectEngine, rec: Recorder) -> Iterator[None]:
    """Wrap every step of ``Supervisor.start`` (module globals and methods); undone on exit."""
    from qemu.qmp import QMPClient

    from thalunix import accel, store
    from thalunix.qemu import process, runner

    undo: list[Callable[[], None]] = []

    def patch(owner: Any, name: str, label: str | Callable[..., str], is_async: bool = False,
              on_done: Callable[[Any, bool], None] | None = None) -> None:
        original = getattr(owner, name)

        def labelled(args: tuple, kwargs: dict) -> str:
            return label(*args, **kwargs) if callable(label) else label

        if is_async:
            @functools.wraps(original)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                rec.enter(labelled(args, kwargs))
                ok = False
                try:
                    result = await original(*args, **kwargs)
                    ok = True
                    return result
                finally:
                    rec.leave(labelled(args, kwargs))
                    if on_done:
                        on_done(args, ok)
        else:
            @functools.wraps(original)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                rec.enter(labelled(args, kwargs))
                try:
                    return original(*args, **kwargs)
                finally:
                    rec.leave(labelled(args, kwargs))
        setattr(owner, name, wrapper)
        undo.append(lambda: setattr(owner, name, original))

    sup = engine.supervisor
    patch(store.DataFolder, "find_vm", "engine.get(): find_vm (lists vms/, parses every vm.json)")
    patch(runner.Supervisor, "try_attach", "already-running check (try_attach: reads state.json)")
    patch(store.DataFolder, "lock_vm", "lock_vm (flock on run/lock)")
    patch(runner, "validate", "validate(config) (stats ISO/disk paths)")
    patch(sup, "_runtime", "engine.runtime() (cached Runtime)")
    patch(accel, "choose_accelerator", "choose_accelerator (prechecks + verdict cache read)")
    patch(runner, "prepare_firmware", "prepare_firmware")
    patch(runner, "free_port", "free_port() (websocket port)")
    patch(runner, "build_argv", "build_argv")
    patch(process, "spawn", SPAWN)
    patch(process, "start_token", "start_token (/proc/PID/stat)")
    patch(runner, "atomic_write_json", STATE_WRITE)
    patch(runner.VMSession, "log", "events.log append + bus publish")
    patch(runner.Supervisor, "status", "final status() (reads last-exit.json)")

    patch(QMPClient, "connect", CONNECT, is_async=True, on_done=lambda args, ok: rec.mark(
        "connect_ok" if ok else "connect_fail"))
    patch(QMPClient, "execute", lambda self, cmd, *a, **k: f"QMP {cmd} (round trip)", is_async=True)
    original_sleep = runner.asyncio.sleep

    class _AsyncioProxy:
        """runner's ``asyncio`` with ``sleep`` timed: those are the connect retry back-off sleeps."""

        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        @staticmethod
        async def sleep(delay: float, *args: Any) -> Any:
            rec.enter(SLEEP)
            try:
                return await original_sleep(delay, *args)
            finally:
                rec.leave(SLEEP)
    runner_asyncio = runner.asyncio
    runner.asyncio = _AsyncioProxy()  # type: ignore[assignment]
    undo.append(lambda: setattr(runner, "asyncio", runner_asyncio))
    try:
        yield
    finally:
        for step in reversed(undo):
            step()


@contextlib.contextmanager
def proposed_fixes(data_dir: Path, full: bool) -> Iterator[dict[str, Any]]:
    """Simulate proposed runner fixes, for --what-if only (thalunix/ itself is not changed).

    Always: a flat 1 ms QMP connect retry instead of the 5 → 50 ms back-off, and run/state.json
    written atomically but without fsync (run state does not outlive a host crash anyway).
    ``full`` also: the library binds + listens on ``run/qmp.sock`` itself and hands the listening fd
    to QEMU (``-chardev socket,id=qmp,fd=N,server=on,wait=off``), so its first connect succeeds at
    once and simply waits for the greeting (no retry loop); and the VNC password is given at launch
    (``-object secret,id=vncpw,file=run/vnc.secret`` + ``-vnc …,password-secret=vncpw``) instead of a
    ``change-vnc-password`` round trip after QMP is up. The original argv (for the bare run) is
    yielded in ``holder["argv"]``.
    """
    from qemu.qmp import QMPClient

    from thalunix.qemu import process, runner

    holder: dict[str, Any] = {}
    original_sleep = asyncio.sleep

    class _FlatRetry:
        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        @staticmethod
        async def sleep(delay: float, *args: Any) -> Any:
            return await original_sleep(min(delay, 0.001), *args)

    def write_json_no_fsync(path: Path, data: Any, keep_previous: bool = False) -> None:
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(temp, path)

    original_build, original_spawn, original_execute = runner.build_argv, process.spawn, QMPClient.execute

    def build_argv(config: Any, caps: Any, plan: Any) -> list[str]:
        argv = original_build(config, caps, plan)
        holder["argv"] = list(argv)
        run_dir = data_dir / "vms" / config.id / "run"
        (run_dir / "qmp.sock").unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(run_dir / "qmp.sock"))
        listener.listen(8)
        holder["listener"] = listener
        secret = run_dir / "vnc.secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, os.urandom(6).hex().encode())
        os.close(fd)
        out = []
        for arg in argv:
            if arg.startswith("socket,id=qmp,"):
                arg = arg.replace("path=qmp.sock", f"fd={listener.fileno()}")
            elif arg.startswith("unix:vnc.sock") or ",password=on" in arg and arg.startswith(("unix:", "127.")):
                arg = arg.replace("password=on", "password-secret=vncpw")
                out[-1:] = ["-object", "secret,id=vncpw,file=vnc.secret", "-vnc"]
            out.append(arg)
        return out

    def spawn(argv: list[str], cwd: Path, log: Any, env: dict[str, str] | None = None) -> subprocess.Popen:
        listener = holder.pop("listener")
        try:
            return subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                    close_fds=True, pass_fds=(listener.fileno(),), start_new_session=True)
        finally:
            listener.close()   # QEMU has its own copy; the path stays connectable while QEMU lives

    async def execute(self: Any, cmd: str, arguments: Any = None, oob: bool = False) -> Any:
        if cmd == "change-vnc-password":
            return {}   # set at launch through password-secret
        return await original_execute(self, cmd, arguments, oob=oob)

    saved = runner.asyncio, runner.atomic_write_json
    runner.asyncio, runner.atomic_write_json = _FlatRetry(), write_json_no_fsync  # type: ignore[assignment]
    if full:
        runner.build_argv, process.spawn, QMPClient.execute = build_argv, spawn, execute  # type: ignore[assignment]
    try:
        yield holder
    finally:
        runner.asyncio, runner.atomic_write_json = saved
        runner.build_argv, process.spawn, QMPClient.execute = original_build, original_spawn, original_execute


def timeline(marks: list[tuple[str, float]], t0: float, t_end: float) -> dict[str, float]:
    """Critical-path phases of one instrumented start, in seconds."""
    def first(name: str) -> float:
        return next(t for n, t in marks if n == name)

    def last(name: str) -> float:
        return [t for n, t in marks if n == name][-1]

    def spans(label: str) -> list[tuple[float, float]]:
        return list(zip([t for n, t in marks if n == label + ":start"], [t for n, t in marks if n == label + ":end"]))

    attempts = [t for n, t in marks if n == CONNECT + ":start"]
    query_end = last(QUERY + ":end")
    return {
        "attempts": len(attempts),
        "pre_spawn": first(SPAWN + ":start") - t0,
        "popen": first(SPAWN + ":end") - first(SPAWN + ":start"),
        "spawn_to_first_attempt": attempts[0] - first(SPAWN + ":end"),
        "first_to_successful_attempt": attempts[-1] - attempts[0],
        "spawn_to_successful_attempt": attempts[-1] - first(SPAWN + ":start"),
        "handshake": last(CONNECT + ":end") - attempts[-1],
        "connect_to_query_end": query_end - last(CONNECT + ":end"),
        "spawn_to_query_end": query_end - first(SPAWN + ":start"),
        "after_query": t_end - query_end,
        "state_write_after_query": sum(e - t for t, e in spans(STATE_WRITE) if t >= query_end),
        "vnc": sum(e - t for t, e in spans(VNC)),
    }


def breakdown(engine: DirectEngine, state_json: Path, runs: int) -> tuple[list[dict[str, float]], list[float],
                                                                          list[dict[str, float]]]:
    per_run: list[dict[str, float]] = []
    totals: list[float] = []
    connects: list[dict[str, float]] = []
    for _ in range(runs):
        rec = Recorder()
        with instrumented(engine, rec):
            t0 = time.perf_counter()
            engine.start(VM_NAME)
            total = time.perf_counter() - t0
        engine.stop(VM_NAME, force=True)
        wait_unlocked(engine)
        totals.append(total)
        per_run.append(dict(rec.times))
        connects.append(timeline(rec.marks, t0, t0 + total))
    return per_run, totals, connects


def one_time_costs(data_dir: Path) -> dict[str, float]:
    """Per-process costs a library start does not pay again (a CLI ``vm start`` pays them every time)."""
    t0 = time.perf_counter()
    engine = DirectEngine.open(data_dir)
    t1 = time.perf_counter()
    engine.runtime()
    t2 = time.perf_counter()
    engine.close()
    return {"DirectEngine.open (HostLimits.probe, loop thread)": t1 - t0,
            "Runtime.discover (warm capability cache)": t2 - t1}


def explain(engine: DirectEngine, state_json: Path, runs: int, data_dir: Path, bare: list[dict[str, float]],
            bare_median: float) -> str:
    """Print (and return as markdown) where the library's time goes."""
    per_run, totals, lines = breakdown(engine, state_json, runs)

    def med(key: str) -> float:
        return statistics.median([line[key] for line in lines])

    def bmed(key: str) -> float:
        return statistics.median([b[key] for b in bare])

    total = statistics.median(totals)
    lib_accept = med("spawn_to_successful_attempt")
    lib_after_accept = med("handshake") + med("connect_to_query_end")
    rows = [
        ("start() → Popen called (Python before spawning)", med("pre_spawn"), 0.0),
        ("Popen", med("popen"), bmed("popen")),
        ("Popen called → QMP socket accepted (connect retry loop; bare retries every 1 ms)",
         lib_accept, bmed("socket_accepts")),
        ("socket accepted → query-status answered (greeting, qmp_capabilities, query-status)",
         lib_after_accept, bare_median - bmed("socket_accepts")),
        ("query-status answered → start() returns (state.json write, VNC password, status(), glue)",
         med("after_query"), 0.0),
    ]
    out = [f"Critical path of a library start (median ms of {len(lines)} instrumented starts, instrumented total "
           f"{total * 1000:.1f} ms; bare columns: median of the timed bare runs, total {bare_median * 1000:.1f} ms):",
           "", "| phase | library | bare | extra |", "| --- | ---: | ---: | ---: |"]
    out += [f"| {name} | {lib * 1000:.1f} | {bare_v * 1000:.1f} | {(lib - bare_v) * 1000:+.1f} |"
            for name, lib, bare_v in rows]
    out += ["", f"Inside the last phase: state.json write {med('state_write_after_query') * 1000:.1f} ms, "
            f"change-vnc-password {med('vnc') * 1000:.1f} ms. Connect attempts per start (median): "
            f"{med('attempts'):.0f}; the first one {med('spawn_to_first_attempt') * 1000:.1f} ms after Popen returned, "
            f"the successful one {med('first_to_successful_attempt') * 1000:.1f} ms after the first.", ""]
    labels = sorted({k for r in per_run for k in r},
                    key=lambda k: -statistics.median([r.get(k, 0.0) for r in per_run]))
    steps = [(label, statistics.median([r.get(label, 0.0) for r in per_run])) for label in labels]
    steps.append(("other (loop-thread hops, RunRecord, waiter thread, Python glue)",
                  statistics.median([t - sum(r.values()) for t, r in zip(totals, per_run)])))
    out += ["Exclusive time per step (median ms; QEMU's own start-up is inside the connect attempts and sleeps):",
            "", "| ms | step |", "| ---: | --- |"]
    out += [f"| {sec * 1000:.2f} | {label} |" for label, sec in steps]
    one_time = one_time_costs(data_dir)
    out += ["", "Once per process, not in the numbers above (a CLI `vm start` pays them every time): "
            + "; ".join(f"{label} {sec * 1000:.1f} ms" for label, sec in one_time.items()) + "."]
    markdown = "\n".join(out)
    print()
    for line in out:   # the markdown tables read well enough on a terminal
        print(line)
    return markdown


# --------------------------------------------------------------------------- main

def write_results(path: Path, markdown: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmark results\n\nSee README.md for how these are made.\n"
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        text = head + markdown.rstrip() + "\n" + (rest[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + markdown.rstrip() + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="alternating rounds (library, bare); default 7")
    parser.add_argument("--iso", help="ISO to attach (default: the test guest, else an iPXE ISO)")
    parser.add_argument("--goal", type=float, default=GOAL, help="target ratio library/bare (default 1.05)")
    parser.add_argument("--breakdown", action="store_true", help="always show where the library's time goes")
    parser.add_argument("--breakdown-runs", type=int, default=9, help="instrumented starts (default 9)")
    parser.add_argument("--results", type=Path, help="write/replace the section in this markdown file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    parser.add_argument("--what-if", action="store_true",
                        help="also time the library with two proposed fixes simulated (see proposed_fixes)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the goal is not met")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be ≥ 1")
    command = "python bench/start_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    began = time.monotonic()

    iso, iso_kind = find_iso(args.iso)
    tmp = Path(tempfile.mkdtemp(prefix="thalunix-bench-"))
    data_dir = tmp / "data"
    engine = DirectEngine.open(data_dir)
    try:
        vm = engine.create(CreateOptions(name=VM_NAME, iso=str(iso), ram="256M", cpus=1, disk="1G",
                                         firmware="bios", tpm="off"))
        run_dir = engine.data.vm_path(vm.id, "run")
        state_json = run_dir / "state.json"
        bare_log = engine.data.vm_path(vm.id, "logs", "bare-qemu.log")
        qemu = str(engine.runtime().qemu)
        load_before = loadavg()
        print(f"QEMU: {qemu_version(qemu)}  |  nproc {os.cpu_count()}  |  load {load_before}  |  "
              f"ISO: {iso} ({iso_kind})")

        t = time.perf_counter()
        _, used_argv = run_library(engine, state_json)
        warm_library = time.perf_counter() - t
        warm_bare = run_bare(used_argv, run_dir, bare_log)["total"]
        accel_used = used_argv[used_argv.index("-accel") + 1] if "-accel" in used_argv else "?"
        print(f"warm-up (excluded): library start+stop {warm_library:.2f} s (capability probe + accelerator "
              f"self-test), bare {warm_bare * 1000:.1f} ms; accelerator: {accel_used}")

        lib: list[float] = []
        bare: list[dict[str, float]] = []
        for i in range(args.runs):
            seconds, used_argv = run_library(engine, state_json)
            lib.append(seconds)
            bare.append(run_bare(used_argv, run_dir, bare_log))
            print(f"  round {i + 1:2d}: library {ms(seconds)} ms   bare {ms(bare[-1]['total'])} ms")

        bare_totals = [b["total"] for b in bare]
        ls, bs = stats(lib), stats(bare_totals)
        ratio = ls["median"] / bs["median"]
        paired = statistics.median(a / b["total"] for a, b in zip(lib, bare))
        ok = ratio <= args.goal
        print()
        print(f"{'':10s}{'median':>9s}{'min':>9s}{'max':>9s}{'stdev':>9s}   (ms, {args.runs} runs)")
        for name, s in (("library", ls), ("bare", bs)):
            print(f"{name:10s}{ms(s['median']):>9s}{ms(s['min']):>9s}{ms(s['max']):>9s}{ms(s['stdev']):>9s}")
        print(f"ratio library/bare (medians): {ratio:.3f}×   (median of per-round ratios {paired:.3f}×)")
        print(f"extra per start: {(ls['median'] - bs['median']) * 1000:+.1f} ms")
        verdict = f"{'PASS' if ok else 'FAIL'}: {ratio:.3f}× {'≤' if ok else '>'} goal {args.goal:.2f}×"
        print(verdict)
        bare_parts = {k: statistics.median([b[k] for b in bare]) for k in ("popen", "socket_accepts", "greeting")}
        print(f"bare phases (median from Popen): Popen returned {bare_parts['popen'] * 1000:.1f} ms, socket "
              f"accepts {bare_parts['socket_accepts'] * 1000:.1f} ms, greeting {bare_parts['greeting'] * 1000:.1f} ms, "
              f"query-status answered {bs['median'] * 1000:.1f} ms")

        breakdown_md = ""
        if args.breakdown or not ok:
            breakdown_md = explain(engine, state_json, args.breakdown_runs, data_dir, bare, bs["median"])
        whatif_md = ""
        if args.what_if:
            lines = []
            for full, what in ((False, "flat 1 ms QMP connect retry + run/state.json without fsync"),
                               (True, "+ QMP listening socket created by the library and passed to QEMU as fd=N "
                                      "+ VNC password given at launch (password-secret)")):
                fixed: list[float] = []
                fixed_bare: list[float] = []
                for _ in range(args.runs):
                    with proposed_fixes(data_dir, full) as holder:
                        seconds, used_argv = run_library(engine, state_json)
                    fixed.append(seconds)
                    fixed_bare.append(run_bare(holder.get("argv", used_argv), run_dir, bare_log)["total"])
                fl, fb = statistics.median(fixed), statistics.median(fixed_bare)
                lines.append(f"- {what}: library {fl * 1000:.1f} ms, bare {fb * 1000:.1f} ms, "
                             f"**ratio {fl / fb:.3f}×** ({(fl - fb) * 1000:+.1f} ms)")
            whatif_md = "\n".join([f"What-if — proposed fixes simulated by monkeypatching in this script (thalunix/ "
                                   f"unchanged), {args.runs} more alternating rounds each:", ""] + lines)
            print()
            print(whatif_md.replace("**", ""))

        elapsed = time.monotonic() - began
        print(f"\n(total benchmark time {elapsed:.1f} s)")
        if args.results:
            md = "\n".join([
                SECTION, "",
                f"- Command: `{command.strip()}`",
                f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
                f"- Machine: {platform.system()} {platform.machine()}, nproc {os.cpu_count()}, "
                f"{qemu_version(qemu)}, accelerator {accel_used} (KVM broken here), Python {platform.python_version()}",
                f"- Load average (1/5/15 min) before: {load_before}, after: {loadavg()} (other work shares this "
                "machine; alternating rounds keep drift out of the ratio, not noise out of single runs)",
                f"- VM: BIOS, q35, 256 MiB, 1 vCPU, ISO ({iso_kind}), 1 GiB qcow2 disk, VNC on a unix socket",
                f"- Warm-up excluded: first library start {warm_library:.2f} s incl. stop (capability probe + "
                "accelerator self-test), one bare run",
                "",
                f"| {args.runs} alternating rounds | median ms | min ms | max ms | stdev ms |",
                "| --- | ---: | ---: | ---: | ---: |",
                *[f"| {name} | {s['median'] * 1000:.1f} | {s['min'] * 1000:.1f} | {s['max'] * 1000:.1f} | "
                  f"{s['stdev'] * 1000:.1f} |" for name, s in (("library `engine.start()`", ls),
                                                                ("bare argv + raw QMP", bs))],
                "",
                f"**Ratio library/bare: {ratio:.3f}×** (median of per-round ratios {paired:.3f}×; "
                f"{(ls['median'] - bs['median']) * 1000:+.1f} ms per start). Goal ≤ {args.goal:.2f}×: "
                f"**{'met' if ok else 'not met'}**.",
                "",
                f"Bare phases (median, from Popen): Popen returned {bare_parts['popen'] * 1000:.1f} ms, socket accepts "
                f"{bare_parts['socket_accepts'] * 1000:.1f} ms, greeting {bare_parts['greeting'] * 1000:.1f} ms, "
                f"query-status answered {bs['median'] * 1000:.1f} ms.",
                "", breakdown_md, "", whatif_md, ""])
            write_results(args.results, md)
            print(f"wrote {args.results}")
        return 1 if (args.strict and not ok) else 0
    finally:
        with contextlib.suppress(Exception):
            engine.close(stop_vms=True)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
