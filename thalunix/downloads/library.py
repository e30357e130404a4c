"""The ISO library: verified downloads and local ISOs in ``isos/``, each with a sidecar saying where it came from.

A sidecar ``isos/<file>.json`` records the source, the SHA-256, the trust (``signed``, ``checksum only``,
``user hash``, ``local``) and who signed it. A local ISO can also be registered where it lies (the sidecar
then holds its absolute path), so a 6 GB image on another disk is not copied unless asked.

Listing merges three places: ``isos/`` (status ``ready``), the download queue and the partial files in
``downloads/`` (``downloading``/``verifying``), and ``downloads/quarantine/`` (``quarantined``, with the reason).

Example::

    library = IsoLibrary(data)
    library.add("~/Downloads/alpine.iso", sha256="…")     # hashed; refused if the hash differs
    [iso["status"] for iso in library.list()]              # ["ready", "downloading", "quarantined"]
    library.find_ready("alpine")                            # Path of the ISO, for `vm create --iso alpine`
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thalunix.downloads.verifier import VerificationError, hash_file, normalise_hex
from thalunix.errors import ConflictError, NotFoundError, ValidationError
from thalunix.store import DataFolder, atomic_write_json

if TYPE_CHECKING:
    from thalunix.downloads.queue import DownloadManager

IMAGE_SUFFIXES = (".iso", ".img", ".raw", ".qcow2")
SIDECAR_SUFFIX = ".json"


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _status_of(state: str) -> str:
    if state in ("verifying", "extracting"):
        return "verifying"
    if state in ("quarantined", "ready"):
        return state
    return "downloading"


class IsoLibrary:
    def __init__(self, data: DataFolder) -> None:
        self.data = data

    # -- reading --------------------------------------------------------------------------------------------
    def ready(self) -> list[dict[str, Any]]:
        """Every usable ISO: sidecar entries (files in isos/ or registered elsewhere) and bare files in isos/."""
        rows: list[dict[str, Any]] = []
        described: set[str] = set()
        folder = self.data.isos_dir
        try:
            items = sorted(folder.iterdir())
        except OSError:
            items = []
        for item in items:
            if item.suffix != SIDECAR_SUFFIX or item.name.startswith("."):
                continue
            record = self.data.read_json(item, None)
            if not isinstance(record, dict) or not record.get("file"):
                continue
            path = self.data.resolve(record["file"])
            described.add(str(path))
            try:
                size: int | None = path.stat().st_size
            except OSError:
                size = None
            rows.append({**record, "status": "ready" if size is not None else "missing", "size": size,
                         "full_path": str(path), "sidecar": item.name})
        for item in items:
            if (item.suffix.lower() in IMAGE_SUFFIXES and item.is_file() and not item.name.startswith(".")
                    and str(item) not in described):
                rows.append({"name": item.name, "file": self.data.to_stored_path(item), "full_path": str(item),
                             "size": item.stat().st_size, "status": "ready", "trust": "local",
                             "sha256": None, "source": None, "note": "placed in isos/ by hand; not checked"})
        return rows

    def quarantined(self) -> list[dict[str, Any]]:
        rows = []
        try:
            folders = sorted(self.data.quarantine_dir.iterdir())
        except OSError:
            return rows
        for folder in folders:
            record = self.data.read_json(folder / "reason.json", None)
            if isinstance(record, dict):
                rows.append({"name": record.get("name"), "status": "quarantined", "job": record.get("id"),
                             "reason": record.get("reason"), "time": record.get("time"), "source": record.get("source"),
                             "full_path": str(folder)})
        return rows

    def list(self, manager: "DownloadManager | None" = None) -> list[dict[str, Any]]:
        """Ready ISOs, then downloads in progress (live jobs or partials on disk), then quarantined ones."""
        rows = self.ready()
        jobs: dict[str, dict[str, Any]] = {}
        if manager is not None:
            for job in manager.list():
                jobs[job["id"]] = job
        for sidecar in sorted(self.data.downloads_dir.glob("*.json")):
            if sidecar.stem not in jobs:
                record = self.data.read_json(sidecar, None)
                if isinstance(record, dict) and record.get("id") == sidecar.stem:
                    part = self.data.downloads_dir / f"{sidecar.stem}.part"
                    jobs[sidecar.stem] = {"id": sidecar.stem, "filename": record.get("filename"),
                                          "state": "paused", "bytes": part.stat().st_size if part.exists() else 0,
                                          "total": record.get("total"), "source": record.get("source"),
                                          "error": record.get("error"), "trust": (record.get("resolved") or {})
                                          .get("trust")}
        for job in jobs.values():
            if job["state"] in ("ready", "cancelled", "quarantined"):
                continue   # listed from isos/ or quarantine/, or gone
            rows.append({"name": job.get("filename") or job.get("source"), "status": _status_of(job["state"]),
                         "job": job["id"], "job_state": job["state"], "bytes": job.get("bytes"),
                         "total": job.get("total"), "trust": job.get("trust"), "source": job.get("source"),
                         "error": job.get("error")})
        rows.extend(self.quarantined())
        return rows

    def find_ready(self, name: str) -> Path:
        """A ready ISO by file name, name without extension, or the catalog id it was downloaded from."""
        wanted = name.strip().lower()
        matches = []
        for row in self.ready():
            if row["status"] != "ready":
                continue
            names = {str(row.get("name", "")).lower(), Path(row["full_path"]).name.lower(),
                     Path(row["full_path"]).stem.lower(), str(row.get("catalog_id") or "").lower()}
            if wanted in names:
                matches.append(Path(row["full_path"]))
        if not matches:
            raise NotFoundError(f"no ready ISO named {name!r}; `thalunix iso list` shows them, "
                                "`thalunix iso download ID` fetches one")
        return max(matches, key=lambda p: p.stat().st_mtime)

    # -- writing --------------------------------------------------------------------------------------------
    def add(self, path: str | os.PathLike[str], sha256: str | None = None, copy: bool = False,
            catalog_id: str | None = None) -> dict[str, Any]:
        """Register a local ISO (hashing it); refused when ``sha256`` is given and differs.

        ``catalog_id`` says which catalog entry the file is (e.g. a Windows ISO fetched by hand from
        Microsoft's page), so a VM made from it gets that entry's defaults.
        """
        source = Path(path).expanduser().absolute()
        if not source.is_file():
            raise ValidationError(f"{source} is not a file; check the path", "path")
        wanted = normalise_hex(sha256, "--sha256") if sha256 else None
        algorithm = "sha512" if wanted and len(wanted) == 128 else "sha256"
        actual = hash_file(source, algorithm)
        if wanted and actual != wanted:
            raise VerificationError(f"{source} does not match the {algorithm.upper()} you gave: it is {actual}, "
                                    f"expected {wanted}; the file is damaged or another version. Nothing was added",
                                    "sha256")
        sha = actual if algorithm == "sha256" else hash_file(source)
        record = {"name": source.name, "source": str(source), "catalog_id": catalog_id,
                  "trust": "user hash" if wanted else "local", "signer": None, "algorithm": algorithm,
                  "digest": actual, "added": _now(), "verified": ["checksum"] if wanted else []}
        inside = self.data.isos_dir.absolute() in source.parents
        if copy and not inside:
            staging = self.data.isos_dir / f".{source.name}.copy"
            shutil.copyfile(source, staging)
            final = self.place(staging, source.name, record, sha, source.stat().st_size)
        else:
            final = self._describe(source, source.name, record, sha, source.stat().st_size, external=not inside)
        return self._row(final)

    def place(self, staged: Path, name: str, record: dict[str, Any], sha256: str | None, size: int) -> Path:
        """Move a verified file into isos/ under a free name and write its sidecar (file first, then sidecar)."""
        folder = self.data.isos_dir
        folder.mkdir(parents=True, exist_ok=True)
        safe = Path(name).name or "image.iso"
        target = folder / safe
        if target.exists():
            existing = self._sidecar_record(target)
            if sha256 and existing and existing.get("sha256") == sha256:
                staged.unlink(missing_ok=True)     # the very same image is already here
                return target
            stem, suffix = os.path.splitext(safe)
            number = 1
            while (folder / f"{stem}-{number}{suffix}").exists():
                number += 1
            target = folder / f"{stem}-{number}{suffix}"
        os.replace(staged, target)
        return self._describe(target, target.name, record, sha256, size, external=False)

    def _describe(self, path: Path, name: str, record: dict[str, Any], sha256: str | None, size: int,
                  external: bool) -> Path:
        sidecar_name = name if not external else name
        sidecar = self.data.isos_dir / f"{sidecar_name}{SIDECAR_SUFFIX}"
        if external and sidecar.exists():
            existing = self.data.read_json(sidecar, {}) or {}
            if self.data.resolve(existing.get("file", "")) != path:
                raise ConflictError(f"another ISO named {name} is already registered ({existing.get('file')}); "
                                    "rename the file or remove the other one")
        if sha256 is None:
            sha256 = hash_file(path)
        atomic_write_json(sidecar, {**record, "name": name, "file": self.data.to_stored_path(path), "sha256": sha256,
                                    "size": size})
        return path

    def _sidecar_record(self, path: Path) -> dict[str, Any] | None:
        record = self.data.read_json(path.with_name(path.name + SIDECAR_SUFFIX), None)
        return record if isinstance(record, dict) else None

    def _row(self, path: Path) -> dict[str, Any]:
        for row in self.ready():
            if Path(row["full_path"]) == path:
                return row
        raise NotFoundError(f"{path} was added but cannot be listed")

    def remove_quarantined(self, job_id: str) -> None:
        folder = self.data.quarantine_dir / job_id
        if not (folder / "reason.json").exists():
            raise NotFoundError(f"no quarantined download {job_id!r}")
        shutil.rmtree(folder)
