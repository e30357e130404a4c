"""The data folder: where every VM, ISO, download and cache lives, and the only module that lays it out.

The folder is portable: it sits next to the executable (``thalunix-data/``) and
VM configs store paths relative to it, so it survives a move to another drive
letter or mount point. Layout::

    thalunix-data/
      vms/<vm-id>/vm.json        the config (previous version kept as vm.json.prev)
      vms/<vm-id>/disks/         disk images
      vms/<vm-id>/firmware/      UEFI variable store
      vms/<vm-id>/tpm/           TPM state
      vms/<vm-id>/logs/          qemu.log (QEMU's stderr), serial.log, events.log
      vms/<vm-id>/run/           QMP and serial sockets, state.json, lock (while running)
      networks/<name>.json       a custom (private) network; <name>.run/ its switch's lock and port while it runs
      hosts.json                 libvirt hosts (name, URI) listed beside the local VMs
      isos/  downloads/  cache/  runtime/  tmp/  logs/

Writes are atomic (temp file, fsync, rename); a VM is driven by one Thalunix
process at a time (:meth:`DataFolder.lock_vm`).

Example::

    data = DataFolder.open()                # --data-dir, $THALUNIX_DATA, next to the exe, or the checkout
    vm = data.create_vm(VMConfig(name="web"))
    with data.lock_vm(vm.id):
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from thalunix.errors import (ConflictError, CorruptConfigError, DataFolderError, LockedError, NotFoundError,
                             ValidationError)
from thalunix.model import VMConfig, validate_name

ENV_DATA_DIR = "THALUNIX_DATA"
FOLDER_NAME = "thalunix-data"
CONFIG_NAME = "vm.json"
SUBFOLDERS = ("vms", "isos", "downloads", "cache", "runtime", "tmp", "logs", "networks")
VM_SUBFOLDERS = ("disks", "firmware", "tpm", "logs", "run")


def default_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the data folder is: the flag, ``$THALUNIX_DATA``, next to the frozen exe, or the checkout."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).expanduser().absolute()
    if getattr(sys, "frozen", False):
        # realpath: the exe may be started through a symlink; the data lives by the real file.
        return Path(os.path.dirname(os.path.realpath(sys.executable))) / FOLDER_NAME
    return Path(__file__).resolve().parent.parent / FOLDER_NAME


def atomic_write_bytes(path: Path, data: bytes, keep_previous: bool = False, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never half of one.

    ``durable=False`` skips the fsyncs, for run-time state that means nothing after a host crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if keep_previous and path.exists():
            previous = path.with_name(path.name + ".prev")
            _copy_atomically(path, previous)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any, keep_previous: bool = False, durable: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode(), keep_previous,
                       durable)


def _copy_atomically(source: Path, target: Path) -> None:
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(source, temp)           # cheap, and the old inode stays whole
        except OSError:                     # FAT/exFAT sticks have no hard links
            shutil.copy2(source, temp)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FileLock:
    """An exclusive advisory lock on a file, released by the OS when the process dies.

    Being released on death is the point: a Thalunix killed with SIGKILL leaves no
    stale lock behind, and the next one can re-attach to the VM.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            if os.name == "nt":
                import msvcrt
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            else:
                import fcntl
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()   # closing drops the lock on every platform
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None


@dataclass
class VMEntry:
    """One folder under ``vms/``: its config, or why it could not be read."""

    id: str
    folder: Path
    config: VMConfig | None
    error: str | None = None


class DataFolder:
    """The portable data folder. Every read and write of its layout goes through here."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self._vm_locks: dict[str, FileLock] = {}

    @classmethod
    def open(cls, explicit: str | os.PathLike[str] | None = None) -> "DataFolder":
        """Open (creating if needed) the data folder and check that it is writable."""
        folder = cls(default_data_dir(explicit))
        folder.ensure()
        return folder

    def ensure(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise DataFolderError(f"data folder {self.root} is a file, not a folder; "
                                  "pass --data-dir with a folder")
        try:
            for name in SUBFOLDERS:
                (self.root / name).mkdir(parents=True, exist_ok=True)
            probe = self.root / "tmp" / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as error:
            raise DataFolderError(
                f"data folder {self.root} is not writable ({error.strerror or error}); the medium may be "
                "read-only. Start Thalunix with --data-dir pointing to a writable folder") from None

    # -- layout ---------------------------------------------------------------------------------------
    @property
    def vms_dir(self) -> Path:
        return self.root / "vms"

    @property
    def isos_dir(self) -> Path:
        return self.root / "isos"

    @property
    def downloads_dir(self) -> Path:
        return self.root / "downloads"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "runtime"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def quarantine_dir(self) -> Path:
        """Downloads that failed verification, kept with the reason, never offered as usable."""
        return self.downloads_dir / "quarantine"

    @property
    def keys_dir(self) -> Path:
        """Publisher OpenPGP keys fetched by a key refresh (the shipped ones live in the app)."""
        return self.cache_dir / "keys"

    @property
    def catalog_file(self) -> Path:
        """A refreshed ISO catalog (its signature beside it as ``catalog.json.sig``)."""
        return self.cache_dir / "catalog.json"

    @property
    def hosts_file(self) -> Path:
        """The libvirt hosts Thalunix manages besides this folder (:mod:`thalunix.libvirt.hosts` keeps it)."""
        return self.root / "hosts.json"

    @property
    def networks_dir(self) -> Path:
        return self.root / "networks"

    def network_file(self, name: str) -> Path:
        """``networks/<name>.json``; the name is checked by thalunix.net before it gets here."""
        if not name or any(c in name for c in "/\\.:\x00"):
            raise ValidationError(f"{name!r} is not a network name", "network")
        return self.networks_dir / f"{name}.json"

    def network_run_path(self, name: str, part: str) -> Path:
        """The running switch's files (lock, port) in ``networks/<name>.run/``."""
        return self.network_file(name).with_suffix(".run") / part

    def network_names(self) -> list[str]:
        try:
            return sorted(p.stem for p in self.networks_dir.glob("*.json") if not p.name.startswith("."))
        except OSError:
            return []

    def vm_dir(self, vm_id: str) -> Path:
        if not vm_id or not all(c in "0123456789abcdef" for c in vm_id):
            raise ValidationError(f"{vm_id!r} is not a VM id", "id")
        return self.vms_dir / vm_id

    def vm_path(self, vm_id: str, *parts: str) -> Path:
        return self.vm_dir(vm_id).joinpath(*parts)

    # -- paths stored in configs ------------------------------------------------------------------------
    def to_stored_path(self, path: str | os.PathLike[str]) -> str:
        """Relative (with ``/``) when inside the data folder, so the folder can move; else absolute."""
        absolute = Path(path).expanduser().absolute()
        try:
            return absolute.relative_to(self.root).as_posix()
        except ValueError:
            return str(absolute)

    def resolve(self, stored: str) -> Path:
        """The real path of a path as stored in a config."""
        path = Path(stored)
        return path if path.is_absolute() else self.root / path

    def exists(self, stored: str) -> bool:
        return self.resolve(stored).is_file()

    # -- VMs ------------------------------------------------------------------------------------------
    def list_vms(self) -> list[VMEntry]:
        """Every VM folder, sorted by name; a broken config is listed with its error, not hidden."""
        entries = [self.read_vm(vm_id) for vm_id in self.vm_stamps()]
        entries.sort(key=lambda entry: (entry.config.name.lower() if entry.config else "~" + entry.id))
        return entries

    def vm_stamps(self) -> dict[str, tuple[int, int, int] | None]:
        """Each VM folder's id → a stamp of its config file (inode, size, mtime) that changes with every save.

        Cheap (one directory scan, one stat per VM): callers cache what they derive from a config by it.
        """
        return {vm_id: stamps[0] for vm_id, stamps in self.vm_file_stamps().items()}

    def vm_file_stamps(self, *names: str) -> dict[str, tuple[tuple[int, int, int] | None, ...]]:
        """Each VM folder's id → stamps of its config file and of ``names`` (paths in the VM folder, ``/``-separated).

        A stamp is (inode, size, mtime), None for a missing file. Built on plain strings: listing
        500 VMs calls this on every refresh, and pathlib's overhead was most of that listing's time.
        """
        stamps: dict[str, tuple[tuple[int, int, int] | None, ...]] = {}
        try:
            folders = list(os.scandir(self.vms_dir))
        except OSError:
            return stamps
        relative = [os.sep + name for name in (CONFIG_NAME, *(name.replace("/", os.sep) for name in names))]
        for folder in folders:
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            found: list[tuple[int, int, int] | None] = []
            for name in relative:
                try:
                    info = os.stat(folder.path + name)
                    found.append((info.st_ino, info.st_size, info.st_mtime_ns))
                except OSError:
                    found.append(None)
            stamps[folder.name] = tuple(found)
        return stamps

    def read_vm(self, vm_id: str) -> VMEntry:
        """One VM folder's entry: its config, or why it could not be read."""
        folder = self.vms_dir / vm_id
        try:
            return VMEntry(vm_id, folder, self._read_config(folder))
        except CorruptConfigError as error:
            return VMEntry(vm_id, folder, None, str(error))

    def _read_config(self, folder: Path) -> VMConfig:
        path = folder / CONFIG_NAME
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CorruptConfigError(f"VM folder {folder.name}: {path} is missing; restore it from "
                                     f"{path.name}.prev or delete the folder") from None
        except (OSError, UnicodeDecodeError) as error:
            raise CorruptConfigError(f"VM folder {folder.name}: cannot read {path}: {error}") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as error:
            raise CorruptConfigError(
                f"VM config {path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                f"fix it by hand or restore the previous version {path.name}.prev") from None
        try:
            config = VMConfig.from_dict(data)
            if config.id != folder.name:
                raise ValidationError(f"id {config.id!r} does not match its folder {folder.name!r}", "id")
        except ValidationError as error:
            raise CorruptConfigError(f"VM config {path} is not a valid VM config: {error}; "
                                     f"fix it by hand or restore {path.name}.prev") from None
        return config

    def find_vm(self, name_or_id: str) -> VMConfig:
        """The VM with this name (case-insensitive) or id."""
        broken = []
        for entry in self.list_vms():
            if entry.config is None:
                broken.append(entry)
                continue
            if entry.config.name.lower() == str(name_or_id).lower() or entry.id == name_or_id:
                return entry.config
        if any(entry.id == name_or_id for entry in broken):
            raise CorruptConfigError(next(e.error for e in broken if e.id == name_or_id) or "broken VM")
        raise NotFoundError(f"no VM named {name_or_id!r}; `thalunix vm list` shows the VMs in {self.root}")

    def create_vm(self, config: VMConfig) -> VMConfig:
        """Register a new VM; its folder appears whole or not at all."""
        validate_name(config.name)
        config.set_defaults()
        with self._folder_lock():
            self._check_name_free(config.name, exclude_id=None)
            target = self.vm_dir(config.id)
            if target.exists():
                raise ConflictError(f"a VM folder {target} already exists")
            staging = Path(tempfile.mkdtemp(prefix=f"new-{config.id}-", dir=self.tmp_dir))
            try:
                for name in VM_SUBFOLDERS:
                    (staging / name).mkdir()
                atomic_write_json(staging / CONFIG_NAME, config.to_dict())
                os.replace(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _fsync_dir(self.vms_dir)
        return config

    def adopt_vm(self, staging: Path, config: VMConfig, rename_on_clash: bool = False) -> VMConfig:
        """Register a VM folder prepared elsewhere (a clone, an import) by one rename into ``vms/``.

        ``staging`` must be on this data folder's filesystem (its ``tmp/``) and hold everything but
        ``vm.json``, which is written here. On a name clash: refuse, or take ``NAME-2``, ``NAME-3`` …
        """
        validate_name(config.name)
        config.set_defaults()
        with self._folder_lock():
            if rename_on_clash:
                taken = {entry.config.name.lower() for entry in self.list_vms() if entry.config}
                base, number = config.name, 2
                while config.name.lower() in taken:
                    suffix = f"-{number}"
                    config.name = base[:64 - len(suffix)].rstrip(" .") + suffix
                    number += 1
            self._check_name_free(config.name, exclude_id=None)
            target = self.vm_dir(config.id)
            if target.exists():
                raise ConflictError(f"a VM folder {target} already exists")
            for name in VM_SUBFOLDERS:
                (staging / name).mkdir(exist_ok=True)
            atomic_write_json(staging / CONFIG_NAME, config.to_dict())
            os.replace(staging, target)
            _fsync_dir(self.vms_dir)
        return config

    def save_vm(self, config: VMConfig) -> None:
        """Write an edited config atomically, keeping the previous one as ``vm.json.prev``."""
        validate_name(config.name)
        with self._folder_lock():
            self._check_name_free(config.name, exclude_id=config.id)
            folder = self.vm_dir(config.id)
            if not folder.is_dir():
                raise NotFoundError(f"VM {config.name!r} no longer exists in {self.root}")
            atomic_write_json(folder / CONFIG_NAME, config.to_dict(), keep_previous=True)

    def delete_vm(self, vm_id: str) -> None:
        """Remove a VM folder: first renamed out of ``vms/`` (atomic), then erased."""
        folder = self.vm_dir(vm_id)
        if not folder.exists():
            raise NotFoundError(f"VM folder {folder} does not exist")
        trash = self.tmp_dir / f"deleted-{vm_id}-{uuid.uuid4().hex[:6]}"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _check_name_free(self, name: str, exclude_id: str | None) -> None:
        for entry in self.list_vms():
            if entry.config and entry.id != exclude_id and entry.config.name.lower() == name.lower():
                raise ConflictError(f"a VM named {entry.config.name!r} already exists; choose another name")

    @contextlib.contextmanager
    def _folder_lock(self) -> Iterator[None]:
        """Serialises create/rename between processes so two VMs cannot take one name."""
        lock = FileLock(self.root / ".lock")
        for _ in range(200):
            if lock.acquire():
                break
            import time
            time.sleep(0.025)
        else:
            raise LockedError(f"the data folder {self.root} is locked by process {lock.holder()}; try again")
        try:
            yield
        finally:
            lock.release()

    # -- per-VM locks -----------------------------------------------------------------------------------
    def lock_vm(self, config: VMConfig) -> FileLock:
        """Take the VM's lock for this process (re-entrant); raise :class:`LockedError` if another holds it."""
        lock = self._vm_locks.get(config.id)
        if lock and lock.held:
            return lock
        lock = FileLock(self.vm_path(config.id, "run", "lock"))
        if not lock.acquire():
            raise LockedError(f"{config.label} is being driven by another Thalunix process (pid {lock.holder()}); "
                              "use that window, or close it first")
        self._vm_locks[config.id] = lock
        return lock

    def unlock_vm(self, config: VMConfig) -> None:
        lock = self._vm_locks.pop(config.id, None)
        if lock:
            lock.release()

    def read_json(self, path: Path, default: Any = None) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return default

    def free_space(self) -> int:
        return shutil.disk_usage(self.root).free
