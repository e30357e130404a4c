"""Windows job objects: QEMU does not outlive a crashed Thalunix, unless the user chose to leave VMs running.

On Linux a VM outlives Thalunix on purpose (its own session; the next Thalunix re-attaches). On Windows
a manager that crashed would leave invisible QEMU processes nobody asked for, so every QEMU Thalunix
starts goes into one job object with ``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE``: when Thalunix ends
without saying otherwise (a crash, Task Manager), Windows closes the job's last handle and ends the VMs.
Leaving deliberately with "leave VMs running" (the window's close question, every CLI command that just
started a VM) clears that flag first, and the VMs run on until a later Thalunix re-attaches.

The Win32 calls sit behind :class:`Win32Jobs` (``CreateJobObjectW``, ``SetInformationJobObject``,
``AssignProcessToJobObject``), which tests replace with a recording fake; elsewhere :func:`default_job`
is a :class:`NoJob`.

Example::

    job = default_job()               # one per process
    proc = subprocess.Popen(argv)
    job.adopt(proc)                   # Windows: into the kill-on-close job
    job.leave_running()               # the user chose to leave the VMs running at close
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any, Protocol

#: From winnt.h.
JOB_OBJECT_LIMIT_BREAKAWAY_OK = 0x00000800
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x00002000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9
PROCESS_SET_QUOTA = 0x0100
PROCESS_TERMINATE = 0x0001


class IoCounters(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
        "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]


class BasicLimitInformation(ctypes.Structure):
    _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                ("LimitFlags", ctypes.c_uint32), ("MinimumWorkingSetSize", ctypes.c_size_t),
                ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", ctypes.c_uint32),
                ("Affinity", ctypes.c_size_t), ("PriorityClass", ctypes.c_uint32),
                ("SchedulingClass", ctypes.c_uint32)]


class ExtendedLimitInformation(ctypes.Structure):
    """JOBOBJECT_EXTENDED_LIMIT_INFORMATION (144 bytes on x64)."""

    _fields_ = [("BasicLimitInformation", BasicLimitInformation), ("IoInfo", IoCounters),
                ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]


def limit_information(kill_on_close: bool) -> ExtendedLimitInformation:
    """The limits the job gets: kill-on-close when asked; breakaway allowed (QEMU may start helpers of its own)."""
    info = ExtendedLimitInformation()
    flags = JOB_OBJECT_LIMIT_BREAKAWAY_OK
    if kill_on_close:
        flags |= JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    info.BasicLimitInformation.LimitFlags = flags
    return info


class JobApi(Protocol):
    """The few Win32 calls a job needs; handles are plain ints."""

    def create_job(self) -> int: ...
    def set_limits(self, job: int, info: ExtendedLimitInformation) -> None: ...
    def assign(self, job: int, process: int) -> None: ...
    def open_process(self, pid: int) -> int: ...
    def close(self, handle: int) -> None: ...


class Win32Jobs:
    """:class:`JobApi` over kernel32 (Windows only)."""

    def __init__(self) -> None:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        self._create = kernel32.CreateJobObjectW
        self._create.argtypes = [ctypes.c_void_p, ctypes.c_wchar_p]
        self._create.restype = ctypes.c_void_p
        self._set = kernel32.SetInformationJobObject
        self._set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
        self._set.restype = ctypes.c_int
        self._assign = kernel32.AssignProcessToJobObject
        self._assign.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._assign.restype = ctypes.c_int
        self._open = kernel32.OpenProcess
        self._open.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32]
        self._open.restype = ctypes.c_void_p
        self._close = kernel32.CloseHandle
        self._close.argtypes = [ctypes.c_void_p]

    @staticmethod
    def _check(ok: Any, what: str) -> Any:
        if not ok:
            raise OSError(ctypes.get_last_error(), f"{what} failed")  # type: ignore[attr-defined]
        return ok

    def create_job(self) -> int:
        return int(self._check(self._create(None, None), "CreateJobObjectW"))

    def set_limits(self, job: int, info: ExtendedLimitInformation) -> None:
        self._check(self._set(job, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS, ctypes.byref(info),
                              ctypes.sizeof(info)), "SetInformationJobObject")

    def assign(self, job: int, process: int) -> None:
        self._check(self._assign(job, process), "AssignProcessToJobObject")

    def open_process(self, pid: int) -> int:
        return int(self._check(self._open(PROCESS_SET_QUOTA | PROCESS_TERMINATE, 0, pid), "OpenProcess"))

    def close(self, handle: int) -> None:
        self._close(handle)


class NoJob:
    """Elsewhere than Windows: VMs are in their own session and outlive Thalunix by design."""

    kill_on_close = False

    def adopt(self, process: Any) -> bool:
        return False

    def leave_running(self) -> None:
        pass

    def stop_with_us(self) -> None:
        pass


class KillOnCloseJob:
    """One job per Thalunix process; every QEMU it starts is assigned to it."""

    def __init__(self, api: JobApi) -> None:
        self.api = api
        self.handle = 0
        self.kill_on_close = True
        self.adopted: list[int] = []
        self._lock = threading.Lock()

    def _ensure(self) -> int:
        if not self.handle:
            self.handle = self.api.create_job()
            self.api.set_limits(self.handle, limit_information(self.kill_on_close))
        return self.handle

    def adopt(self, process: Any) -> bool:
        """Put a just-started process (a Popen, or a pid) into the job. False, and logged by the caller, when
        Windows refuses (e.g. an old Windows without nested jobs inside a job that forbids breakaway)."""
        with self._lock:
            try:
                job = self._ensure()
                handle = getattr(process, "_handle", None)
                pid = process if isinstance(process, int) else process.pid
                opened = 0
                if handle is None:
                    handle = opened = self.api.open_process(pid)
                try:
                    self.api.assign(job, int(handle))
                finally:
                    if opened:
                        self.api.close(opened)
            except OSError:
                return False
            self.adopted.append(pid)
            # A new VM after "leave running" was chosen: the choice holds for it too until stop_with_us().
            return True

    def _set(self, kill_on_close: bool) -> None:
        with self._lock:
            self.kill_on_close = kill_on_close
            if self.handle:
                self.api.set_limits(self.handle, limit_information(kill_on_close))

    def leave_running(self) -> None:
        """The user chose to leave the VMs running: closing the job (our exit) no longer ends them."""
        self._set(False)

    def stop_with_us(self) -> None:
        """Back to the default: the VMs end when this Thalunix ends."""
        self._set(True)


_default: NoJob | KillOnCloseJob | None = None
_default_lock = threading.Lock()


def make_job(os_name: str | None = None, api: JobApi | None = None) -> NoJob | KillOnCloseJob:
    """A kill-on-close job on Windows (``os_name`` defaults to ``os.name``), a no-op elsewhere."""
    if (os_name or os.name) != "nt":
        return NoJob()
    return KillOnCloseJob(api or Win32Jobs())


def default_job() -> NoJob | KillOnCloseJob:
    """This process's job, made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = make_job()
        return _default
