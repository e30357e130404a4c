"""The portable exe's start-up: its QEMU runtime, carried compressed inside the exe, unpacked once into the data folder.

``build.py exe`` packs the assembled runtime (QEMU, qemu-img, swtpm, firmware, the TPM helper VM,
the web UI, ``manifest.json`` and ``licences/``) as one zstd tar and stores it in the exe's
PyInstaller archive under the name ``thalunix-runtime-<sha256>.tar.zst`` with the ``PKG`` type,
which PyInstaller's bootloader never unpacks. At start-up :func:`prepare` reads it straight out of
the exe into ``<data>/runtime/<sha256>/`` the first time (every file checked against the
manifest, the archive against its name), reuses that folder on later launches, removes older
ones, and tells :mod:`thalunix.runtime` to look there first. In a source checkout it does nothing
unless ``$THALUNIX_BUNDLE_ARCHIVE`` names a packed runtime (how the tests drive it without an exe).

It also makes the frozen app portable: temporary files go to ``<data>/tmp`` (for Python's
``tempfile`` and, through ``TMPDIR``/``TEMP``/``TMP``, for every child), and the environment
PyInstaller's bootloader set for itself (``LD_LIBRARY_PATH``, ``GI_*``…) is given back so QEMU and
the system's WebKit load their own libraries, not the ones unpacked for Python.

Example::

    data = DataFolder.open()
    root = prepare(data)            # None from source; else <data>/runtime/<sha256>
    Runtime.discover(...)           # now finds root/bin/qemu-system-x86_64 first
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from thalunix.errors import DataFolderError

ENV_ARCHIVE = "THALUNIX_BUNDLE_ARCHIVE"   # a packed runtime to use from source (tests, benchmarks)
ENV_WEB = "THALUNIX_WEB"                  # where the API serves the UI from (the runtime's copy)
ARCHIVE_PATTERN = re.compile(r"thalunix-runtime-([0-9a-f]{64})\.tar\.zst")
COMPLETE_MARK = ".thalunix-complete"
#: What PyInstaller's bootloader and its GTK hooks set for the bundled Python; children must not inherit them.
FROZEN_ONLY_ENV = ("GI_TYPELIB_PATH", "GIO_MODULE_DIR", "GDK_PIXBUF_MODULE_FILE", "GTK_DATA_PREFIX", "GTK_EXE_PREFIX",
                   "GTK_PATH", "GTK_IM_MODULE_FILE", "PANGO_LIBDIR", "PANGO_SYSCONFDIR", "FONTCONFIG_FILE",
                   "FONTCONFIG_PATH", "SSL_CERT_FILE", "XDG_DATA_DIRS_ORIG")

_prepared: Path | None = None


class RuntimeUnpackError(DataFolderError):
    code = "runtime-unpack-failed"


@dataclass(frozen=True)
class EmbeddedArchive:
    """Where the packed runtime's bytes are: a file, and a byte range in it."""

    path: Path
    offset: int
    length: int
    sha256: str

    def open(self) -> "_Range":
        return _Range(open(self.path, "rb"), self.offset, self.length)


class _Range:
    """A read-only window on part of a file, hashing what passes through (the archive's own check)."""

    def __init__(self, handle: IO[bytes], offset: int, length: int) -> None:
        self._handle = handle
        self._left = length
        self.digest = hashlib.sha256()
        handle.seek(offset)

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._left:
            size = self._left
        data = self._handle.read(size)
        self._left -= len(data)
        self.digest.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "_Range":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# -- finding the archive ---------------------------------------------------------------------------------------------
_COOKIE = struct.Struct("!8sIIII64s")
_COOKIE_MAGIC = b"MEI\014\013\012\013\016"
_TOC_ENTRY = struct.Struct("!IIIIBc")


def read_pyinstaller_toc(exe: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """name → (absolute offset, stored length, compressed flag, typecode) of each entry in the exe's CArchive."""
    with open(exe, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        # The cookie ends the archive, which ends the file (a code signature may follow on some systems).
        window = min(size, 1 << 16)
        handle.seek(size - window)
        tail = handle.read(window)
        at = tail.rfind(_COOKIE_MAGIC)
        if at < 0:
            return {}
        cookie_start = size - window + at
        _, archive_length, toc_offset, toc_length, _, _ = _COOKIE.unpack(tail[at:at + _COOKIE.size])
        start = cookie_start + _COOKIE.size - archive_length
        handle.seek(start + toc_offset)
        toc = handle.read(toc_length)
    entries: dict[str, tuple[int, int, int, bytes]] = {}
    position = 0
    while position + _TOC_ENTRY.size <= len(toc):
        entry_length, offset, length, _, compressed, typecode = _TOC_ENTRY.unpack_from(toc, position)
        name = toc[position + _TOC_ENTRY.size:position + entry_length].rstrip(b"\0").decode("utf-8", "replace")
        entries[name] = (start + offset, length, compressed, typecode)
        position += entry_length
    return entries


def embedded_archive() -> EmbeddedArchive | None:
    """The packed runtime this process carries: ``$THALUNIX_BUNDLE_ARCHIVE``, else the frozen exe's own."""
    explicit = os.environ.get(ENV_ARCHIVE)
    if explicit:
        path = Path(explicit)
        digest_file = path.with_name(path.name + ".sha256")
        digest = digest_file.read_text().split()[0] if digest_file.is_file() else _file_sha256(path)
        return EmbeddedArchive(path, 0, path.stat().st_size, digest)
    if not getattr(sys, "frozen", False):
        return None
    exe = Path(os.path.realpath(sys.executable))
    for name, (offset, length, compressed, _) in read_pyinstaller_toc(exe).items():
        match = ARCHIVE_PATTERN.fullmatch(os.path.basename(name))
        if match and not compressed:
            return EmbeddedArchive(exe, offset, length, match.group(1))
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the runtime cache -----------------------------------------------------------------------------------------------
def _zstd_reader(source: Any) -> Any:
    try:
        from compression import zstd  # type: ignore[import-not-found]   # Python 3.14+
    except ImportError:
        from backports import zstd  # type: ignore[no-redef]
    return zstd.ZstdFile(source, "rb")


def is_complete(folder: Path, sha256: str) -> bool:
    """A runtime folder is reused when its mark names this archive and every file the manifest lists is there
    with its size (a stat each: cheap, and it catches a half-deleted or truncated folder)."""
    try:
        mark = json.loads((folder / COMPLETE_MARK).read_text())
        if mark.get("sha256") != sha256:
            return False
        manifest = json.loads((folder / "manifest.json").read_text())
        return all((folder / name).stat().st_size == entry["size"] for name, entry in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def unpack(archive: EmbeddedArchive, target: Path) -> None:
    """Unpack ``archive`` into ``target`` (which must not exist) through a temporary sibling folder, checking every
    file's sha256 against the manifest inside and the archive's own sha256 against its name."""
    staging = Path(tempfile.mkdtemp(prefix=f".unpack-{archive.sha256[:12]}-", dir=target.parent))
    try:
        source = archive.open()
        hashes: dict[str, str] = {}
        with source, _zstd_reader(source) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = member.name
                if not member.isfile() or name.startswith(("/", "..")) or "/../" in name:
                    continue   # the packer writes plain files only; anything else is not ours
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                source_file = tar.extractfile(member)
                assert source_file is not None
                with open(dest, "wb") as sink:
                    while block := source_file.read(1 << 20):
                        digest.update(block)
                        sink.write(block)
                os.chmod(dest, 0o755 if member.mode & 0o111 else 0o644)
                hashes[name] = digest.hexdigest()
            while stream.read(1 << 16):
                pass   # the rest of the frame, so the archive's digest covers every byte
        if source.digest.hexdigest() != archive.sha256:
            raise RuntimeUnpackError(f"the runtime inside {archive.path} is damaged (sha256 "
                                     f"{source.digest.hexdigest()[:16]}…, expected {archive.sha256[:16]}…); "
                                     "download Thalunix again")
        manifest = json.loads((staging / "manifest.json").read_text())
        for name, entry in manifest["files"].items():
            if hashes.get(name) != entry["sha256"]:
                raise RuntimeUnpackError(f"the runtime inside {archive.path} is damaged ({name} "
                                         f"{'is missing' if name not in hashes else 'differs from its manifest'}); "
                                         "download Thalunix again")
        (staging / COMPLETE_MARK).write_text(json.dumps({"sha256": archive.sha256, "files": len(hashes),
                                                          "unpacked_at": time.time()}))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_runtime(runtime_dir: Path, archive: EmbeddedArchive) -> Path:
    """``runtime_dir/<sha256>``, unpacked if it is not complete yet; other versions are removed."""
    from thalunix.store import FileLock
    target = runtime_dir / archive.sha256
    if is_complete(target, archive.sha256):
        return target
    lock = FileLock(runtime_dir / ".unpack.lock")
    deadline = time.monotonic() + 600
    while not lock.acquire():   # another Thalunix is unpacking the same exe: wait for it
        if time.monotonic() > deadline:
            raise RuntimeUnpackError(f"another Thalunix has been unpacking into {runtime_dir} for 10 minutes; "
                                     "close it and try again")
        time.sleep(0.1)
    try:
        if not is_complete(target, archive.sha256):
            if target.exists():
                shutil.rmtree(target)   # half-removed or damaged: start over
            try:
                unpack(archive, target)
            except OSError as error:
                raise RuntimeUnpackError(f"could not unpack Thalunix's runtime into {runtime_dir} "
                                         f"({error.strerror or error}); free some space there or start Thalunix "
                                         "with --data-dir on a writable disk with ~200 MB free") from None
        remove_old_runtimes(runtime_dir, keep=archive.sha256)
    finally:
        lock.release()
    return target


def remove_old_runtimes(runtime_dir: Path, keep: str) -> list[Path]:
    """Other exes' runtimes (and leftovers of interrupted unpacks). A folder a running VM still uses may not go
    on Windows; it is tried again at the next launch."""
    removed = []
    for folder in runtime_dir.iterdir():
        if folder.name == keep or not folder.is_dir():
            continue
        if re.fullmatch(r"[0-9a-f]{64}", folder.name) or folder.name.startswith(".unpack-"):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


# -- start-up ---------------------------------------------------------------------------------------------------------
def portable_environment(tmp_dir: Path, environ: dict[str, str] | Any = os.environ) -> None:
    """Temporary files inside the data folder, and the bootloader's own variables taken back from children."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for name in ("TMPDIR", "TEMP", "TMP"):
        environ[name] = str(tmp_dir)
    tempfile.tempdir = str(tmp_dir)
    # PyInstaller put its unpack folder first on the library path and saved the user's value.
    for name in ("LD_LIBRARY_PATH", "LIBPATH"):
        original = environ.pop(name + "_ORIG", None)
        if original is not None:
            environ[name] = original
        else:
            environ.pop(name, None)
    for name in FROZEN_ONLY_ENV:
        environ.pop(name, None)
    # The exe started again by this one (the TPM helper host, the network switch, the shared folder server)
    # outlives it: it must be a program of its own, with its own unpack folder, not share this process's, which
    # the one-file launcher removes when this process ends. The bootloader reads and clears this variable.
    environ["PYINSTALLER_RESET_ENVIRONMENT"] = "1"


def prepare(data: Any) -> Path | None:
    """Make a frozen Thalunix portable and its runtime findable; from source nothing happens (unless
    ``$THALUNIX_BUNDLE_ARCHIVE`` names a packed runtime).

    ``data`` is the :class:`thalunix.store.DataFolder`. Returns the unpacked runtime's folder.
    """
    global _prepared
    frozen = getattr(sys, "frozen", False)
    if frozen:
        portable_environment(data.tmp_dir)
    archive = embedded_archive()
    if archive is None:
        return None
    root = ensure_runtime(data.runtime_dir, archive)
    from thalunix.runtime import add_bundled_root
    add_bundled_root(root)
    web = root / "share" / "thalunix" / "web"
    if web.is_dir():
        os.environ[ENV_WEB] = str(web)
    _prepared = root
    return root


def prepared_root() -> Path | None:
    """The runtime :func:`prepare` unpacked in this process, if any."""
    return _prepared


def manifest(root: Path | None = None) -> dict[str, Any] | None:
    """The bundle's manifest (package versions, sha256 of each file, licences) or None from source."""
    root = root or _prepared
    if root is None:
        return None
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def licence_report(root: Path | None = None) -> str:
    """Where the licences and sources of every bundled binary are, for ``thalunix doctor --licences``."""
    root = root or _prepared
    info = manifest(root)
    if root is None or info is None:
        return ("This Thalunix runs from source and bundles no binaries: QEMU, OVMF and swtpm are the system's, "
                "under their own licences (on Debian: /usr/share/doc/<package>/copyright).")
    lines = [f"Bundled runtime: {root}",
             f"Licences: {root / 'licences'}  (one file per Debian package in debian/; QEMU for Windows in windows/)",
             f"Sources: {root / 'licences' / 'SOURCES.md'}", ""]
    for entry in info.get("packages", []):
        lines.append(f"  {entry['package']} {entry['version']}  source {entry['source']} {entry['source_version']}"
                     f"  {entry['source_url']}")
    for wheel in info.get("wheels", []):
        lines.append(f"  {wheel['name']} {wheel['version']} ({wheel['file']})  sha256 {wheel['sha256']}")
    for entry in info.get("python_packages", []):
        lines.append(f"  inside the exe: {entry['name']} {entry['version']} ({entry['license'] or 'see its files'})"
                     f"  {entry['licence_files']}  {entry['source_url']}")
    helper = info.get("helper_vm") or {}
    for entry in helper.get("packages", []):
        lines.append(f"  helper VM: {entry['package']} {entry['version']}  source {entry['source']} "
                     f"{entry['source_version']}  {entry['source_url']}")
    return "\n".join(lines)


__all__ = ["EmbeddedArchive", "RuntimeUnpackError", "embedded_archive", "ensure_runtime", "is_complete",
           "licence_report", "manifest", "portable_environment", "prepare", "prepared_root",
           "read_pyinstaller_toc", "remove_old_runtimes", "unpack"]
