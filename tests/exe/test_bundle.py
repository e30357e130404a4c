"""thalunix.bundle without an exe: a small packed runtime made here, unpacked once, reused, checked, replaced; the
packed runtime found inside a real PyInstaller archive (written by PyInstaller's own writer)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

from thalunix import bundle, runtime
from thalunix.store import DataFolder


def pack(tmp_path: Path, files: dict[str, bytes], name: str = "rt", tamper: bool = False) -> Path:
    """A packed runtime as build.py makes it: zstd tar of the files plus manifest.json, sha256 beside it."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[no-redef]
    manifest = {"format": 1, "target": "test", "packages": [], "files": {
        path: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for path, data in files.items()}}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, data in {**files, "manifest.json": json.dumps(manifest).encode()}.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o755 if path.startswith("bin/") else 0o644
            if tamper and path == "bin/qemu":
                data = data[:-1] + b"X"   # differs from its manifest entry
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / f"{name}.tar.zst"
    archive.write_bytes(zstd.compress(raw.getvalue()))
    (tmp_path / f"{name}.tar.zst.sha256").write_text(hashlib.sha256(archive.read_bytes()).hexdigest() + "\n")
    return archive


FILES = {"bin/qemu": b"#!/bin/sh\necho qemu\n", "share/qemu/bios.bin": b"\x55\xaa" * 1000,
         "share/thalunix/web/index.html": b"<!doctype html>"}


@pytest.fixture
def data(tmp_path: Path) -> DataFolder:
    return DataFolder.open(tmp_path / "data")


def test_unpacked_once_then_reused(tmp_path: Path, data: DataFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bundle.ENV_ARCHIVE, str(pack(tmp_path, FILES)))
    archive = bundle.embedded_archive()
    assert archive is not None
    root = bundle.ensure_runtime(data.runtime_dir, archive)
    assert root == data.runtime_dir / archive.sha256
    assert (root / "bin" / "qemu").read_bytes() == FILES["bin/qemu"]
    if os.name != "nt":   # Windows has no exec bits to keep
        assert (root / "bin/qemu").stat().st_mode & 0o111 and not (root / "share/qemu/bios.bin").stat().st_mode & 0o111
    mark = (root / bundle.COMPLETE_MARK).read_text()
    assert bundle.ensure_runtime(data.runtime_dir, archive) == root
    assert (root / bundle.COMPLETE_MARK).read_text() == mark   # not unpacked again
    assert [p.name for p in data.runtime_dir.iterdir() if not p.name.startswith(".unpack.lock")] == [root.name]


def test_damaged_cache_is_unpacked_again(tmp_path: Path, data: DataFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bundle.ENV_ARCHIVE, str(pack(tmp_path, FILES)))
    archive = bundle.embedded_archive()
    root = bundle.ensure_runtime(data.runtime_dir, archive)
    (root / "share/qemu/bios.bin").write_bytes(b"truncated")
    assert not bundle.is_complete(root, archive.sha256)
    assert bundle.ensure_runtime(data.runtime_dir, archive) == root
    assert (root / "share/qemu/bios.bin").read_bytes() == FILES["share/qemu/bios.bin"]


def test_damaged_archive_is_refused_and_leaves_nothing(tmp_path: Path, data: DataFolder,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    archive_path = pack(tmp_path, FILES)
    blob = bytearray(archive_path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    archive_path.write_bytes(bytes(blob))   # the .sha256 beside it still names the good archive
    monkeypatch.setenv(bundle.ENV_ARCHIVE, str(archive_path))
    with pytest.raises(bundle.RuntimeUnpackError, match="damaged"):
        bundle.ensure_runtime(data.runtime_dir, bundle.embedded_archive())
    assert [p for p in data.runtime_dir.iterdir() if p.is_dir()] == []


def test_file_not_matching_its_manifest_is_refused(tmp_path: Path, data: DataFolder,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bundle.ENV_ARCHIVE, str(pack(tmp_path, FILES, tamper=True)))
    with pytest.raises(bundle.RuntimeUnpackError, match="bin/qemu differs from its manifest"):
        bundle.ensure_runtime(data.runtime_dir, bundle.embedded_archive())


def test_a_new_exe_replaces_the_old_runtime(tmp_path: Path, data: DataFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bundle.ENV_ARCHIVE, str(pack(tmp_path, FILES, name="old")))
    old = bundle.ensure_runtime(data.runtime_dir, bundle.embedded_archive())
    (data.runtime_dir / ".unpack-leftover-123").mkdir()   # an unpack killed half-way
    monkeypatch.setenv(bundle.ENV_ARCHIVE, str(pack(tmp_path, {**FILES, "bin/qemu": b"new"}, name="new")))
    new = bundle.ensure_runtime(data.runtime_dir, bundle.embedded_archive())
    assert new != old and not old.exists() and not (data.runtime_dir / ".unpack-leftover-123").exists()
    assert (new / "bin/qemu").read_bytes() == b"new"


def test_prepare_registers_the_runtime_and_web_root(tmp_path: Path, data: DataFolder,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bundle.ENV_ARCHIVE, str(pack(tmp_path, FILES)))
    monkeypatch.setattr(runtime, "_unpacked_roots", [])
    monkeypatch.delenv(runtime.ENV_RUNTIME, raising=False)
    # setenv first: a plain delenv of an absent variable records nothing, and what prepare() sets would then
    # outlive this test (every later window and server of the session would serve a deleted web folder).
    monkeypatch.setenv(bundle.ENV_WEB, "")
    monkeypatch.delenv(bundle.ENV_WEB)
    monkeypatch.setattr(bundle, "_prepared", None)
    root = bundle.prepare(data)
    assert root is not None and runtime.bundled_roots()[0] == root
    assert bundle.manifest(root)["target"] == "test"
    assert os.environ[bundle.ENV_WEB] == str(root / "share" / "thalunix" / "web")
    assert "licences" in bundle.licence_report(root)


def test_from_source_nothing_happens(data: DataFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bundle.ENV_ARCHIVE, raising=False)
    monkeypatch.setattr(bundle, "_prepared", None)
    monkeypatch.setattr(sys, "frozen", False, raising=False)
    assert bundle.prepare(data) is None and bundle.prepared_root() is None
    assert "runs from source" in bundle.licence_report()


def test_found_inside_a_pyinstaller_archive(tmp_path: Path, data: DataFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime rides in the exe's CArchive as a PKG entry (never unpacked by the bootloader); the reader finds
    its byte range behind an executable stub and unpacks from the exe itself."""
    writers = pytest.importorskip("PyInstaller.archive.writers")
    archive = pack(tmp_path, FILES)
    digest = (tmp_path / "rt.tar.zst.sha256").read_text().split()[0]
    carchive = tmp_path / "pkg"
    other = tmp_path / "other.txt"
    other.write_text("data file")
    writers.CArchiveWriter(str(carchive), [("other.txt", str(other), True, "x"),
                                           (f"thalunix-runtime-{digest}.tar.zst", str(archive), False, "a")],
                           pylib_name="libpython3.so")
    exe = tmp_path / "thalunix"
    exe.write_bytes(b"\x7fELF-bootloader-stub" * 100 + carchive.read_bytes())
    monkeypatch.delenv(bundle.ENV_ARCHIVE, raising=False)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(exe))
    found = bundle.embedded_archive()
    assert found is not None and found.sha256 == digest and found.length == archive.stat().st_size
    assert exe.read_bytes()[found.offset:found.offset + found.length] == archive.read_bytes()
    root = bundle.ensure_runtime(data.runtime_dir, found)
    assert (root / "share/qemu/bios.bin").read_bytes() == FILES["share/qemu/bios.bin"]
