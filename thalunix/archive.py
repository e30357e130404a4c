"""Export a stopped VM as one ``.7z`` file, and import such a file as a new VM, verified before it exists.

The archive holds ``manifest.json`` (format, the VM's config, and for every other member
its size and SHA-256), ``vm.json``, ``disks/…``, ``firmware/…`` (UEFI variables),
``tpm/…`` (TPM state) and the snapshot metadata. Disks stay small: a raw or
snapshot-free qcow2 disk is stored as a compressed qcow2 when that is smaller (and turned
back into a sparse raw image on import); a linked clone's disk is flattened. Members
are then stored without a second compression (``copy``) unless one could still shrink.

Import extracts into a work folder under ``tmp/``, checks every member against the
manifest (names, sizes, SHA-256; py7zr checks the CRCs), and only then registers the
VM by one rename into ``vms/``, under a new name when its name is taken. A bad,
truncated or foreign file is refused with nothing written to ``vms/``.

Example::

    export_vm(engine, vm, Path("web.7z"), job)          # {"file": ..., "size": ..., "members": [...]}
    import_vm(engine, Path("web.7z"), job, name=None)   # {"name": "web-2", "id": ..., "renamed": True}
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import py7zr
import py7zr.exceptions
import py7zr.io

from thalunix import __version__, disks
from thalunix.errors import ThalunixError, ValidationError
from thalunix.jobs import Job, WorkFolder
from thalunix.model import VMConfig, random_mac, validate, validate_name
from thalunix.qemu.img import qcow2_backing_file

if TYPE_CHECKING:
    from thalunix.engine import DirectEngine

MANIFEST = "manifest.json"
FORMAT = "thalunix-vm-export"
VERSION = 1
_MEMBER = re.compile(r"^(vm\.json|(disks|firmware|tpm|snapshots)/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*)$")
CHUNK = 1 << 20


class ArchiveError(ThalunixError):
    """An export could not be written, or an import file is not a sound Thalunix export."""

    code = "archive"
    http_status = 400


def _sha256(path: Path, progress: Callable[[int], None] | None = None, job: Job | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            if progress:
                progress(len(chunk))
            if job:
                job.check_cancelled()
    return digest.hexdigest()


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)   # same filesystem (the data folder): no copy at all
    except OSError:
        shutil.copy2(source, target)


class _CountingReader(io.BufferedReader):
    """A file py7zr reads from, reporting bytes read and stopping when the job is cancelled."""

    def __init__(self, path: Path, on_read: Callable[[int], None], job: Job) -> None:
        super().__init__(io.FileIO(path, "rb"), CHUNK)
        self._on_read = on_read
        self._job = job

    def read(self, size: int | None = -1) -> bytes:  # type: ignore[override]
        data = super().read(size)
        self._on_read(len(data))
        self._job.check_cancelled()
        return data


# -- export ---------------------------------------------------------------------------------------------
def export_precheck(engine: "DirectEngine", config: VMConfig, file: str | os.PathLike[str]) -> Path:
    """Everything that refuses an export, checked before any job starts; returns the target path."""
    target = Path(file).expanduser().absolute()
    if target.suffix.lower() != ".7z":
        raise ValidationError(f"export file {target.name!r} must end in .7z", "file")
    if target.exists():
        raise ValidationError(f"{target} already exists; pick another file name or delete it first", "file")
    if not target.parent.is_dir():
        raise ValidationError(f"folder {target.parent} does not exist; create it or pick another place", "file")
    disks.require_stopped(engine, config, "export it")
    return target


def export_vm(engine: "DirectEngine", config: VMConfig, file: str | os.PathLike[str], job: Job) -> dict[str, Any]:
    """Write the stopped VM to ``file`` (.7z); the file appears whole or not at all."""
    config = disks.reload(engine, config)
    target = export_precheck(engine, config, file)
    img = disks.qemu_img(engine)
    with WorkFolder(engine.data, f"export-{config.id[:8]}") as work:
        root = work / "vm"
        members: list[dict[str, Any]] = []
        # LZMA pays only for members nobody compressed yet that may still shrink (images kept whole for
        # their internal snapshots); compressed or incompressible disks are stored as they are.
        lzma_helps = False
        total_virtual = sum(max(1, int(img.info(disks.disk_path(engine, d)).get("virtual-size", 1)))
                            for d in config.disks) or 1
        done = 0
        names: set[str] = set()
        for disk in config.disks:
            source = disks.disk_path(engine, disk)
            size = max(1, int(img.info(source).get("virtual-size", 1)))
            stem = disk.id if disk.id not in names else f"{disk.id}-{len(names)}"
            names.add(stem)
            span = (60 * done / total_virtual, 60 * (done + size) / total_virtual)
            with job.step(*span, f"preparing disk {disk.id}"):
                entry = _prepare_disk(engine, disk.id, disk.format, source, root / "disks", stem, job)
            lzma_helps |= entry.pop("lzma_helps")
            members.append(entry)
            done += size
        for folder, kind in (("firmware", "firmware"), ("tpm", "tpm"), ("snapshots", "snapshots")):
            source_dir = engine.data.vm_path(config.id, folder)
            if not source_dir.is_dir():
                continue
            for item in sorted(source_dir.rglob("*")):
                if item.is_file() and not item.name.endswith(".prev") and not item.name.startswith("."):
                    relative = f"{folder}/{item.relative_to(source_dir).as_posix()}"
                    _link_or_copy(item, root / relative)
                    members.append({"path": relative, "kind": kind})
        meta = engine.data.vm_path(config.id, "snapshots.json")
        if meta.is_file():
            _link_or_copy(meta, root / "snapshots" / "snapshots.json")
            members.append({"path": "snapshots/snapshots.json", "kind": "snapshot-meta"})
        (root / "vm.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        members.append({"path": "vm.json", "kind": "config"})
        for member in members:
            if not _MEMBER.match(member["path"]):
                raise ArchiveError(f"{config.label}: file {member['path']!r} has a name an export cannot hold; "
                                   "rename it (letters, digits, '.', '_' and '-')")
        total = sum((root / m["path"]).stat().st_size for m in members) or 1
        hashed = 0

        def hashed_some(count: int) -> None:
            nonlocal hashed
            hashed += count
            job.update(100 * hashed / total)
        with job.step(60, 70, "computing SHA-256 sums"):
            for member in members:
                path = root / member["path"]
                member["size"] = path.stat().st_size
                member["sha256"] = _sha256(path, hashed_some, job)
        manifest = {"format": FORMAT, "version": VERSION, "thalunix": __version__,
                    "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "vm": config.to_dict(), "members": members}
        partial = work / "export.7z"
        written = 0

        def wrote_some(count: int) -> None:
            nonlocal written
            written += count
            job.update(100 * written / total)
        filters = [{"id": py7zr.FILTER_LZMA2, "preset": 1}] if lzma_helps else [{"id": py7zr.FILTER_COPY}]
        with job.step(70, 97, "writing the archive"):
            try:
                with py7zr.SevenZipFile(partial, "w", filters=filters) as archive:
                    archive.writestr(json.dumps(manifest, indent=2) + "\n", MANIFEST)
                    for member in members:
                        with _CountingReader(root / member["path"], wrote_some, job) as reader:
                            archive.writef(reader, member["path"])
            except OSError as error:
                raise ArchiveError(f"{config.label}: writing the archive failed: {error.strerror or error}; "
                                   f"check the free space in {engine.data.tmp_dir}") from None
        job.check_cancelled()
        staged = target.with_name(f".{target.name}.{uuid.uuid4().hex[:6]}.partial")
        try:
            shutil.move(str(partial), staged)   # a rename on the same filesystem, else a copy beside the target
            os.replace(staged, target)
        except OSError as error:
            staged.unlink(missing_ok=True)
            raise ArchiveError(f"{config.label}: cannot write {target}: {error.strerror or error}") from None
    engine.supervisor.vm_log(config, f"exported to {target}")
    job.update(100, f"exported to {target.name}")
    return {"file": str(target), "size": target.stat().st_size,
            "members": [{k: m[k] for k in ("path", "size", "sha256")} for m in members]}


def _prepare_disk(engine: "DirectEngine", disk_id: str, fmt: str, source: Path, folder: Path, stem: str,
                  job: Job) -> dict[str, Any]:
    """Put the disk into ``folder`` in its smallest faithful form; returns its manifest entry."""
    img = disks.qemu_img(engine)
    folder.mkdir(parents=True, exist_ok=True)
    has_backing = bool(qcow2_backing_file(source)) if fmt == "qcow2" else False
    snapshots = img.snapshots(source) if fmt == "qcow2" else []
    entry: dict[str, Any] = {"kind": "disk", "disk": disk_id, "format": fmt}
    if snapshots and not has_backing:
        # Internal snapshots survive only in the image itself.
        _link_or_copy(source, folder / f"{stem}.qcow2")
        return {**entry, "path": f"disks/{stem}.qcow2", "stored_format": "qcow2", "lzma_helps": True}
    compact = folder / f"{stem}.qcow2"
    img.convert(source, compact, "qcow2", fmt, compress=True, progress=lambda pct: job.update(pct),
                track=job.track)
    job.check_cancelled()
    # Compared with the source's full length, not its allocated blocks: that is what a member costs in the
    # archive and what extracting it writes (zeros and all), while qemu-img makes the raw sparse again on import.
    if has_backing or compact.stat().st_size < source.stat().st_size:
        return {**entry, "path": f"disks/{stem}.qcow2", "stored_format": "qcow2", "lzma_helps": False,
                "dropped_snapshots": [s["name"] for s in snapshots]}
    compact.unlink()
    name = f"{stem}{'.qcow2' if fmt == 'qcow2' else '.img'}"
    _link_or_copy(source, folder / name)
    # Compression did not make it smaller: its data does not compress, LZMA would only cost time.
    return {**entry, "path": f"disks/{name}", "stored_format": fmt, "lzma_helps": False}


# -- import ---------------------------------------------------------------------------------------------
class _HashingWriter(py7zr.io.Py7zIO):
    """Where py7zr writes one member: a file in the work folder, hashed on the way, with progress."""

    def __init__(self, path: Path, limit: int, on_write: Callable[[int], None]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.limit = limit
        self.handle = open(path, "wb")
        self.digest = hashlib.sha256()
        self.written = 0
        self._on_write = on_write

    def write(self, s: bytes | bytearray) -> int:
        if self.written + len(s) > self.limit:
            # More than the manifest says: a damaged or hostile archive must not fill the disk.
            raise ArchiveError(f"archive member {self.path.name} is larger than its manifest says; the archive "
                               "is damaged; nothing was imported")
        self.handle.write(s)
        self.digest.update(s)
        self.written += len(s)
        self._on_write(len(s))
        return len(s)

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.written

    def flush(self) -> None:
        self.handle.flush()

    def size(self) -> int:
        return self.written

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()


class _Factory(py7zr.io.WriterFactory):
    def __init__(self, root: Path, allowed: dict[str, int], on_write: Callable[[int], None], job: Job) -> None:
        self.root, self.allowed, self.on_write, self.job = root, allowed, on_write, job
        self.writers: dict[str, _HashingWriter] = {}

    def create(self, filename: str) -> py7zr.io.Py7zIO:
        self.job.check_cancelled()
        if filename not in self.allowed:
            raise ArchiveError(f"archive member {filename!r} is not in its manifest")
        writer = _HashingWriter(self.root / filename, self.allowed[filename], self.on_write)
        self.writers[filename] = writer
        return writer


def _refuse(file: Path, why: str) -> ArchiveError:
    return ArchiveError(f"{file.name} cannot be imported: {why}; nothing was imported")


def read_manifest(file: Path) -> dict[str, Any]:
    """Open ``file`` as a Thalunix export and return its checked manifest (members not yet verified)."""
    if not file.is_file():
        raise ValidationError(f"{file} does not exist; check the path", "file")
    if not py7zr.is_7zfile(file):
        raise _refuse(file, "it is not a 7z archive (a Thalunix export is a .7z file made by `vm export`)")
    try:
        with py7zr.SevenZipFile(file, "r") as archive:
            names = archive.getnames()
            if MANIFEST not in names:
                raise _refuse(file, "it has no manifest.json, so it is not a Thalunix export")
            holder: dict[str, Any] = {}

            class Grab(py7zr.io.WriterFactory):
                def create(self, filename: str) -> py7zr.io.Py7zIO:
                    holder[filename] = py7zr.io.BytesIOFactory(1 << 22).create(filename)
                    return holder[filename]
            archive.extract(targets=[MANIFEST], factory=Grab())
            holder[MANIFEST].seek(0)
            raw = holder[MANIFEST].read()
    except ArchiveError:
        raise
    except (py7zr.exceptions.ArchiveError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, py7zr.exceptions.CrcError, MemoryError) as error:
        raise _refuse(file, f"the archive is damaged or truncated ({type(error).__name__}: {error})") from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise _refuse(file, "its manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _refuse(file, "its manifest is not a Thalunix VM export manifest")
    if manifest.get("version") != VERSION:
        raise _refuse(file, f"it is export format version {manifest.get('version')!r}; this Thalunix reads "
                            f"version {VERSION} (update Thalunix)")
    members = manifest.get("members")
    if not isinstance(members, list) or not members:
        raise _refuse(file, "its manifest lists no files")
    seen = set()
    for member in members:
        path = member.get("path") if isinstance(member, dict) else None
        if not isinstance(path, str) or not _MEMBER.match(path) or ".." in path.split("/") or path in seen:
            raise _refuse(file, f"its manifest names a file {path!r} that an export cannot hold")
        if not isinstance(member.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", member["sha256"]) \
                or not isinstance(member.get("size"), int) or member["size"] < 0:
            raise _refuse(file, f"its manifest has no valid SHA-256 and size for {path!r}")
        seen.add(path)
    extra = set(names) - seen - {MANIFEST}
    if extra:
        raise _refuse(file, f"it holds files its manifest does not list: {', '.join(sorted(extra)[:5])}")
    missing = seen - set(names)
    if missing:
        raise _refuse(file, f"files listed in its manifest are missing: {', '.join(sorted(missing)[:5])}")
    try:
        config = VMConfig.from_dict(manifest.get("vm"))
        validate_name(config.name)
    except ValidationError as error:
        raise _refuse(file, f"its VM config is not valid ({error})") from None
    return manifest


def import_vm(engine: "DirectEngine", file: str | os.PathLike[str], job: Job, name: str | None = None) -> dict[str, Any]:
    """Verify every member of the export, then register it as a VM (renamed on a name clash)."""
    source = Path(file).expanduser().absolute()
    manifest = read_manifest(source)
    if name is not None:
        validate_name(name)
    members = {m["path"]: m for m in manifest["members"]}
    total = sum(m["size"] for m in members.values()) or 1
    if total + (64 << 20) > engine.data.free_space():
        raise ArchiveError(f"{source.name} needs {total >> 20} MiB but the data folder {engine.data.root} has "
                           f"{engine.data.free_space() >> 20} MiB free; free some space first")
    config = VMConfig.from_dict(manifest["vm"])
    original_name = config.name
    with WorkFolder(engine.data, "import") as work:
        root = work / "vm"
        written = 0

        def wrote_some(count: int) -> None:
            nonlocal written
            written += count
            job.update(100 * written / total)
        factory = _Factory(root, {path: m["size"] for path, m in members.items()}, wrote_some, job)
        with job.step(0, 80, f"extracting and verifying {source.name}"):
            try:
                with py7zr.SevenZipFile(source, "r") as archive:
                    archive.extract(targets=list(members), factory=factory)
            except ThalunixError:
                raise
            except (py7zr.exceptions.ArchiveError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
                    AttributeError, py7zr.exceptions.CrcError, MemoryError) as error:
                raise _refuse(source, f"the archive is damaged or truncated ({type(error).__name__}: {error})") \
                    from None
            finally:
                for writer in factory.writers.values():
                    writer.close()
        for path, member in members.items():
            writer = factory.writers.get(path)
            if writer is None:
                raise _refuse(source, f"{path} could not be read from the archive")
            if writer.written != member["size"] or writer.digest.hexdigest() != member["sha256"]:
                raise _refuse(source, f"{path} does not match its SHA-256 in the manifest (the file is damaged)")
        job.check_cancelled()
        # Verified. Now make it a VM: its own id (a new one if this data folder has it), disks as they were.
        if engine.data.vm_dir(config.id).exists():
            config.id = uuid.uuid4().hex
            for nic in config.nics:
                nic.mac = random_mac()
        from thalunix import net
        net.ensure_unique_macs(engine.data, config, generated=range(len(config.nics)))   # another VM may have one
        if name:
            config.name = name
        by_disk = {m["disk"]: m for m in members.values() if m.get("kind") == "disk"}
        img = disks.qemu_img(engine)
        with job.step(80, 98, "preparing the disks"):
            for disk in config.disks:
                member = by_disk.get(disk.id)
                if member is None:
                    raise _refuse(source, f"the manifest has no image for disk {disk.id}")
                stored = root / member["path"]
                final_name = Path(member["path"]).name
                if member.get("stored_format") == "qcow2" and member.get("format") == "raw":
                    final_name = Path(final_name).stem + ".img"
                    img.convert(stored, root / "disks" / final_name, "raw", "qcow2", progress=job.update,
                                track=job.track)
                    stored.unlink()
                disk.format = member.get("format", disk.format)
                disk.path = engine.data.to_stored_path(engine.data.vm_path(config.id, "disks", final_name))
        meta = root / "snapshots" / "snapshots.json"
        if meta.is_file():
            os.replace(meta, root / "snapshots.json")
        (root / "vm.json").unlink(missing_ok=True)
        config.set_defaults()
        validate(config, None, file_exists=lambda p: p.startswith(f"vms/{config.id}/") or engine.data.exists(p))
        created = engine.data.adopt_vm(root, config, rename_on_clash=True)
    engine.supervisor.vm_log(created, f"imported from {source}")
    job.update(100, f"imported as {created.name!r}")
    return {"name": created.name, "id": created.id, "renamed": created.name != (name or original_name),
            "original_name": original_name, "folder": str(engine.data.vm_dir(created.id))}
