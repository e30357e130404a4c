"""One image transfer: HTTP with Range resume, retries with backoff, mirror fallback, hashing while it arrives.

The bytes go to a ``.part`` file and through the hash in the same pass, so the digest is ready when
the last byte lands. A transfer resumed by a later process re-hashes the bytes already on disk once,
then goes on. A server that ignores ``Range`` (answers 200) makes the transfer start over from zero;
``If-Range`` with the first response's ETag/Last-Modified makes a changed file start over too.

Example::

    control = Control()
    transfer = Transfer(requests.Session(), ["https://a/x.iso", "https://mirror/x.iso"], Path("x.part"),
                        control, on_progress=lambda done, total: print(done, total))
    result = transfer.run()            # TransferResult(digest="…", size=…, url="https://a/x.iso")
    # from another thread: control.pause() / control.cancel() → run() raises Paused / Cancelled
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

from thalunix.errors import ThalunixError

CHUNK = 1 << 20
#: Room kept free beyond the image itself (sidecars, the filesystem's own needs).
SPACE_MARGIN = 16 << 20
PERMANENT_STATUSES = (400, 401, 403, 404, 405, 410, 451)


class TransferError(ThalunixError):
    """The image could not be fetched from any source; the partial file is kept for a later resume."""

    code = "download-failed"
    http_status = 502


class NoSpaceError(TransferError):
    """The disk holding the download has too little room."""

    code = "no-space"
    http_status = 507


class Stopped(Exception):
    """The transfer was stopped on request (pause or cancel), not by a failure."""


class Paused(Stopped):
    pass


class Cancelled(Stopped):
    pass


class Control:
    """Pause/cancel from another thread; also closes the live response so a blocked read returns at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.request: str | None = None       # None, "pause" or "cancel"
        self._response: requests.Response | None = None
        self.wake = threading.Event()

    def pause(self) -> None:
        self._stop("pause")

    def cancel(self) -> None:
        self._stop("cancel")

    def _stop(self, what: str) -> None:
        with self._lock:
            if self.request != "cancel":
                self.request = what
            response = self._response
        self.wake.set()
        if response is not None:
            try:
                response.close()
            except Exception:  # noqa: BLE001 - closing from another thread may race the reader; either ends it
                pass

    def clear(self) -> None:
        with self._lock:
            self.request = None
        self.wake.clear()

    def attach(self, response: requests.Response | None) -> None:
        with self._lock:
            self._response = response

    def check(self) -> None:
        if self.request == "cancel":
            raise Cancelled()
        if self.request == "pause":
            raise Paused()


@dataclass
class RetryPolicy:
    """How hard to try one source before the next mirror: attempts, backoff doubling up to a cap."""

    attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    connect_timeout: float = 15.0
    read_timeout: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * (2 ** attempt))


@dataclass
class TransferResult:
    digest: str
    size: int
    url: str
    validators: dict[str, str] = field(default_factory=dict)


class _Hasher:
    """Hashes in a second thread (hashlib lets go of the GIL), so network, disk and hash overlap."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, name="download-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            block = self._queue.get()
            if block is None:
                return
            self._hash.update(block)

    def update(self, block: bytes) -> None:
        self._queue.put(block)

    def finish(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._hash.hexdigest()

    def abandon(self) -> None:
        self._queue.put(None)


class Transfer:
    """Fetch ``urls`` (the first that works) into ``part``; the digest of the whole file when done."""

    def __init__(self, session: requests.Session, urls: list[str], part: Path, control: Control,
                 algorithm: str = "sha256", retry: RetryPolicy | None = None,
                 on_progress: Callable[[int, int | None], None] | None = None,
                 on_response: Callable[[dict[str, Any]], None] | None = None,
                 validators: dict[str, str] | None = None, space_margin: int = SPACE_MARGIN) -> None:
        self.session = session
        self.urls = urls
        self.part = part
        self.control = control
        self.algorithm = algorithm
        self.retry = retry or RetryPolicy()
        self.on_progress = on_progress or (lambda done, total: None)
        self.on_response = on_response or (lambda info: None)
        self.validators = dict(validators or {})
        self.space_margin = space_margin
        self.total: int | None = None
        self.done = 0
        self.rehashed = 0          #: bytes of an earlier partial hashed again at the start (once)
        self.restarts = 0          #: times the file started over (Range ignored, file changed)
        self._hasher: _Hasher | None = None

    # -- the part file and its hash -------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Hash what is already on disk (once per Transfer), so resuming continues the same digest."""
        if self._hasher is not None:
            return
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self._hasher = _Hasher(self.algorithm)
        self.done = 0
        if self.part.exists():
            with open(self.part, "rb") as handle:
                while True:
                    self.control.check()
                    block = handle.read(CHUNK)
                    if not block:
                        break
                    self._hasher.update(block)
                    self.done += len(block)
            self.rehashed = self.done

    def _start_over(self) -> None:
        if self._hasher is not None:
            self._hasher.abandon()
        self._hasher = _Hasher(self.algorithm)
        with open(self.part, "wb"):
            pass
        self.done = 0
        self.restarts += 1

    def _check_space(self, needed: int) -> None:
        try:
            free = shutil.disk_usage(self.part.parent).free
        except OSError:
            return
        if needed + self.space_margin > free:
            raise NoSpaceError(f"not enough free space for {self.part.name}: it needs {_mib(needed + self.space_margin)}"
                               f" and {self.part.parent} has {_mib(free)} free; free some space (or move the data "
                               "folder) and start the download again")

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self) -> TransferResult:
        self.control.check()
        self._prepare()
        problems: list[str] = []
        for url in self.urls:
            attempt = 0
            while attempt < self.retry.attempts:
                self.control.check()
                before = self.done
                try:
                    finished = self._attempt(url)
                except (Stopped, ThalunixError):
                    raise
                except _Permanent as error:
                    problems.append(f"{url}: {error}")
                    break
                except Exception as error:  # noqa: BLE001 - requests, urllib3 and socket errors all mean "retry"
                    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise NoSpaceError(f"the disk holding {self.part.parent} is full ({_mib(_free(self.part))} "
                                           f"free) after {_mib(self.done)} of {self.part.name}; free some space "
                                           "and start the download again: it resumes") from None
                    self.control.check()     # a pause/cancel closes the socket: not a failure
                    problems.append(f"{url}: {_describe(error)}")
                    if self.done > before:
                        attempt = 0          # it was making progress: a cut, not a dead source
                    else:
                        attempt += 1
                    if attempt >= self.retry.attempts:
                        break
                    if self.control.wake.wait(self.retry.delay(attempt)):
                        self.control.check()
                    continue
                if finished:
                    assert self._hasher is not None
                    digest = self._hasher.finish()
                    self._hasher = None
                    return TransferResult(digest, self.done, url, self.validators)
        if self._hasher is not None:
            self._hasher.abandon()
            self._hasher = None
        recent = "; ".join(problems[-3:]) or "no source to try"
        raise TransferError(f"could not download {self.part.name} from any source ({recent}); the "
                            f"{_mib(self.done)} already fetched are kept: start the download again to resume")

    def _attempt(self, url: str) -> bool:
        headers = {"Accept-Encoding": "identity"}
        if self.done:
            headers["Range"] = f"bytes={self.done}-"
            validator = self.validators.get("etag") or self.validators.get("last_modified")
            if validator:
                headers["If-Range"] = validator
        timeout = (self.retry.connect_timeout, self.retry.read_timeout)
        response = self.session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
        self.control.attach(response)
        try:
            self.control.check()
            status = response.status_code
            if status == 416 and self.done and self.total == self.done:
                return True
            if status == 416:
                self._start_over()       # our partial is longer than the file: it changed
                raise _Incomplete("the server refused the resume point (HTTP 416); starting over")
            if status in PERMANENT_STATUSES:
                raise _Permanent(f"HTTP {status}")
            if status >= 400:
                raise _Incomplete(f"HTTP {status}")
            length = _int(response.headers.get("Content-Length"))
            if status == 206:
                start, total = _content_range(response.headers.get("Content-Range", ""))
                if start != self.done:
                    self._start_over()
                    raise _Incomplete(f"the server resumed at byte {start}, not {self.done}; starting over")
                self.total = total
            else:
                if self.done:
                    self._start_over()   # Range ignored (or If-Range saw a changed file): a whole new body
                self.total = length
            self._remember_validators(response)
            self.on_response({"status": status, "total": self.total, "url": url, "validators": self.validators})
            if self.total is not None:
                self._check_space(self.total - self.done)
            self._receive(response)
            if self.total is not None and self.done < self.total:
                raise _Incomplete(f"connection ended at {self.done} of {self.total} bytes")
            if self.total is not None and self.done > self.total:
                raise _Permanent(f"the server sent more than the {self.total} bytes it announced")
            return True
        finally:
            self.control.attach(None)
            response.close()

    def _receive(self, response: requests.Response) -> None:
        assert self._hasher is not None
        raw = response.raw
        read = getattr(raw, "read1", None) or raw.read
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        try:
            os.lseek(fd, self.done, os.SEEK_SET)
            os.ftruncate(fd, self.done)   # a stale tail past what was hashed would corrupt the digest
            last_report = 0.0
            while True:
                self.control.check()
                block = read(CHUNK)
                if not block:
                    break
                view = memoryview(block)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                self._hasher.update(block)
                self.done += len(block)
                now = time.monotonic()
                if now - last_report >= 0.1:
                    last_report = now
                    self.on_progress(self.done, self.total)
        finally:
            os.close(fd)
        self.on_progress(self.done, self.total)

    def _remember_validators(self, response: requests.Response) -> None:
        etag = response.headers.get("ETag")
        modified = response.headers.get("Last-Modified")
        if etag and not etag.startswith("W/"):   # a weak ETag may not be used with If-Range
            self.validators["etag"] = etag
        if modified:
            self.validators["last_modified"] = modified


class _Permanent(Exception):
    """This source will not serve the file: go to the next mirror."""


class _Incomplete(Exception):
    """This attempt ended early: retry (with Range) after a backoff."""


def _content_range(value: str) -> tuple[int, int | None]:
    # "bytes 100-999/1000" or "bytes 100-999/*"
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        start = int(span.split("-")[0])
        return start, (None if total.strip() == "*" else int(total))
    except ValueError:
        raise _Incomplete(f"malformed Content-Range {value!r}") from None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _describe(error: BaseException) -> str:
    if isinstance(error, requests.ConnectionError):
        return "connection failed or was cut"
    if isinstance(error, requests.Timeout):
        return "timed out"
    if type(error).__module__.startswith(("urllib3", "http.client")):
        return "connection was cut"
    return str(error) or type(error).__name__


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return 0


def _mib(size: int) -> str:
    if size >= 1 << 30:
        return f"{size / (1 << 30):.2f} GiB"
    return f"{size / (1 << 20):.1f} MiB"
