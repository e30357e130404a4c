"""Debian packages as build inputs: apt's candidate .debs, verified downloads, and a cpio writer.

Shared by the image builds that make guests out of Debian packages without installing them on the
host: the TPM helper VM (``helper-vm/build.py``) and the test guests (``tests/guest/``). A package
is described by the dict :func:`candidate` makes from ``apt-cache show`` (name, version, .deb file
name, its sha256 in apt's index); :func:`download` fetches exactly those bytes or fails, so a cache
keyed by these dicts is keyed by what was built.

Example::

    import debpkgs
    packages = debpkgs.resolve_memoised(cache_root, ["busybox-static"],
                                        lambda: [debpkgs.candidate(r) for r in
                                                 debpkgs.apt_show(["busybox-static"]).values()])
    files = debpkgs.download(packages, folder)      # {"busybox-static": Path(".../busybox-static_…deb")}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Callable


class DebError(RuntimeError):
    """A package could not be resolved, fetched or verified, or a build command failed."""


class DownloadError(DebError):
    """apt-get download failed or delivered other bytes than apt's index promised (stale lists)."""


def run(cmd: list, *, hint: str = "", **kw) -> subprocess.CompletedProcess:
    """subprocess.run with output captured and failures as :class:`DebError` (with *hint* for a missing tool)."""
    kw.setdefault("check", True)
    if "stdout" not in kw and "stderr" not in kw:
        kw.setdefault("capture_output", True)
    try:
        return subprocess.run([str(part) for part in cmd], **kw)
    except FileNotFoundError as error:
        raise DebError(f"{cmd[0]} not found{'; ' + hint if hint else ''}") from error
    except subprocess.CalledProcessError as error:
        output = "\n".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                           for part in (error.stdout, error.stderr) if part)
        raise DebError(f"command failed ({error.returncode}): {' '.join(map(str, cmd))}\n{output}") from error


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- apt's index ------------------------------------------------------------------------------------------

def apt_show(names: list[str]) -> dict[str, dict[str, str]]:
    """The candidate record of each package apt knows (``apt-cache show``), by package name."""
    out = run(["apt-cache", "show", "--no-all-versions", *names], check=False, text=True)
    records: dict[str, dict[str, str]] = {}
    for block in out.stdout.split("\n\n"):
        record: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                record[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                record[key] = value.strip()
        if "Package" in record and record["Package"] not in records:
            records[record["Package"]] = record
    return records


def candidate(record: dict[str, str]) -> dict[str, str]:
    """What a build records of a package: enough to fetch exactly this .deb again and to credit it."""
    for field in ("Version", "Filename", "SHA256"):
        if not record.get(field):
            raise DebError(f"apt-cache show {record.get('Package')}: no {field}")
    return {"package": record["Package"], "version": record["Version"],
            "architecture": record.get("Architecture", ""), "deb": record["Filename"].rsplit("/", 1)[-1],
            "sha256": record["SHA256"], "source": record.get("Source", record["Package"]).split(" ")[0]}


def depends_on(metapackage: str, pattern: str) -> dict[str, str]:
    """The record of the package a metapackage depends on whose name matches *pattern* (e.g. the kernel)."""
    meta = apt_show([metapackage]).get(metapackage)
    if not meta:
        raise DebError(f"apt-cache knows no {metapackage}")
    match = re.search(f"({pattern})", meta.get("Depends", ""))
    if not match:
        raise DebError(f"{metapackage} depends on nothing like {pattern!r}: {meta.get('Depends')!r}")
    record = apt_show([match.group(1)]).get(match.group(1))
    if not record:
        raise DebError(f"apt-cache knows no {match.group(1)}")
    return record


def apt_fingerprint() -> str:
    """Changes whenever apt's view of the archive may have changed (lists, sources, pins)."""
    parts = []
    for folder in ("/var/lib/apt/lists", "/etc/apt/sources.list.d", "/etc/apt/preferences.d"):
        if Path(folder).is_dir():
            for item in sorted(Path(folder).iterdir()):
                if item.is_file() and item.name != "lock":
                    info = item.stat()
                    parts.append(f"{item}:{info.st_size}:{info.st_mtime_ns}")
    for name in ("/etc/apt/sources.list", "/etc/apt/preferences", "/var/lib/dpkg/arch"):
        if os.path.exists(name):
            info = os.stat(name)
            parts.append(f"{name}:{info.st_size}:{info.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def apt_update() -> None:
    run(["apt-get", "update"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def resolve_memoised(cache_root: Path, request: list[str], resolve: Callable[[], list[dict[str, str]]],
                     allow_update: bool = True) -> list[dict[str, str]]:
    """``resolve()``'s packages, memoised in *cache_root* against apt's lists and *request* (apt-cache is slow).

    When resolving fails (a package apt does not know yet), the lists are updated once and it is tried again.
    """
    memo = cache_root / "resolved.json"
    fingerprint = apt_fingerprint()
    try:
        data = json.loads(memo.read_text())
        if data.get("fingerprint") == fingerprint and data.get("request") == request:
            return list(data["packages"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        packages = resolve()
    except DebError:
        if not allow_update:
            raise
        apt_update()
        packages = resolve()
        fingerprint = apt_fingerprint()
    temp = memo.with_suffix(f".{os.getpid()}.tmp")
    temp.write_text(json.dumps({"fingerprint": fingerprint, "request": request, "packages": packages}, indent=1))
    os.replace(temp, memo)
    return packages


def packages_key(packages: list[dict[str, str]], sources: list[Path], salt: str = "") -> str:
    """A cache key over the exact .debs and the files that turn them into an image."""
    digest = hashlib.sha256(salt.encode())
    for pkg in sorted(packages, key=lambda p: p["deb"]):
        digest.update(f"deb {pkg['deb']} {pkg['sha256']}\n".encode())
    for source in sources:
        data = source.read_bytes()
        digest.update(f"file {source.name} {len(data)}\n".encode() + data)
    return digest.hexdigest()[:32]


def download(packages: list[dict[str, str]], dest: Path) -> dict[str, Path]:
    """Each package's .deb into *dest* (``apt-get download``), checked against apt's sha256."""
    try:
        run(["apt-get", "-o", "APT::Sandbox::User=root", "download",
             *[f"{p['package']}={p['version']}" for p in packages]], cwd=dest)
    except DebError as error:
        raise DownloadError(str(error)) from None
    files = {}
    for pkg in packages:
        found = list(dest.glob(f"{pkg['package']}_*.deb"))
        if len(found) != 1:
            raise DownloadError(f"apt-get download left {found} for {pkg['package']}")
        if sha256_file(found[0]) != pkg["sha256"]:
            raise DownloadError(f"{found[0].name}: sha256 differs from apt's index; run apt-get update")
        files[pkg["package"]] = found[0]
    return files


# -- initramfs --------------------------------------------------------------------------------------------

class Cpio:
    """A cpio "newc" archive written in memory, so building needs neither root nor mknod."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1000

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.parts.append(b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
                          + b"\0" * (-(110 + len(encoded)) % 4))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._add(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return b"".join(self.parts)
