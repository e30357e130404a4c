#!/usr/bin/env python3
"""Build (and cache) the swtpm helper micro-VM image from Debian packages.

The helper is a tiny Linux VM whose only job is to run swtpm on TCP, for hosts where swtpm cannot
run natively. Its image is three files: a kernel of its own (``bzImage``), compiled from Debian's
``linux-source`` with ``kernel.config`` beside this file merged over ``tinyconfig`` — everything built
in, LZ4-compressed; an uncompressed initramfs with static busybox and ``/init`` (``init.sh`` beside
this file); and a read-only ext4 root disk holding swtpm, mke2fs/e2fsck and their libraries (read on
demand, so they cost no RAM up front). ``manifest.json`` lists the files with their size and sha256
(Thalunix refuses a damaged image), the kernel command line, the guest's RAM and TCP ports and the
packages used; ``kernel.config`` is the kernel's full configuration (with the source package's
version in the manifest, what its GPL source offer points at).

Usage::

    python3 helper-vm/build.py                 # build into the cache, print the entry
    python3 helper-vm/build.py --out DIR       # also copy the image to DIR (for bundling)

    from build import ensure_helper_image      # with helper-vm/ on sys.path
    entry = ensure_helper_image()              # Path of a complete cache entry

Cache: ``<repo>/.cache/helper-vm/<key>/`` where *key* is a sha256 over the exact .deb names and
sha256s (from apt's index, checked against the downloaded files), this file, ``init.sh`` and
``kernel.config``. The compiled kernel has its own cache, ``kernel-<key>/``, keyed by the source
package, ``kernel.config``, :data:`KERNEL_RECIPE` and the compiler, so editing ``init.sh`` does not
recompile it (that takes ~4 minutes on two cores). An entry is built in a temporary folder and renamed
into place when complete; ``current`` (written atomically) names the newest entry, which is how a
checkout's Thalunix finds it.
Host needs: apt-get, dpkg-deb, zstd, mke2fs (e2fsprogs), and to compile the kernel gcc, make, flex,
bison, bc, xz-utils, bzip2, libc6-dev and libelf-dev (objtool). Nothing is installed on the host by this script.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import debpkgs  # noqa: E402  (apt candidates, verified downloads, cpio)

DEFAULT_CACHE_ROOT = REPO_ROOT / ".cache" / "helper-vm"
FORMAT = 3  # bump when the image layout changes in a way Thalunix must know about
#: bump when the way the kernel is compiled changes (kernel.config changes re-key by themselves)
KERNEL_RECIPE = 1

#: Debian packages the *host* needs to build the image.
HOST_PACKAGES = ["zstd", "dpkg", "e2fsprogs", "xz-utils", "bzip2",
                 "gcc", "libc6-dev", "make", "flex", "bison", "bc", "libelf-dev"]   # the kernel

KERNEL_SOURCE_METAPACKAGE = "linux-source"
KERNEL_CONFIG = HERE / "kernel.config"
#: Packages the image is made of (downloaded, never installed). Shared libraries the binaries need
#: are found by reading their ELF headers; a library in none of these packages fails the build.
PACKAGES = ["busybox-static", "swtpm", "swtpm-libs", "libtpms0", "libssl3", "libseccomp2", "libc6",
            "e2fsprogs", "libext2fs2", "libcom-err2", "libblkid1", "libuuid1"]
#: (package, path inside it, path on the read-only root disk); busybox alone goes into the initramfs
BINARIES = [("swtpm", "usr/bin/swtpm", "bin/swtpm"),
            ("e2fsprogs", "sbin/mke2fs", "sbin/mke2fs"),
            ("e2fsprogs", "sbin/e2fsck", "sbin/e2fsck")]
#: The busybox applets init.sh runs, linked at build time (``busybox --install`` at boot costs time under TCG).
APPLETS = ["sh", "mount", "umount", "ip", "findfs", "mkdir", "dd", "tr", "wc", "sync", "poweroff", "cat",
           "sleep", "ls"]
#: Where init.sh mounts the root disk; the program interpreter link in the initramfs points there.
RO_MOUNT = "ro"
ROOT_LABEL = "thalunix-root"
LIB_DIR = "lib/x86_64-linux-gnu"

GUEST_DATA_PORT = 2321
GUEST_CTRL_PORT = 2322
#: The design's promise; the kernel and busybox leave swtpm most of it (see bench/RESULTS.md for the floor).
RAM_MIB = 64
#: loglevel=3: only critical kernel messages reach the VM's log panel. PCI is built in for QEMUs without microvm
#: (q35), and on microvm, which has no PCI, the kernel reports "PCI: Fatal: No config space access function found"
#: at KERN_ERR at every boot, which reads like a failure. What can fail here, init.sh reports in its own lines.
CMDLINE = "console=ttyS0 loglevel=3 panic=-1"

MANIFEST = "manifest.json"
KEEP_ENTRIES = 3


class HelperBuildError(debpkgs.DebError):
    pass


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return debpkgs.run(cmd, hint=f"install the Debian packages {' '.join(HOST_PACKAGES)}", **kw)


# -- packages ---------------------------------------------------------------------------------------------

def _resolve_once() -> list[dict[str, str]]:
    """The kernel source package first, then :data:`PACKAGES`, each as apt's candidate .deb."""
    source = debpkgs.depends_on(KERNEL_SOURCE_METAPACKAGE, r"linux-source-[0-9][^\s,(]*")
    records = debpkgs.apt_show(PACKAGES)
    missing = [name for name in PACKAGES if name not in records]
    if missing:
        raise HelperBuildError(f"apt-cache knows no {', '.join(missing)}")
    return [debpkgs.candidate(record) for record in [source, *(records[name] for name in PACKAGES)]]


def _resolve_packages(cache_root: Path, allow_update: bool = True) -> list[dict[str, str]]:
    """The current candidate .debs, memoised against apt's lists (apt-cache takes seconds)."""
    return debpkgs.resolve_memoised(cache_root, [KERNEL_SOURCE_METAPACKAGE, *PACKAGES], _resolve_once, allow_update)


def _cache_key(packages: list[dict[str, str]]) -> str:
    return debpkgs.packages_key(packages, [Path(__file__).resolve(), HERE / "init.sh", KERNEL_CONFIG,
                                           HERE / "debpkgs.py"], salt=f"format {FORMAT}\n")


# -- ELF: shared library needs -----------------------------------------------------------------------------

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


# -- initramfs --------------------------------------------------------------------------------------------

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


def _make_initramfs(busybox: Path, out: Path) -> dict[str, int]:
    """busybox, its applet links and /init, as an uncompressed cpio.

    Uncompressed: unpacking 1 MB of zstd took the kernel ~150 ms under TCG, for 1.5 MB saved in a
    file the kernel frees once unpacked.
    """
    cpio = debpkgs.Cpio()
    for folder in ("bin", "sbin", "dev", "proc", "sys", "tmp", "state", RO_MOUNT, "etc", "lib", "lib64"):
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
    raw = cpio.finish()
    out.write_bytes(raw)
    return {"bytes": len(raw)}


# -- the kernel -------------------------------------------------------------------------------------------

def _wanted_config() -> dict[str, str]:
    """kernel.config as symbol → value ("n" for ``# CONFIG_X is not set``)."""
    wanted: dict[str, str] = {}
    for line in KERNEL_CONFIG.read_text().splitlines():
        unset = re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip())
        if unset:
            wanted[unset.group(1)] = "n"
        elif line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            wanted[name] = value
    return wanted


def _check_config(config_text: str, defined: set[str]) -> list[str]:
    """Every symbol of kernel.config this kernel defines must have its value after olddefconfig (Kconfig drops
    what a missing dependency forbids); the ones it does not define at all are returned (e.g. RANDOM_TRUST_CPU,
    gone in 6.2, where trusting the CPU's RNG became the default)."""
    have: dict[str, str] = {}
    for line in config_text.splitlines():
        if line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            have[name] = value
    wanted = _wanted_config()
    absent = sorted(name for name in wanted if name not in defined)
    wrong = [f"{name}={value} (got {have.get(name, 'n')})" for name, value in wanted.items()
             if name in defined and have.get(name, "n") != value]
    if wrong:
        raise HelperBuildError("the helper kernel's configuration lost settings of helper-vm/kernel.config (a "
                               "dependency is missing or the symbol was renamed): " + ", ".join(wrong))
    return absent


def _compiler() -> str:
    return _run(["gcc", "--version"], text=True).stdout.splitlines()[0]


def _kernel_key(source: dict[str, str]) -> str:
    digest = hashlib.sha256(f"recipe {KERNEL_RECIPE}\ndeb {source['deb']} {source['sha256']}\n"
                            f"cc {_compiler()}\n".encode())
    digest.update(KERNEL_CONFIG.read_bytes())
    return digest.hexdigest()[:32]


def _compile_kernel(source_deb: Path, work: Path, out: Path) -> dict[str, str]:
    """``bzImage`` and its full ``config`` into *out*, from the linux-source .deb; returns the release."""
    root = work / "x"
    root.mkdir()
    _run(["dpkg-deb", "-x", str(source_deb), str(root)])
    # Debian: usr/src/linux-source-6.1.tar.xz; Ubuntu: usr/src/linux-source-6.8.0/linux-source-6.8.0.tar.bz2
    tarballs = sorted((root / "usr" / "src").rglob("linux-source-*.tar.*"))
    if len(tarballs) != 1:
        raise HelperBuildError(f"{source_deb.name}: expected one linux-source tarball, found {tarballs}")
    top = tarballs[0].name.split(".tar.")[0]
    # Documentation is a quarter of the tree; Kconfig needs only its one Kconfig file (where it has one).
    _run(["tar", "-xf", str(tarballs[0]), "-C", str(work), f"--exclude={top}/Documentation"])
    _run(["tar", "-xf", str(tarballs[0]), "-C", str(work), f"{top}/Documentation/Kconfig"], check=False)
    tarballs[0].unlink()
    tree = work / top
    env = {**os.environ, "ARCH": "x86_64", "KBUILD_BUILD_USER": "thalunix", "KBUILD_BUILD_HOST": "helper-vm",
           "KBUILD_BUILD_TIMESTAMP": "2024-01-01", "LC_ALL": "C"}
    make = ["make", "-s", "-C", str(tree)]
    _run([*make, "tinyconfig"], env=env)
    _run(["sh", str(tree / "scripts" / "kconfig" / "merge_config.sh"), "-m", "-O", str(tree),
          str(tree / ".config"), str(KERNEL_CONFIG)], env=env, cwd=tree)
    _run([*make, "olddefconfig"], env=env)
    config_text = (tree / ".config").read_text()
    absent = _check_config(config_text, _kconfig_symbols(tree))
    _run([*make, f"-j{os.cpu_count() or 1}", "bzImage"], env=env)
    release = _run([*make, "kernelrelease"], env=env, text=True).stdout.strip()
    shutil.copyfile(tree / "arch" / "x86" / "boot" / "bzImage", out / "bzImage")
    (out / "config").write_text(config_text)
    return {"release": release, "absent_symbols": " ".join(absent)}


def _kconfig_symbols(tree: Path) -> set[str]:
    """Every CONFIG_ symbol the source tree defines (a kernel.config line may name one a newer kernel dropped)."""
    symbols: set[str] = set()
    for kconfig in tree.rglob("Kconfig*"):
        if kconfig.is_file():
            symbols.update("CONFIG_" + name for name in
                           re.findall(r"^\s*(?:menu)?config\s+(\w+)", kconfig.read_text(errors="replace"), re.M))
    return symbols


def _ensure_kernel(source: dict[str, str], cache_root: Path, work: Path) -> Path:
    """The compiled kernel's cache folder (``bzImage``, ``config``, ``kernel.json``), compiling it if needed."""
    folder = cache_root / f"kernel-{_kernel_key(source)}"
    if (folder / "kernel.json").is_file():
        return folder
    (work / "kdeb").mkdir()
    deb = debpkgs.download([source], work / "kdeb")[source["package"]]
    out = work / "kernel"
    out.mkdir()
    started = time.monotonic()
    info = _compile_kernel(deb, work, out)
    info.update(source=source["package"], version=source["version"], compiler=_compiler(),
                compile_seconds=str(round(time.monotonic() - started)))
    (out / "kernel.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(out, folder)
    for old in cache_root.glob("kernel-*"):
        if old != folder and old.stat().st_mtime < time.time() - 86400:
            shutil.rmtree(old, ignore_errors=True)
    return folder


# -- the build --------------------------------------------------------------------------------------------

def _build(packages: list[dict[str, str]], work: Path, out: Path, cache_root: Path) -> dict:
    started = time.monotonic()
    source, parts = packages[0], packages[1:]
    kernel = _ensure_kernel(source, cache_root, work)
    debs = work / "debs"
    debs.mkdir()
    files = debpkgs.download(parts, debs)
    roots: dict[str, Path] = {}
    for pkg in parts:
        root = work / "pkg" / pkg["package"]
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(files[pkg["package"]]), str(root)])
        roots[pkg["package"]] = root
    shutil.copyfile(kernel / "bzImage", out / "bzImage")
    shutil.copyfile(kernel / "config", out / "kernel.config")
    kernel_info = json.loads((kernel / "kernel.json").read_text())
    initramfs = _make_initramfs(roots["busybox-static"] / "bin" / "busybox", out / "initrd.img")
    rootfs = _make_rootfs(roots, work / "rootfs", out / "rootfs.img")
    return {
        "format": FORMAT,
        "kernel": "bzImage", "initrd": "initrd.img", "rootfs": "rootfs.img", "root_label": ROOT_LABEL,
        "cmdline": CMDLINE, "ram_mib": RAM_MIB,
        "guest_ports": {"data": GUEST_DATA_PORT, "ctrl": GUEST_CTRL_PORT},
        "files": {name: {"size": (out / name).stat().st_size, "sha256": debpkgs.sha256_file(out / name)}
                  for name in ("bzImage", "initrd.img", "rootfs.img", "kernel.config")},
        "kernel_version": kernel_info["release"], "kernel_source": f"{source['package']} {source['version']}",
        "kernel_config_absent": kernel_info.get("absent_symbols", "").split(),
        "kernel_config": "kernel.config", "initramfs": initramfs, "root_disk": rootfs,
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
        manifest = _build(packages, Path(temp), out, cache_root)
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
                except debpkgs.DownloadError:
                    if attempt == 2:
                        raise
                    # The .debs in apt's index may have left the archive: refresh the lists and re-key.
                    debpkgs.apt_update()
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
