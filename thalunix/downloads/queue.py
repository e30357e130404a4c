"""The download queue: jobs that resolve, fetch, verify and file ISOs, a few at a time, surviving restarts.

A job goes ``queued → resolving → downloading (⇄ paused) → verifying → [extracting] → ready``, or ends
``quarantined`` (a checksum or signature did not verify: the file and the evidence are moved to
``downloads/quarantine/<job>/`` with the reason), ``failed`` (network, 404, disk full: the partial file is
kept and the same download resumes it) or ``cancelled`` (partial removed). Only a file whose checksum *and*
(where the publisher signs) signature verified reaches ``isos/``; partial files live in ``downloads/`` as
``<job>.part`` beside a ``<job>.json`` sidecar (URL, expected hash, bytes done, validators), so a later
process — after a crash or SIGKILL — resumes from the bytes on disk.

Every change is published on the engine's event bus as ``job.progress`` (``kind: "download"``, ``bytes``,
``total``, ``rate`` bytes/s, ``eta`` seconds, ``state``, ``percent``, ``message``).

Example::

    manager = DownloadManager(data, bus)
    job = manager.submit("debian-netinst")            # or a URL with sha256="…"
    manager.pause(job.id); manager.resume(job.id)
    manager.wait(job.id).state                        # "ready"; job.result["file"] is the ISO
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import hashlib
import lzma
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import requests

from thalunix.downloads.catalog import (COMPRESSED_SUFFIXES, Catalog, CatalogEntry, ResolvedSource, SignatureRefused,
                                        apply_user_hash, resolve, resolve_url)
from thalunix.downloads.fetcher import Cancelled, Control, NoSpaceError, Paused, RetryPolicy, Transfer
from thalunix.downloads.verifier import (SHIPPED_KEYS, Keyring, VerificationError, normalise_hex, parse_checksums,
                                         verify_signature)
from thalunix.errors import ConflictError, NotFoundError, ThalunixError, ValidationError
from thalunix.events import EventBus
from thalunix.store import DataFolder, FileLock, atomic_write_json

JOB_STATES = ("queued", "resolving", "downloading", "paused", "verifying", "extracting", "ready", "quarantined",
              "failed", "cancelled")
ACTIVE_STATES = ("queued", "resolving", "downloading", "verifying", "extracting")
FINAL_STATES = ("ready", "quarantined", "cancelled")
PUBLISH_INTERVAL = 0.25
SIDECAR_INTERVAL = 2.0


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def job_id_for(source: str) -> str:
    """A stable id per source, so the same download in a later process finds its partial file."""
    key = source.strip()
    slug_source = key.rstrip("/").rsplit("/", 1)[-1] if "://" in key else key
    slug = re.sub(r"[^a-z0-9.]+", "-", slug_source.lower()).strip("-.")[:40] or "download"
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class DownloadJob:
    """One download; :meth:`to_dict` is its JSON form (the REST ``GET /api/downloads/<id>``)."""

    def __init__(self, manager: "DownloadManager", job_id: str, source: str, user_hash: str | None) -> None:
        self.manager = manager
        self.id = job_id
        self.source = source
        self.user_hash = user_hash
        self.state = "queued"
        self.filename = ""
        self.catalog_id: str | None = None
        self.trust: str | None = None
        self.signer: str | None = None
        self.bytes = 0
        self.total: int | None = None
        self.rate = 0.0
        self.eta: float | None = None
        self.message = ""
        self.error: str | None = None
        self.error_code: str | None = None
        self.result: dict[str, Any] | None = None
        self.created = _now()
        #: counts published changes: a front that got this dict from an HTTP answer and from events keeps
        #: the newer one (an answer can arrive after the events of a download that finished at once)
        self.revision = 0
        self.control = Control()
        self.done = threading.Event()
        self.resolved: ResolvedSource | None = None
        self.validators: dict[str, str] = {}
        self._rate_mark: tuple[float, int] | None = None
        self._last_publish = 0.0
        self._last_sidecar = 0.0

    @property
    def percent(self) -> float | None:
        if not self.total:
            return None
        return round(100.0 * min(self.bytes, self.total) / self.total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": "download", "source": self.source, "catalog_id": self.catalog_id,
                "filename": self.filename, "state": self.state, "bytes": self.bytes, "total": self.total,
                "percent": self.percent, "rate": round(self.rate, 1), "eta": self.eta, "trust": self.trust,
                "signer": self.signer, "message": self.message, "error": self.error, "error_code": self.error_code,
                "result": self.result, "created": self.created, "revision": self.revision}

    def _progress(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if self._rate_mark is None:
            self._rate_mark = (now, done)
        else:
            then, before = self._rate_mark
            if now - then >= 0.5:
                sample = (done - before) / (now - then)
                self.rate = sample if self.rate == 0 else 0.6 * sample + 0.4 * self.rate
                self._rate_mark = (now, done)
        self.bytes, self.total = done, total
        self.eta = round((total - done) / self.rate, 1) if total and self.rate > 0 else None
        self.manager._publish(self, force=total is not None and done >= total)
        if now - self._last_sidecar >= SIDECAR_INTERVAL:
            self._last_sidecar = now
            self.manager._write_sidecar(self, durable=False)


class DownloadManager:
    """Runs download jobs, at most ``max_parallel`` at once, and remembers them across restarts."""

    def __init__(self, data: DataFolder, bus: EventBus | None = None, catalog: Catalog | None = None,
                 keyring: Keyring | None = None, max_parallel: int = 2, retry: RetryPolicy | None = None,
                 session_factory: Callable[[], requests.Session] = requests.Session) -> None:
        self.data = data
        self.bus = bus or EventBus()
        self.keyring = keyring or Keyring.load(SHIPPED_KEYS, data.keys_dir)
        self.catalog = catalog or Catalog.load(data.catalog_file, self.keyring)
        self.max_parallel = max(1, max_parallel)
        self.retry = retry or RetryPolicy()
        self.session_factory = session_factory
        self.jobs: dict[str, DownloadJob] = {}
        self._pending: collections.deque[DownloadJob] = collections.deque()
        self._workers = 0
        self._locks: dict[str, FileLock] = {}
        self._lock = threading.RLock()
        self._closed = False
        self.restore()

    # -- paths ----------------------------------------------------------------------------------------------
    def _part(self, job_id: str) -> Path:
        return self.data.downloads_dir / f"{job_id}.part"

    def _sidecar(self, job_id: str) -> Path:
        return self.data.downloads_dir / f"{job_id}.json"

    def _evidence(self, job_id: str, kind: str) -> Path:
        return self.data.downloads_dir / f"{job_id}.{kind}"

    # -- verbs ----------------------------------------------------------------------------------------------
    def submit(self, source: str, sha256: str | None = None, start: bool = True) -> DownloadJob:
        """Queue a catalog id or URL. Refuses at once what can never be verified (fail closed)."""
        source = source.strip()
        if not source:
            raise ValidationError("give a catalog id or a URL to download", "source")
        user_hash = normalise_hex(sha256, "--sha256") if sha256 else None
        entry: CatalogEntry | None = None
        if "://" not in source:
            entry = self.catalog.get(source)
            source = entry.id
            if entry.kind == "manual":
                raise ValidationError(f"{entry.name} cannot be downloaded by Thalunix: {entry.instructions} "
                                      f"({entry.page}). Then add the file: thalunix iso add PATH", "source")
            if entry.signature and not any(f in self.keyring for f in entry.fingerprints):
                raise VerificationError(
                    f"{entry.name}: the publisher's key ({', '.join(entry.fingerprints)}) is not in the keyring, so "
                    "its signature cannot be checked; fetch it with `thalunix iso catalog --refresh-keys`, or "
                    "download the image by URL with the SHA-256 from a source you trust (--sha256 HEX)")
            if entry.trust == "no checksum" and not user_hash:
                raise VerificationError(f"{entry.name}: the publisher offers no checksum, so Thalunix will not "
                                        "download it unchecked; give the SHA-256 from a source you trust: --sha256 HEX",
                                        "sha256")
        else:
            resolve_url(source, user_hash)     # validates the URL and that a hash was given
        job_id = job_id_for(source)
        with self._lock:
            job = self.jobs.get(job_id)
            if job is not None and job.state in ACTIVE_STATES:
                return job                      # already on its way: the same job, not a second one
            if job is not None and job.user_hash != user_hash and user_hash is not None:
                self._discard_partial(job_id)   # a different expected hash: the old partial is not this file
                job = None
            if job is None or job.state in FINAL_STATES:
                job = DownloadJob(self, job_id, source, user_hash)
                self._load_sidecar(job)
                self.jobs[job_id] = job
            job.user_hash = user_hash or job.user_hash
            if entry is not None:
                job.catalog_id = entry.id
                job.filename = job.filename or entry.name
            else:
                job.filename = job.filename or source.rstrip("/").rsplit("/", 1)[-1]
            if start:
                self._enqueue(job)
            return job

    def pause(self, job_id: str) -> DownloadJob:
        job = self.get(job_id)
        with self._lock:
            if job.state == "queued" and job in self._pending:
                self._pending.remove(job)
                self._set(job, "paused", "paused")
                job.done.set()
            elif job.state in ("queued", "resolving", "downloading"):
                job.control.pause()      # a worker has it (maybe just taken from the queue): it stops at its next check
            elif job.state not in ("paused",):
                raise ConflictError(f"download {job.id} is {job.state}; only a queued or running download pauses")
        return job

    def resume(self, job_id: str) -> DownloadJob:
        job = self.get(job_id)
        with self._lock:
            if job.state in ("paused", "failed"):
                self._enqueue(job)
            elif job.state not in ACTIVE_STATES:
                raise ConflictError(f"download {job.id} is {job.state}; start it again with iso download")
        return job

    def cancel(self, job_id: str) -> DownloadJob:
        job = self.get(job_id)
        with self._lock:
            if job.state in ("resolving", "downloading") or (job.state == "queued" and job not in self._pending):
                job.control.cancel()
                return job
            if job.state in ("verifying", "extracting"):
                raise ConflictError(f"download {job.id} is {job.state}; wait a moment and cancel again")
            if job.state == "queued":
                self._pending.remove(job)
            if job.state not in FINAL_STATES:
                self._discard_partial(job.id)
                self._set(job, "cancelled", "cancelled; the partial file was removed")
                job.done.set()
        return job

    def get(self, job_id: str) -> DownloadJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no download {job_id!r}; `thalunix iso list` shows the downloads")
        return job

    def list(self) -> list[dict[str, Any]]:
        return [job.to_dict() for job in sorted(self.jobs.values(), key=lambda j: j.created)]

    def wait(self, job_id: str, timeout: float | None = None) -> DownloadJob:
        """Block until the job stops (ready, quarantined, failed, cancelled, paused)."""
        job = self.get(job_id)
        job.done.wait(timeout)
        return job

    def restore(self) -> list[str]:
        """Register the partial downloads a previous process left (as ``paused``); they resume on request."""
        found = []
        try:
            sidecars = sorted(self.data.downloads_dir.glob("*.json"))
        except OSError:
            return found
        for sidecar in sidecars:
            job_id = sidecar.stem
            if job_id in self.jobs:
                continue
            record = self.data.read_json(sidecar, None)
            if not isinstance(record, dict) or record.get("id") != job_id:
                continue
            job = DownloadJob(self, job_id, str(record.get("source", "")), record.get("user_hash"))
            self._load_sidecar(job)
            job.state = "failed" if record.get("error") else "paused"
            job.message = "interrupted; resume to continue from the bytes on disk"
            probe = FileLock(self.data.downloads_dir / f"{job_id}.lock")
            if probe.acquire():
                probe.release()
            else:
                job.state = "downloading"
                job.message = f"downloading in another Thalunix process (pid {probe.holder()})"
            job.done.set()
            self.jobs[job_id] = job
            found.append(job_id)
        return found

    def close(self, timeout: float = 10) -> None:
        """Pause every running download (the partials stay for the next process) and wait briefly."""
        with self._lock:
            self._closed = True
            self._pending.clear()
            running = [job for job in self.jobs.values() if job.state in ACTIVE_STATES]
        for job in running:
            job.control.pause()
        deadline = time.monotonic() + timeout
        for job in running:
            job.done.wait(max(0.0, deadline - time.monotonic()))

    # -- the worker -----------------------------------------------------------------------------------------
    def _enqueue(self, job: DownloadJob) -> None:
        if self._closed:
            raise ConflictError("the download manager is shutting down")
        job.control.clear()
        job.done.clear()
        job.error = job.error_code = None
        self._set(job, "queued", "waiting for a free download slot")
        self._pending.append(job)
        if self._workers < self.max_parallel:
            self._workers += 1
            threading.Thread(target=self._worker, name="download-worker", daemon=True).start()

    def _worker(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._workers -= 1
                    return
                job = self._pending.popleft()
            try:
                self._run(job)
            finally:
                job.done.set()

    def _run(self, job: DownloadJob) -> None:
        lock = FileLock(self.data.downloads_dir / f"{job.id}.lock")
        acquired = lock.acquire()
        for _ in range(100):
            # A resume right after a pause may find this process's previous run still letting go.
            if acquired or lock.holder() != str(os.getpid()):
                break
            time.sleep(0.02)
            acquired = lock.acquire()
        if not acquired:
            self._fail(job, ConflictError(f"download {job.id} is running in another Thalunix process (pid "
                                          f"{lock.holder()}); follow it there"))
            return
        try:
            self._run_locked(job)
        except Paused:
            with contextlib.suppress(OSError):
                job.bytes = self._part(job.id).stat().st_size   # progress reports lag; show what a resume keeps
            self._set(job, "paused", "paused; resume continues from the bytes on disk")
            self._write_sidecar(job)
        except Cancelled:
            self._discard_partial(job.id)
            self._set(job, "cancelled", "cancelled; the partial file was removed")
        except SignatureRefused as error:
            self._quarantine(job, str(error), error.source)
        except NoSpaceError as error:
            self._fail(job, error)
        except ThalunixError as error:
            self._fail(job, error)
        except Exception as error:  # noqa: BLE001 - a bug must end the job visibly, not kill the worker silently
            self._fail(job, ThalunixError(f"download {job.id} failed unexpectedly: {type(error).__name__}: {error}"))
        finally:
            lock.release()
            with contextlib.suppress(OSError):
                (self.data.downloads_dir / f"{job.id}.lock").unlink()

    def _run_locked(self, job: DownloadJob) -> None:
        session = self.session_factory()
        try:
            if job.resolved is None:
                self._set(job, "resolving", "finding the current image and its checksum")
                job.control.check()
                if "://" in job.source:
                    job.resolved = resolve_url(job.source, job.user_hash)
                else:
                    entry = self.catalog.get(job.source)
                    job.resolved = resolve(entry, session, self.keyring, job.user_hash)
                job.control.check()
                self._adopt(job, job.resolved)
                self._discard_partial(job.id, keep_sidecar=True)   # a new resolution: no stale bytes
                self._write_sidecar(job, durable=True)
            source = job.resolved
            assert source is not None
            self._set(job, "downloading", f"downloading {source.filename}")
            transfer = Transfer(session, source.image_urls, self._part(job.id), job.control,
                                algorithm=source.algorithm or "sha256", retry=self.retry, on_progress=job._progress,
                                on_response=lambda info: self._on_response(job, info), validators=job.validators)
            result = transfer.run()
            job.bytes, job.total, job.rate, job.eta = result.size, result.size, job.rate, 0
            self._set(job, "verifying", f"verifying {source.filename}")
            self._write_sidecar(job, durable=True)
            verdict = self._verify(job, source, result.digest)
            if verdict is not None:
                self._quarantine(job, verdict, source)
                return
            self._file(job, source, result.digest)
        finally:
            session.close()

    def _on_response(self, job: DownloadJob, info: dict[str, Any]) -> None:
        job.validators = dict(info.get("validators") or {})
        job.total = info.get("total")
        self._write_sidecar(job, durable=False)

    # -- verification -----------------------------------------------------------------------------------------
    def _verify(self, job: DownloadJob, source: ResolvedSource, digest: str) -> str | None:
        """None when the file may be used; else the reason it may not. Everything is checked again here."""
        part = self._part(job.id)
        verified = []
        if source.expected:
            if digest != source.expected:
                origin = "the SHA-256 you gave" if source.trust == "user hash" else "the publisher's checksum list"
                return (f"{source.filename} is corrupt or altered: its {source.algorithm} is {digest}, but {origin} "
                        f"says {source.expected}")
            verified.append("checksum")
        if source.signature_over == "checksums":
            table_text = source.checksums or b""
            check = verify_signature(source.signature or source.checksums or b"", allowed=source.fingerprints,
                                     keyring=self.keyring, data=None if source.signature_kind == "inline" else
                                     source.checksums, inline=source.signature_kind == "inline",
                                     what=f"the checksum list of {source.filename}")
            if not check.ok:
                return check.reason
            table_text = check.content if check.content is not None else table_text
            listed = parse_checksums(table_text.decode("utf-8", errors="replace")).get(source.filename)
            if listed is None or listed[1] != digest:
                return (f"{source.filename}: the signed checksum list does not list this file's hash {digest}; "
                        "it is not the published image")
            job.signer = source.signer = check.signer
            verified.append("signature")
        elif source.signature_over == "image":
            self._set(job, "verifying", f"checking the publisher's signature over {source.filename}")
            check = verify_signature(source.signature or b"", allowed=source.fingerprints, keyring=self.keyring,
                                     file=part, what=source.filename)
            if not check.ok:
                return check.reason
            job.signer = source.signer = check.signer
            verified.append("signature")
        # Fail closed: a catalog-signed entry must have had its signature checked; anything else a hash.
        if source.trust == "signed" and "signature" not in verified:
            return f"{source.filename}: the publisher signs this image but no signature was checked"
        if not verified:
            return f"{source.filename}: nothing could be verified (no checksum, no signature)"
        return None

    def _file(self, job: DownloadJob, source: ResolvedSource, digest: str) -> None:
        """Move a verified download into isos/ (extracting a compressed image) with its sidecar."""
        part = self._part(job.id)
        record: dict[str, Any] = {
            "name": source.filename, "source": source.image_urls[0] if source.image_urls else job.source,
            "catalog_id": source.catalog_id, "trust": source.trust, "signer": source.signer,
            "signature_over": source.signature_over, "algorithm": source.algorithm or "sha256", "digest": digest,
            "checksums_url": source.checksums_url, "defaults": source.defaults, "added": _now(),
            "verified": [v for v in ("checksum" if source.expected else "", "signature" if source.signer else "") if v],
        }
        from thalunix.downloads.library import IsoLibrary
        library = IsoLibrary(self.data)
        lower = source.filename.lower()
        if lower.endswith(COMPRESSED_SUFFIXES):
            self._set(job, "extracting", f"extracting {source.filename}")
            target_name, sha256, size = self._extract(job, part, source.filename)
            record["compressed"] = {"name": source.filename, "algorithm": record["algorithm"], "digest": digest,
                                    "size": part.stat().st_size}
            part.unlink()
            final = library.place(self.data.downloads_dir / f"{job.id}.extracted", target_name, record, sha256, size)
        else:
            sha256 = digest if (source.algorithm or "sha256") == "sha256" else None
            final = library.place(part, source.filename, record, sha256, part.stat().st_size)
        self._discard_partial(job.id)
        job.result = {"file": str(final), "path": self.data.to_stored_path(final), "name": final.name}
        job.filename = final.name
        job.message = (f"ready: {final.name} ({source.trust}" + (f", signed by {source.signer}" if source.signer
                                                                  else "") + ")")
        self._set(job, "ready", job.message)

    def _extract(self, job: DownloadJob, part: Path, name: str) -> tuple[str, str, int]:
        """Decompress after verification; returns (file name, sha256, size) of the image inside."""
        target = self.data.downloads_dir / f"{job.id}.extracted"
        digest = hashlib.sha256()
        size = 0
        try:
            if name.lower().endswith(".xz"):
                inner = name[:-3]
                with lzma.open(part, "rb") as source, open(target, "wb") as out:
                    while True:
                        job.control.check()
                        block = source.read(1 << 20)
                        if not block:
                            break
                        out.write(block)
                        digest.update(block)
                        size += len(block)
                return inner, digest.hexdigest(), size
            import py7zr
            folder = self.data.downloads_dir / f"{job.id}.7z-out"
            shutil.rmtree(folder, ignore_errors=True)
            with py7zr.SevenZipFile(part, "r") as archive:
                members = [info for info in archive.list() if not info.is_directory]
                if not members:
                    raise VerificationError(f"{name} contains no file")
                biggest = max(members, key=lambda info: info.uncompressed or 0)
                needed = biggest.uncompressed or 0
                if needed and shutil.disk_usage(self.data.downloads_dir).free < needed + (16 << 20):
                    raise NoSpaceError(f"extracting {name} needs {needed >> 20} MiB; free some space and "
                                       "start the download again")
                archive.extract(path=folder, targets=[biggest.filename])
            extracted = folder / biggest.filename
            if not extracted.is_file() or folder.resolve() not in extracted.resolve().parents:
                raise VerificationError(f"{name}: the archive member {biggest.filename!r} could not be extracted")
            with open(extracted, "rb") as handle:
                while True:
                    block = handle.read(1 << 20)
                    if not block:
                        break
                    digest.update(block)
                    size += len(block)
            os.replace(extracted, target)
            shutil.rmtree(folder, ignore_errors=True)
            return Path(biggest.filename).name, digest.hexdigest(), size
        except (lzma.LZMAError, EOFError) as error:
            target.unlink(missing_ok=True)
            raise VerificationError(f"{name} verified but does not decompress ({error}); report it to the "
                                    "publisher") from None
        except OSError as error:
            target.unlink(missing_ok=True)
            if error.errno == 28:
                raise NoSpaceError(f"the disk is full while extracting {name}; free some space and start the "
                                   "download again") from None
            raise

    # -- endings ----------------------------------------------------------------------------------------------
    def _quarantine(self, job: DownloadJob, reason: str, source: ResolvedSource | None) -> None:
        """Move the file and the evidence out of reach, with the reason; nothing of it is offered for use."""
        folder = self.data.quarantine_dir / job.id
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        filename = Path((source.filename if source else job.filename) or "download").name or "download"
        part = self._part(job.id)
        kept = None
        if part.exists():
            kept = folder / (filename + ".quarantined")
            os.replace(part, kept)
        if source is not None and source.checksums is not None:
            (folder / "checksums").write_bytes(source.checksums)
        if source is not None and source.signature is not None:
            (folder / "signature").write_bytes(source.signature)
        atomic_write_json(folder / "reason.json", {
            "id": job.id, "name": filename, "source": job.source, "reason": reason, "time": _now(),
            "file": kept.name if kept else None, "urls": source.image_urls if source else [],
            "fingerprints": source.fingerprints if source else []})
        self._discard_partial(job.id)
        job.error, job.error_code = reason, "quarantined"
        job.result = {"quarantine": str(folder)}
        self._set(job, "quarantined", f"quarantined: {reason}")

    def _fail(self, job: DownloadJob, error: ThalunixError) -> None:
        job.error, job.error_code = str(error), error.code
        self._set(job, "failed", str(error))
        if self._sidecar(job.id).exists() or self._part(job.id).exists():
            self._write_sidecar(job)

    def _discard_partial(self, job_id: str, keep_sidecar: bool = False) -> None:
        paths = [self._part(job_id), self.data.downloads_dir / f"{job_id}.extracted"]
        if not keep_sidecar:
            paths.append(self._sidecar(job_id))
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()
        shutil.rmtree(self.data.downloads_dir / f"{job_id}.7z-out", ignore_errors=True)

    # -- state and persistence ----------------------------------------------------------------------------------
    def _adopt(self, job: DownloadJob, source: ResolvedSource) -> None:
        job.filename, job.trust, job.signer = source.filename, source.trust, source.signer
        job.catalog_id = source.catalog_id

    def _set(self, job: DownloadJob, state: str, message: str) -> None:
        job.state, job.message = state, message
        if state in ("paused", "failed", "cancelled", "ready", "quarantined"):
            job.rate, job.eta = 0.0, None
        self._publish(job, force=True)

    def _publish(self, job: DownloadJob, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - job._last_publish < PUBLISH_INTERVAL:
            return
        job._last_publish = now
        job.revision += 1
        self.bus.publish("job.progress", job=job.id, **{k: v for k, v in job.to_dict().items() if k != "id"})

    def _write_sidecar(self, job: DownloadJob, durable: bool = True) -> None:
        source = job.resolved
        record = {
            "id": job.id, "source": job.source, "user_hash": job.user_hash, "catalog_id": job.catalog_id,
            "filename": job.filename, "state": job.state, "bytes_done": job.bytes, "total": job.total,
            "validators": job.validators, "error": job.error, "created": job.created, "updated": _now(),
            "resolved": source.to_dict() if source else None,
            "checksums": _b64(source.checksums) if source else None,
            "signature": _b64(source.signature) if source else None,
        }
        with contextlib.suppress(OSError):
            atomic_write_json(self._sidecar(job.id), record, durable=durable)

    def _load_sidecar(self, job: DownloadJob) -> None:
        record = self.data.read_json(self._sidecar(job.id), None)
        if not isinstance(record, dict) or not record.get("resolved"):
            return
        saved = record["resolved"]
        try:
            source = ResolvedSource(**saved)
        except TypeError:
            return
        if job.user_hash and source.expected and source.expected != job.user_hash:
            return
        source.checksums = _unb64(record.get("checksums"))
        source.signature = _unb64(record.get("signature"))
        job.resolved = source
        job.user_hash = job.user_hash or record.get("user_hash")
        job.validators = dict(record.get("validators") or {})
        job.created = record.get("created") or job.created
        job.error = record.get("error")
        self._adopt(job, source)
        with contextlib.suppress(OSError):
            job.bytes = self._part(job.id).stat().st_size
        job.total = record.get("total")


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode() if data is not None else None


def _unb64(text: str | None) -> bytes | None:
    return base64.b64decode(text) if text else None


__all__ = ["DownloadManager", "DownloadJob", "JOB_STATES", "job_id_for", "apply_user_hash"]
