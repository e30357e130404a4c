#!/usr/bin/env python3
"""Build (and cache) the swtpm helper micro-VM image from Debian packages.

The helper is a tiny Linux VM whose only job is to run swtpm on TCP, for hosts where swtpm cannot
run natively. Its image is three files: Debian's cloud kernel as an uncompressed PVH ``vmlinux``
(QEMU boots it directly, skipping the decompressor); a small zstd initramfs with busybox, the
virtio modules and ``/init`` (``init.sh`` beside this file); and a read-only ext4 root disk
holding swtpm, mke2fs/e2fsck and their libraries (read on demand, so they cost no RAM up front).
``manifest.json`` lists the files with their size and sha256 (Thalunix refuses a damaged image),
the kernel command line, the guest's RAM and TCP ports and the packages used.

Usage::

    python3 helper-vm/build.py                 # build into the cache, print the entry
    python3 helper-vm/build.py --out DIR       # also copy the image to DIR (for bundling)

    from build import ensure_helper_image      # with helper-vm/ on sys.path
    entry = ensure_helper_image()              # Path of a complete cache entry

Cache: ``<repo>/.cache/helper-vm/<key>/`` where *key* is a sha256 over the exact .deb names and
sha256s (from apt's index, checked against the downloaded files), this file and ``init.sh``.
An entry is built in a temporary folder and renamed into place when complete; ``current``
(written atomically) names the newest entry, which is how a checkout's Thalunix finds it.
Host needs: apt-get, dpkg-deb, zstd, lz4, mke2fs (e2fsprogs). Nothing is installed on the host.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DEFAULT_CACHE_ROOT = REPO_ROOT / ".cache" / "helper-vm"
FORMAT = 2  # bump when the image layout changes in a way Thalunix must know about

#: Debian packages the *host* needs to build the image.
HOST_PACKAGES = ["zstd", "lz4", "dpkg", "e2fsprogs"]

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
#: Packages the image is made of (downloaded, never installed). Shared libraries the binaries need
#: are found by reading their ELF headers; a library in none of these packages fails the build.
PACKAGES = ["busybox-static", "swtpm", "swtpm-libs", "libtpms0", "libssl3", "libseccomp2", "libc6",
            "e2fsprogs", "libext2fs2", "libcom-err2", "libblkid1", "libuuid1"]
#: (package, path inside it, path on the read-only root disk); busybox alone goes into the initramfs
BINARIES = [("swtpm", "usr/bin/swtpm", "bin/swtpm"),
            ("e2fsprogs", "sbin/mke2fs", "sbin/mke2fs"),
            ("e2fsprogs", "sbin/e2fsck", "sbin/e2fsck")]
#: The busybox applets init.sh runs, linked at build time (``busybox --install`` at boot costs time under TCG).
APPLETS = ["sh", "mount", "umount", "insmod", "ip", "findfs", "mkdir", "dd", "tr", "wc", "sync", "poweroff", "cat",
           "sleep", "ls"]
#: Where init.sh mounts the root disk; the program interpreter link in the initramfs points there.
RO_MOUNT = "ro"
ROOT_LABEL = "thalunix-root"
LIB_DIR = "lib/x86_64-linux-gnu"
#: Drivers needed beyond what the cloud kernel builds in (ext4, crc32c, serial are built in).
WANTED_MODULES = ["virtio_mmio", "virtio_pci", "virtio_net", "virtio_blk"]

GUEST_DATA_PORT = 2321
GUEST_CTRL_PORT = 2322
#: Debian's stock kernel runs out of memory below 72-76 MiB (its image alone reserves ~44 MiB). 96 costs
#: no more host memory than 80 (pages the guest never touches are never allocated) and keeps a margin.
RAM_MIB = 96
#: cryptomgr.notests: the crypto self-tests cost ~0.25 s of CPU under TCG at every boot.
CMDLINE = "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests"

MANIFEST = "manifest.json"
KEEP_ENTRIES = 3


class HelperBuildError(RuntimeError):
    pass


class _DownloadError(HelperBuildError):
    """apt-get download failed or delivered other bytes than apt's index promised (stale lists)."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    try:
        return subprocess.run(cmd, **kw)
    except FileNotFoundError as error:
        raise HelperBuildError(f"{cmd[0]} not found; install the Debian packages {' '.join(HOST_PACKAGES)}") \
            from error
    except subprocess.CalledProcessError as error:
        out = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr
        raise HelperBuildError(f"command failed ({error.returncode}): {' '.join(map(str, cmd))}\n{out}") from error


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- packages ---------------------------------------------------------------------------------------------

def _apt_show(names: list[str]) -> dict[str, dict[str, str]]:
    out = _run(["apt-cache", "show", "--no-all-versions", *names], check=False, text=True)
    records: dict[str, dict[str, str]] = {}
    for block in out.stdout.split("\n\n"):
        rec: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                rec[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                rec[key] = value.strip()
        if "Package" in rec and rec["Package"] not in records:
            records[rec["Package"]] = rec
    return records


def _resolve_once() -> list[dict[str, str]]:
    records = _apt_show([KERNEL_METAPACKAGE, *PACKAGES])
    meta = records.get(KERNEL_METAPACKAGE)
    missing = [name for name in [KERNEL_METAPACKAGE, *PACKAGES] if name not in records]
    if missing or not meta:
        raise HelperBuildError(f"apt-cache knows no {', '.join(missing)}")
    match = re.search(r"(linux-image-[0-9][^\s,(]*-cloud-amd64)", meta.get("Depends", ""))
    if not match:
        raise HelperBuildError(f"cannot find the kernel package in {meta.get('Depends')!r}")
    kernel = _apt_show([match.group(1)]).get(match.group(1))
    if not kernel:
        raise HelperBuildError(f"apt-cache knows no {match.group(1)}")
    result = []
    for rec in [kernel] + [records[name] for name in PACKAGES]:
        for field in ("Version", "Filename", "SHA256"):
            if not rec.get(field):
                raise HelperBuildError(f"apt-cache show {rec['Package']}: no {field}")
        result.append({"package": rec["Package"], "version": rec["Version"],
                       "deb": rec["Filename"].rsplit("/", 1)[-1], "sha256": rec["SHA256"]})
    return result


def _apt_fingerprint() -> str:
    parts = []
    for folder in ("/var/lib/apt/lists", "/etc/apt/sources.list.d", "/etc/apt/preferences.d"):
        if Path(folder).is_dir():
            for item in sorted(Path(folder).iterdir()):
                if item.is_file() and item.name != "lock":
                    info = item.stat()
                    parts.append(f"{item}:{info.st_size}:{info.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _resolve_packages(cache_root: Path, allow_update: bool = True) -> list[dict[str, str]]:
    """The current candidate .debs, memoised against apt's lists (apt-cache takes seconds)."""
    memo = cache_root / "resolved.json"
    fingerprint = _apt_fingerprint()
    try:
        data = json.loads(memo.read_text())
        if data.get("fingerprint") == fingerprint:
            return list(data["packages"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        packages = _resolve_once()
    except HelperBuildError:
        if not allow_update:
            raise
        _run(["apt-get", "update"])
        packages = _resolve_once()
        fingerprint = _apt_fingerprint()
    temp = memo.with_suffix(f".{os.getpid()}.tmp")
    temp.write_text(json.dumps({"fingerprint": fingerprint, "packages": packages}, indent=1))
    os.replace(temp, memo)
    return packages


def _cache_key(packages: list[dict[str, str]]) -> str:
    digest = hashlib.sha256(f"format {FORMAT}\n".encode())
    for pkg in sorted(packages, key=lambda p: p["deb"]):
        digest.update(f"deb {pkg['deb']} {pkg['sha256']}\n".encode())
    for source in (Path(__file__).resolve(), HERE / "init.sh"):
        data = source.read_bytes()
        digest.update(f"file {source.name} {len(data)}\n".encode() + data)
    return digest.hexdigest()[:32]


def _download(packages: list[dict[str, str]], dest: Path) -> dict[str, Path]:
    try:
        _run(["apt-get", "-o", "APT::Sandbox::User=root", "download",
              *[f"{p['package']}={p['version']}" for p in packages]], cwd=dest)
    except HelperBuildError as error:
        raise _DownloadError(str(error)) from None
    files = {}
    for pkg in packages:
        found = list(dest.glob(f"{pkg['package']}_*.deb"))
        if len(found) != 1:
            raise _DownloadError(f"apt-get download left {found} for {pkg['package']}")
        if _sha256_file(found[0]) != pkg["sha256"]:
            raise _DownloadError(f"{found[0].name}: sha256 differs from apt's index; run apt-get update")
        files[pkg["package"]] = found[0]
    return files


# -- ELF: shared library needs and kernel module info -----------------------------------------------------

def _elf_sections(data: bytes) -> dict[str, tuple[int, int, int]]:
    """name → (offset, size, link) of an ELF64 little-endian file's sections."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise HelperBuildError("not an ELF64 file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for index in range(shnum):
        base = shoff + index * shentsize
        name, _type = struct.unpack_from("<II", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        link = struct.unpack_from("<I", data, base + 0x28)[0]
        raw.append((name, offset, size, link))
    strtab = raw[shstrndx][1]
    sections = {}
    for name, offset, size, link in raw:
        end = data.index(b"\0", strtab + name)
        sections[data[strtab + name:end].decode()] = (offset, size, link)
    return sections


def _needed(path: Path) -> list[str]:
    """DT_NEEDED entries of an ELF binary or library (empty for static binaries)."""
    data = path.read_bytes()
    sections = _elf_sections(data)
    if ".dynamic" not in sections or ".dynstr" not in sections:
        return []
    offset, size, _ = sections[".dynamic"]
    strtab = sections[".dynstr"][0]
    names = []
    for pos in range(offset, offset + size, 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            end = data.index(b"\0", strtab + value)
            names.append(data[strtab + value:end].decode())
    return names


def _modinfo(ko: Path) -> dict[str, str]:
    data = ko.read_bytes()
    offset, size, _ = _elf_sections(data)[".modinfo"]
    info: dict[str, str] = {}
    for item in data[offset:offset + size].split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key.decode() not in info:
            info[key.decode()] = value.decode(errors="replace")
    return info


def _select_modules(moddir: Path) -> list[tuple[str, Path]]:
    """The wanted modules and their dependencies in load order; built-in ones are skipped."""
    norm = lambda name: name.replace("-", "_")  # noqa: E731
    kos = {norm(p.name[:-3]): p for p in moddir.rglob("*.ko")}
    builtin = {norm(Path(line).name.split(".ko")[0])
               for line in (moddir / "modules.builtin").read_text().split()} if (moddir / "modules.builtin").exists() \
        else set()
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        ko = kos.get(name)
        if ko is None:
            if name not in builtin:
                raise HelperBuildError(f"kernel module {name} is neither built in nor shipped")
            return
        for dependency in filter(None, _modinfo(ko).get("depends", "").split(",")):
            visit(norm(dependency))
        order.append((name, ko))

    for wanted in WANTED_MODULES:
        visit(norm(wanted))
    return order


def _extract_vmlinux(bzimage: Path, out: Path) -> str:
    """The kernel's uncompressed ELF (bootable by QEMU as PVH) out of a bzImage; returns the compression."""
    data = bzimage.read_bytes()
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start:start + payload_length]
    if payload[:2] == b"\x1f\x8b":
        kind, raw = "gzip", zlib.decompressobj(31).decompress(payload)
    elif payload[:6] == b"\xfd7zXZ\x00":
        kind, raw = "xz", lzma.decompress(payload[:-4], format=lzma.FORMAT_XZ)
    elif payload[:4] == b"\x28\xb5\x2f\xfd":
        kind = "zstd"
        raw = _run(["zstd", "-d", "-c", "-q"], input=payload[:-4]).stdout  # the last 4 bytes are the size
    elif payload[:4] == b"\x02\x21\x4c\x18":   # lz4 legacy frame (Debian's cloud kernel)
        kind = "lz4"
        raw = _run(["lz4", "-d", "-c", "-q"], input=payload[:-4]).stdout
    elif payload[:3] == b"\x5d\x00\x00":
        kind, raw = "lzma", lzma.decompress(payload[:-4], format=lzma.FORMAT_ALONE)
    else:
        raise HelperBuildError(f"{bzimage.name}: unknown kernel compression {payload[:6].hex()}")
    if raw[:4] != b"\x7fELF":
        raise HelperBuildError(f"{bzimage.name}: the decompressed payload is not an ELF kernel")
    out.write_bytes(raw)
    return kind


# -- initramfs --------------------------------------------------------------------------------------------

class _Cpio:
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

    def dir(self, name: str) -> None:
        self._add(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._add(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return b"".join(self.parts)


def _find_library(name: str, roots: dict[str, Path]) -> Path:
    for root in roots.values():
        for folder in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/swtpm",
                       "lib64"):
            candidate = root / folder / name
            if candidate.exists():
                return candidate.resolve()
    raise HelperBuildError(f"shared library {name} is in none of the packages {', '.join(roots)}; "
                           "add its package to PACKAGES in helper-vm/build.py")


def _make_rootfs(roots: dict[str, Path], staging: Path, out: Path) -> dict[str, int]:
    """The read-only root disk: swtpm, mke2fs/e2fsck and their libraries (ext4 without journal).

    On a disk, not in the initramfs: the guest reads only the pages it runs, instead of holding
    ~10 MB unpacked in RAM (with the compressed copy beside it while unpacking) — less RAM, less
    to decompress at boot.
    """
    libraries: dict[str, Path] = {}
    pending: list[Path] = []
    for package, source, target in BINARIES:
        path = roots[package] / source
        (staging / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, staging / target)
        (staging / target).chmod(0o755)
        pending.append(path)
    while pending:
        for name in _needed(pending.pop()):
            if name not in libraries:
                libraries[name] = _find_library(name, roots)
                pending.append(libraries[name])
    (staging / LIB_DIR).mkdir(parents=True, exist_ok=True)
    for name, path in sorted(libraries.items()):
        shutil.copyfile(path, staging / LIB_DIR / name)
        (staging / LIB_DIR / name).chmod(0o755)
    content = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
    size_kib = (int(content * 1.25) // 1024 // 1024 + 2) * 1024
    # Fixed UUID, hash seed and creation time (inode times still vary: the image is not bit-reproducible).
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-b", "4096", "-m", "0", "-N", "128",
          "-L", ROOT_LABEL, "-U", "7468616c-756e-4978-8000-000000000001", "-E", "root_owner=0:0,hash_seed="
          "7468616c-756e-4978-8000-000000000002", "-d", str(staging), str(out), f"{size_kib}k"], env=env)
    return {"content_bytes": content, "libraries": len(libraries)}


def _strip_signature(module: bytes) -> bytes:
    """A kernel module without its appended signature.

    The kernel checks each signature with RSA when the module loads, which is slow under TCG; the
    modules come from the same verified .deb as the kernel, and an unsigned module loads (tainting
    the kernel) as long as signatures are not enforced, which they are not without Secure Boot.
    """
    magic = b"~Module signature appended~\n"
    if not module.endswith(magic):
        return module
    sig_len = struct.unpack(">I", module[-len(magic) - 4:-len(magic)])[0]
    return module[:-(len(magic) + 12 + sig_len)]


def _make_initramfs(busybox: Path, modules: list[tuple[str, Path]], out: Path) -> dict[str, int]:
    cpio = _Cpio()
    for folder in ("bin", "sbin", "dev", "proc", "sys", "tmp", "state", RO_MOUNT, "etc", "lib", "lib64",
                   "lib/modules"):
        cpio.dir(folder)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("init", (HERE / "init.sh").read_bytes(), 0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    # The program interpreter is looked up by its absolute path, not through the library path.
    cpio.symlink("lib64/ld-linux-x86-64.so.2", f"/{RO_MOUNT}/{LIB_DIR}/ld-linux-x86-64.so.2")
    for name, ko in modules:
        cpio.file(f"lib/modules/{name}.ko", _strip_signature(ko.read_bytes()))
    cpio.file("lib/modules/load-order", ("\n".join(name for name, _ in modules) + "\n").encode())
    raw = cpio.finish()
    # A 1 MiB window keeps the kernel's decompression buffer small in a small guest.
    out.write_bytes(_run(["zstd", "-q", "-19", "--zstd=wlog=20", "-c"], input=raw).stdout)
    return {"uncompressed_bytes": len(raw)}


# -- the build --------------------------------------------------------------------------------------------

def _build(packages: list[dict[str, str]], work: Path, out: Path) -> dict:
    started = time.monotonic()
    debs = work / "debs"
    debs.mkdir()
    files = _download(packages, debs)
    roots: dict[str, Path] = {}
    for pkg in packages:
        root = work / "x" / pkg["package"]
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(files[pkg["package"]]), str(root)])
        roots[pkg["package"]] = root
    kernel_root = roots[packages[0]["package"]]
    vmlinuz = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise HelperBuildError(f"expected one vmlinuz in {kernel_root / 'boot'}, found {vmlinuz}")
    version = vmlinuz[0].name[len("vmlinuz-"):]
    config = dict(line.split("=", 1) for line in (kernel_root / "boot" / f"config-{version}").read_text().splitlines()
                  if line.startswith("CONFIG_") and "=" in line)
    for needed in ("CONFIG_PVH", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_DEVTMPFS", "CONFIG_EXT4_FS",
                   "CONFIG_RD_ZSTD", "CONFIG_BLK_DEV_INITRD"):
        if config.get(needed) != "y":
            raise HelperBuildError(f"kernel {version}: {needed} is not built in")
    compression = _extract_vmlinux(vmlinuz[0], out / "vmlinux")
    modules = _select_modules(kernel_root / "lib" / "modules" / version)
    initramfs = _make_initramfs(roots["busybox-static"] / "bin" / "busybox", modules, out / "initrd.img")
    rootfs = _make_rootfs({pkg["package"]: roots[pkg["package"]] for pkg in packages[1:]}, work / "rootfs",
                          out / "rootfs.img")
    return {
        "format": FORMAT,
        "kernel": "vmlinux", "initrd": "initrd.img", "rootfs": "rootfs.img", "root_label": ROOT_LABEL,
        "cmdline": CMDLINE, "ram_mib": RAM_MIB,
        "guest_ports": {"data": GUEST_DATA_PORT, "ctrl": GUEST_CTRL_PORT},
        "files": {name: {"size": (out / name).stat().st_size, "sha256": _sha256_file(out / name)}
                  for name in ("vmlinux", "initrd.img", "rootfs.img")},
        "kernel_version": version, "kernel_compression": compression,
        "modules": [name for name, _ in modules], "initramfs": initramfs, "root_disk": rootfs,
        "packages": packages,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
    }


def load_entry(entry: Path) -> dict | None:
    """The manifest of a complete entry, or None (sizes are checked here; hashes by Thalunix at use)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        for name, info in manifest["files"].items():
            if (entry / name).stat().st_size != info["size"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def _write_current(cache_root: Path, key: str) -> None:
    temp = cache_root / f".current.{os.getpid()}.tmp"
    temp.write_text(key + "\n")
    os.replace(temp, cache_root / "current")


def _build_entry(packages: list[dict[str, str]], key: str, cache_root: Path, entry: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache_root) as temp:
        out = Path(temp) / "out"
        out.mkdir()
        manifest = _build(packages, Path(temp), out)
        manifest["key"] = key
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if entry.exists():
            shutil.rmtree(entry)
        os.rename(out, entry)


def ensure_helper_image(cache_root: Path | None = None) -> Path:
    """Return a complete cache entry for the current packages, building it first if needed."""
    cache_root = Path(cache_root) if cache_root is not None else DEFAULT_CACHE_ROOT
    cache_root.mkdir(parents=True, exist_ok=True)
    packages = _resolve_packages(cache_root)
    key = _cache_key(packages)
    entry = cache_root / key
    if load_entry(entry) is None:
        with open(cache_root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find the entry
            for attempt in (1, 2):
                if load_entry(entry) is not None:
                    break
                for stale in cache_root.glob(".build-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                try:
                    _build_entry(packages, key, cache_root, entry)
                except _DownloadError:
                    if attempt == 2:
                        raise
                    # The .debs in apt's index may have left the archive: refresh the lists and re-key.
                    _run(["apt-get", "update"])
                    packages = _resolve_packages(cache_root, allow_update=False)
                    key = _cache_key(packages)
                    entry = cache_root / key
            if load_entry(entry) is not None:
                entries = sorted((p for p in cache_root.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{32}", p.name)
                                  and p != entry), key=lambda p: p.stat().st_mtime, reverse=True)
                for old in entries[KEEP_ENTRIES - 1:]:
                    shutil.rmtree(old, ignore_errors=True)
    _write_current(cache_root, key)
    return entry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: <repo>/.cache/helper-vm)")
    parser.add_argument("--out", type=Path, default=None, help="also copy the image files into this folder")
    args = parser.parse_args(argv)
    started = time.monotonic()
    entry = ensure_helper_image(args.cache)
    manifest = load_entry(entry) or {}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in [*manifest["files"], MANIFEST]:
            shutil.copyfile(entry / name, args.out / name)
    sizes = ", ".join(f"{name} {info['size'] / 1e6:.1f} MB" for name, info in manifest["files"].items())
    print(f"helper image: {entry} ({sizes}; kernel {manifest['kernel_version']}) in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
