"""Processes, portably: spawn QEMU in its own group, tell whether a recorded pid is still that QEMU, end it.

A pid alone is not proof after a restart (pids are reused), so every recorded pid
comes with a start token: the process start time on Linux, the creation time on
Windows. :func:`is_alive` checks both.

Example::

    proc = spawn(argv, cwd=run_dir, log=log_file)
    token = start_token(proc.pid)
    ...
    is_alive(pid, token)     # after a restart of Thalunix
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


def spawn(argv: list[str], cwd: Path | None, log: IO[bytes], env: dict[str, str] | None = None,
          pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start ``argv`` detached from our terminal and process group, so it outlives us when asked to."""
    kwargs: dict = {}
    if os.name == "nt":
        # A new group: Ctrl+C in the console that ran Thalunix must not kill the VMs.
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined]
    else:
        kwargs["start_new_session"] = True
        kwargs["pass_fds"] = pass_fds
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                            close_fds=True, **kwargs)
    if os.name == "nt":
        # Windows: into the kill-on-close job, so a crashed Thalunix leaves no VM behind (see winjob).
        from thalunix.qemu.winjob import default_job
        default_job().adopt(proc)
    return proc


def spawn_own(argv: list[str], log: IO[bytes]) -> subprocess.Popen:
    """Start one of Thalunix's own background processes (a network switch, a share server) like QEMU,
    detached, with this Thalunix importable whatever the working directory."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    return spawn(argv, cwd=None, log=log, env=env)


def start_token(pid: int) -> str:
    """Something that changes when ``pid`` is reused by another process."""
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            # Field 22 (starttime) counts after the ")" that closes the command name.
            return stat.rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return ""
    if os.name == "nt":
        return _windows_creation_time(pid)
    return ""


def _windows_creation_time(pid: int) -> str:
    try:
        import ctypes
        from ctypes import wintypes
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ""
        try:
            times = [wintypes.FILETIME() for _ in range(4)]
            if not kernel32.GetProcessTimes(handle, *[ctypes.byref(t) for t in times]):
                return ""
            return str((times[0].dwHighDateTime << 32) | times[0].dwLowDateTime)
        finally:
            kernel32.CloseHandle(handle)
    except (OSError, AttributeError):
        return ""


def is_alive(pid: int, token: str = "") -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":
        current = _windows_creation_time(pid)
        return bool(current) and (not token or current == token)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass   # alive, owned by someone else
    if sys.platform.startswith("linux"):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                return False   # exited; only its parent has yet to reap it
        except (OSError, IndexError):
            return False
    return not token or start_token(pid) in ("", token)


def kill(pid: int, token: str = "") -> None:
    """Kill the process (and its group on POSIX) if it is still the one we started."""
    if not is_alive(pid, token):
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_gone(pid: int, token: str, timeout: float) -> bool:
    """Wait for a process that is not our child to vanish (its QMP socket already closed)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if not is_alive(pid, token):
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return not is_alive(pid, token)
