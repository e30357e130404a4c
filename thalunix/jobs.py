"""Long operations (convert, clone, export, import …) as jobs with an id, live progress and cancel.

A job runs a function in a thread (or in the caller's thread with ``wait=True``) and
publishes ``job.progress`` events on the engine's :class:`~thalunix.events.EventBus`
(``{"type": "job.progress", "job": id, "kind": ..., "vm": ..., "state": ..., "percent": ...}``);
its :meth:`Job.to_dict` is what the API returns for ``GET /api/jobs/<id>``.

Work in progress lives in a *work folder* under the data folder's ``tmp/``, locked by
the process doing it: a Thalunix killed mid-way leaves only that folder behind, and
:func:`sweep_tmp` (run when an engine opens the data folder) removes every work folder
whose lock is free.

Example::

    jobs = JobManager(bus, data)
    def work(job: Job) -> dict:
        for step in range(10):
            job.check_cancelled()
            job.update(step * 10, f"step {step}")
        return {"done": True}
    job = jobs.start("demo", work, vm=config)      # returns at once; job.id names it
    jobs.wait(job.id)["result"]                     # {"done": True}
    jobs.cancel(job.id)                             # a running job stops at its next check
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from thalunix.errors import ConflictError, NotFoundError, ThalunixError
from thalunix.events import EventBus
from thalunix.model import VMConfig
from thalunix.store import DataFolder, FileLock

JOB_STATES = ("running", "done", "failed", "cancelled")
#: Work folders in tmp/ start with this; the rest of tmp/ belongs to others.
WORK_PREFIX = "work-"
#: How many finished jobs are remembered for ``GET /api/jobs``.
KEEP_FINISHED = 100
#: Progress events are sent at most this often (a convert reports hundreds of steps).
PUBLISH_INTERVAL = 0.2
#: … unless it moved on by this many percent: a fast job still shows its way from 0 to 100.
PUBLISH_STEP = 5.0


class CancelledError(ThalunixError):
    """The job was cancelled; whatever it had made was removed."""

    code = "cancelled"
    http_status = 409


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class Job:
    """One long operation: id, kind, VM, state, percent, message; the result or error when finished."""

    def __init__(self, manager: "JobManager | None", kind: str, vm: VMConfig | None = None,
                 title: str = "") -> None:
        self.manager = manager
        self.id = uuid.uuid4().hex[:12]
        self.kind = kind
        self.vm_id = vm.id if vm else None
        self.vm_name = vm.name if vm else None
        self.title = title or kind
        self.state = "running"
        self.percent = 0.0
        self.message = ""
        self.result: Any = None
        self.error: str | None = None
        self.error_code: str | None = None
        self.created = _now()
        self.finished_at: str | None = None
        self.done = threading.Event()
        self._cancel = threading.Event()
        self._processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._last_publish = 0.0
        self._last_percent = 0.0
        #: Scale of the current step: progress of a step maps into [base, base + span] of the whole.
        self._base, self._span = 0.0, 100.0

    # -- for the work function ----------------------------------------------------------------------
    def update(self, percent: float | None = None, message: str | None = None, force: bool = False) -> None:
        """Report progress (0–100 of the current step, see :meth:`step`) and/or a message."""
        if percent is not None:
            self.percent = round(min(100.0, self._base + self._span * max(0.0, min(100.0, percent)) / 100), 2)
        if message is not None:
            self.message = message
        now = time.monotonic()
        if force or message is not None or now - self._last_publish >= PUBLISH_INTERVAL \
                or self.percent - self._last_percent >= PUBLISH_STEP:
            self._last_publish, self._last_percent = now, self.percent
            self.publish()

    @contextlib.contextmanager
    def step(self, start: float, end: float, message: str | None = None) -> Iterator["Job"]:
        """Within the block, ``update(p)`` means p % of the part of the whole from ``start`` to ``end``."""
        saved = self._base, self._span
        self._base, self._span = start, end - start
        self.update(0, message)
        try:
            yield self
        finally:
            self._base, self._span = saved
            self.update(end)

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise CancelledError(f"{self.title}: cancelled; nothing was changed")

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def track(self, process: subprocess.Popen) -> None:
        """A child process that :meth:`cancel` kills (qemu-img convert, …)."""
        with self._lock:
            self._processes.append(process)
        if self._cancel.is_set():
            with contextlib.suppress(OSError):
                process.kill()

    def untrack(self, process: subprocess.Popen) -> None:
        with self._lock:
            if process in self._processes:
                self._processes.remove(process)

    # -- from outside -------------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            with contextlib.suppress(OSError):
                process.kill()

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "vm": self.vm_id, "vm_name": self.vm_name, "title": self.title,
                "state": self.state, "percent": self.percent, "message": self.message, "result": self.result,
                "error": self.error, "error_code": self.error_code, "created": self.created,
                "finished": self.finished_at}

    def publish(self) -> None:
        if self.manager is not None:
            self.manager.bus.publish("job.progress", job=self.id, kind=self.kind, vm=self.vm_id,
                                     title=self.title, state=self.state, percent=self.percent,
                                     message=self.message, error=self.error)

    def _run(self, work: Callable[["Job"], Any]) -> None:
        try:
            self.result = work(self)
            self.state = "done"
            self.percent = 100.0
        except CancelledError as error:
            self.state, self.error, self.error_code = "cancelled", str(error), error.code
        except ThalunixError as error:
            if self._cancel.is_set():
                self.state, self.error, self.error_code = "cancelled", f"{self.title}: cancelled", "cancelled"
            else:
                self.state, self.error, self.error_code = "failed", str(error), error.code
        except Exception as error:  # noqa: BLE001 - a job reports every failure instead of dying silently
            self.state, self.error, self.error_code = "failed", f"{self.title}: {error}", "error"
        finally:
            self.finished_at = _now()
            if self.state == "done" and not self.message.startswith("done"):
                self.message = "done"
            self.done.set()
            self.publish()


class JobManager:
    """Runs jobs, keeps the running and the recently finished ones, and sweeps left-over work folders."""

    def __init__(self, bus: EventBus, data: DataFolder) -> None:
        self.bus = bus
        self.data = data
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        sweep_tmp(data)

    def start(self, kind: str, work: Callable[[Job], Any], vm: VMConfig | None = None, title: str = "",
              wait: bool = False) -> Job:
        """Run ``work(job)``: in a thread (returns at once) or, with ``wait``, here (returns when finished)."""
        job = Job(self, kind, vm, title)
        with self._lock:
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.done.is_set()]
            for old in finished[:-KEEP_FINISHED]:
                self._jobs.pop(old.id, None)
        job.publish()
        if wait:
            job._run(work)
        else:
            threading.Thread(target=job._run, args=(work,), daemon=True, name=f"job-{kind}-{job.id}").start()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r}; it may have finished long ago (GET /api/jobs lists them)")
        return job

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [job.to_dict() for job in self._jobs.values()]

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job.done.is_set():
            raise ConflictError(f"job {job_id} ({job.title}) has already {job.state}")
        job.cancel()
        return job.to_dict()

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        job = self.get(job_id)
        job.done.wait(timeout)
        return job.to_dict()

    def busy(self, vm: VMConfig) -> Job | None:
        """A running job on this VM (one long operation per VM at a time)."""
        with self._lock:
            for job in self._jobs.values():
                if job.vm_id == vm.id and not job.done.is_set():
                    return job
        return None


def raise_for(job: Job) -> Any:
    """The job's result, or its error raised again (for synchronous callers such as the CLI)."""
    job.done.wait()
    if job.state == "done":
        return job.result
    if job.state == "cancelled":
        raise CancelledError(job.error or f"{job.title}: cancelled")
    raise JobFailedError(job.error or f"{job.title} failed", job.error_code or "error")


class JobFailedError(ThalunixError):
    """A job failed; the message is the original error's."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class WorkFolder:
    """A folder in the data folder's ``tmp/`` for one operation, locked while the operation lives.

    Everything an operation makes goes here first and is moved into place (a rename, on
    the same filesystem) only when complete; a crash leaves just this folder, swept later.
    """

    def __init__(self, data: DataFolder, purpose: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in purpose)[:40]
        self.path = data.tmp_dir / f"{WORK_PREFIX}{safe}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir(parents=True)
        self._lock = FileLock(self.path / ".lock")
        if not self._lock.acquire():   # pragma: no cover - a fresh uuid folder cannot be held
            raise ConflictError(f"work folder {self.path} is in use")

    def __enter__(self) -> "WorkFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        self._lock.release()
        shutil.rmtree(self.path, ignore_errors=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name


def sweep_tmp(data: DataFolder) -> list[str]:
    """Remove work folders left by a Thalunix that died mid-operation (their lock is free); return their names."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(data.tmp_dir))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(WORK_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        lock = FileLock(Path(entry.path) / ".lock")
        if not (Path(entry.path) / ".lock").exists():
            # Made but not yet locked, or lock already removed: only sweep when clearly stale.
            try:
                if time.time() - entry.stat().st_mtime < 60:
                    continue
            except OSError:
                continue
        elif not lock.acquire():
            continue   # alive: another process is working in it
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
        finally:
            lock.release()
    return removed
