"""Build (and cache) a tiny real Linux test guest from Debian packages.

The guest is Debian's cloud kernel plus a busybox initramfs whose /init is ``init.sh`` beside this
file. Three artefacts come out: the kernel (bzImage), the compressed initramfs, and one hybrid ISO
(grub-mkrescue) that boots from CD-ROM under SeaBIOS and under OVMF, with grub and the kernel on
the serial console too.

Usage from tests (with ``tests/`` on sys.path)::

    from guest.build import ensure_guest
    images = ensure_guest()      # GuestImages(kernel=..., initrd=..., iso=..., cmdline=...)

or ``python tests/guest/build.py`` to build and print the paths.

Cache: ``<repo>/.cache/guest/<key>/`` where *key* is a sha256 over the exact .deb file names and
sha256s (from apt's index, checked against the downloaded files), this file and the guest's shell
scripts. An entry is built in a temporary directory and renamed into place when complete.
Nothing is pinned by hand: the current candidates are used and recorded in ``manifest.json``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
DEFAULT_CACHE_ROOT = REPO_ROOT / ".cache" / "guest"

sys.path.insert(0, str(REPO_ROOT / "helper-vm"))
import debpkgs  # noqa: E402  (helper-vm/debpkgs.py: apt candidates, verified downloads, cpio)

# Debian packages the *host* needs to build the guest and to run the guest tests.
APT_PACKAGES = [
    "qemu-system-x86",
    "ovmf",
    "xorriso",
    "mtools",
    "dosfstools",
    "grub-common",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "zstd",
    "e2fsprogs",  # mke2fs for the tests' data disks
]

# Debian packages the guest is made of (downloaded, never installed on the host).
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# The guest's shell scripts: (file beside this one, path inside the initramfs).
GUEST_SCRIPTS = [("init.sh", "init"), ("powerbtn.sh", "etc/acpi/PWRF/00000080")]

KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200"

# Drivers the guest may need. Those built into the cloud kernel are skipped, dependencies are
# added, and whatever the kernel lacks altogether (e.g. ahci in the cloud flavour) is recorded
# in the manifest under "modules_unavailable".
WANTED_MODULES = [
    "virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_scsi", "virtio_console",
    "virtio_rng",
    "sd_mod", "sr_mod", "ata_piix", "ahci", "nvme",
    "isofs", "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1", "nls_utf8", "ext4",
    "button", "evdev",
]
# Extra insmod arguments ("scan=sync" so SCSI disks exist before /init looks for the data disk).
MODULE_ARGS = {"scsi_mod": "scan=sync"}

# grub modules to keep on the ISO (grub-mkrescue otherwise copies all of them). grub-mkrescue's
# EFI image insmods every part_* module; all_video gives the kernel a GOP framebuffer under UEFI
# (without it grub boots Linux "in blind mode": nothing on the screen after grub).
GRUB_MODULES = (
    "linux normal iso9660 serial terminal echo test search configfile all_video "
    "part_acorn part_amiga part_apple part_bsd part_dfly part_dvh part_gpt part_msdos part_plan "
    "part_sun part_sunpc"
)

GRUB_CFG = """\
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
set default=0
insmod all_video
menuentry "Thalunix test guest" {{
    echo "Loading Thalunix test guest..."
    linux /boot/bzImage {cmdline}
    initrd /boot/initrd.img
}}
"""

MANIFEST = "manifest.json"
KEEP_ENTRIES = 4  # after a build, older cache entries beyond this many are removed


@dataclass(frozen=True)
class GuestImages:
    kernel: Path  # bzImage
    initrd: Path  # initramfs (cpio, compressed)
    iso: Path  # hybrid ISO: boots under SeaBIOS and OVMF from CD-ROM, serial console on ttyS0
    cmdline: str  # kernel command line for -kernel/-initrd direct boot


class GuestBuildError(debpkgs.DebError):
    pass


_DownloadError = debpkgs.DownloadError
_Cpio = debpkgs.Cpio
_sha256_file = debpkgs.sha256_file
_apt_show = debpkgs.apt_show
_apt_update = debpkgs.apt_update
_download = debpkgs.download


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("text", True)
    return debpkgs.run(cmd, hint=f"install the Debian packages {' '.join(APT_PACKAGES)}", **kw)


def _source_files() -> list[Path]:
    return [Path(__file__).resolve()] + [HERE / name for name, _ in GUEST_SCRIPTS]


# --------------------------------------------------------------------------------------------
# package resolution (apt's index: exact .deb names and sha256s, without downloading)


def _resolve_once() -> list[dict[str, str]]:
    kernel = debpkgs.depends_on(KERNEL_METAPACKAGE, r"linux-image-[0-9][^\s,(]*-cloud-amd64")
    busybox = _apt_show([BUSYBOX_PACKAGE]).get(BUSYBOX_PACKAGE)
    if not busybox:
        raise GuestBuildError(f"apt-cache knows no {BUSYBOX_PACKAGE}")
    return [debpkgs.candidate(kernel), debpkgs.candidate(busybox)]


def _resolve_packages(cache_root: Path, allow_update: bool = True) -> list[dict[str, str]]:
    """The current candidate .debs; memoised against apt's list files (apt-cache is slow)."""
    return debpkgs.resolve_memoised(cache_root, [KERNEL_METAPACKAGE, BUSYBOX_PACKAGE], _resolve_once,
                                    allow_update)


def _cache_key(pkgs: list[dict[str, str]]) -> str:
    return debpkgs.packages_key(pkgs, _source_files())


# --------------------------------------------------------------------------------------------
# kernel modules


def _modinfo(ko: Path) -> dict[str, str]:
    """Fields of a module's .modinfo ELF section (no modinfo/depmod needed on the host)."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError(f"{ko}: not an ELF64 module")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):
        base = shoff + i * shentsize
        name, _type = struct.unpack_from("<II", data, base)
        off, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, str] = {}
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name : end] == b".modinfo":
            for item in data[off : off + size].split(b"\0"):
                k, sep, v = item.partition(b"=")
                if sep and k.decode() not in info:
                    info[k.decode()] = v.decode(errors="replace")
            break
    return info


def _select_modules(moddir: Path) -> tuple[list[tuple[str, Path]], list[str], list[str]]:
    """(load order [(name, path)], built-in names, unavailable names)."""
    norm = lambda s: s.replace("-", "_")  # noqa: E731
    kos = {norm(p.name[: -len(".ko")]): p for p in moddir.rglob("*.ko")}
    builtin = set()
    bf = moddir / "modules.builtin"
    if bf.exists():
        for line in bf.read_text().split():
            builtin.add(norm(Path(line).name.split(".ko")[0]))
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()
    builtins, unavailable = [], []

    def visit(name: str, stack: tuple[str, ...] = ()):
        if name in seen:
            return
        if name in stack:
            raise GuestBuildError(f"module dependency cycle: {stack + (name,)}")
        ko = kos.get(name)
        if ko is None:
            (builtins if name in builtin else unavailable).append(name)
            seen.add(name)
            return
        for dep in filter(None, _modinfo(ko).get("depends", "").split(",")):
            visit(norm(dep), stack + (name,))
        seen.add(name)
        order.append((name, ko))

    for name in WANTED_MODULES:
        visit(norm(name))
    return order, builtins, unavailable


# --------------------------------------------------------------------------------------------
# initramfs


def _kernel_config(config: Path) -> dict[str, str]:
    cfg = {}
    for line in config.read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, _, v = line.partition("=")
            cfg[k] = v
    return cfg


def _make_initramfs(busybox: Path, modules: list[tuple[str, Path]], out: Path, compressor: str):
    c = _Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run",
              "root", "mnt", "mnt/data", "etc", "etc/acpi", "etc/acpi/PWRF", "var", "var/log",
              "lib", "lib/modules"):
        c.dir(d, 0o1777 if d == "tmp" else 0o755)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.symlink("var/run", "/run")
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    c.file("etc/group", b"root:x:0:\n")
    c.file("etc/hostname", b"thalunix-guest\n")
    for src, dst in GUEST_SCRIPTS:
        c.file(dst, (HERE / src).read_bytes(), 0o755)
    lines = []
    for name, ko in modules:
        c.file(f"lib/modules/{name}.ko", ko.read_bytes())
        lines.append(f"{name} {MODULE_ARGS.get(name, '')}".rstrip())
    c.file("lib/modules/load-order", ("\n".join(lines) + "\n").encode())
    raw = c.finish()
    if compressor == "zstd":
        data = _run(["zstd", "-q", "-19", "-T0", "-c"], input=raw, text=False).stdout
    else:
        co = zlib.compressobj(9, zlib.DEFLATED, 31)
        data = co.compress(raw) + co.flush()
    out.write_bytes(data)
    return len(raw)


# --------------------------------------------------------------------------------------------
# the build


def _build(pkgs: list[dict[str, str]], work: Path, out: Path) -> dict:
    t0 = time.monotonic()
    debs = work / "debs"
    debs.mkdir()
    files = _download(pkgs, debs)
    roots = {}
    for p in pkgs:
        root = work / "x" / p["package"]
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(files[p["package"]]), str(root)])
        roots[p["package"]] = root
    kroot = roots[pkgs[0]["package"]]
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise GuestBuildError(f"expected one vmlinuz in {kroot / 'boot'}, found {vmlinuz}")
    kver = vmlinuz[0].name[len("vmlinuz-"):]
    cfg = _kernel_config(kroot / "boot" / f"config-{kver}")
    for needed in ("CONFIG_SERIAL_8250_CONSOLE", "CONFIG_DEVTMPFS", "CONFIG_BLK_DEV_INITRD",
                   "CONFIG_ACPI", "CONFIG_EFI_STUB"):
        if cfg.get(needed) != "y":
            raise GuestBuildError(f"kernel {kver}: {needed} is not built in")
    compressor = "zstd" if cfg.get("CONFIG_RD_ZSTD") == "y" and shutil.which("zstd") else "gzip"
    if compressor == "gzip" and cfg.get("CONFIG_RD_GZIP") != "y":
        raise GuestBuildError(f"kernel {kver} supports neither zstd nor gzip initramfs")
    modules, builtins, unavailable = _select_modules(kroot / "lib" / "modules" / kver)
    busybox = roots[BUSYBOX_PACKAGE] / "bin" / "busybox"

    shutil.copyfile(vmlinuz[0], out / "bzImage")
    raw_size = _make_initramfs(busybox, modules, out / "initrd.img", compressor)

    iso_root = work / "iso"
    (iso_root / "boot" / "grub").mkdir(parents=True)
    shutil.copyfile(out / "bzImage", iso_root / "boot" / "bzImage")
    shutil.copyfile(out / "initrd.img", iso_root / "boot" / "initrd.img")
    (iso_root / "boot" / "grub" / "grub.cfg").write_text(GRUB_CFG.format(cmdline=KERNEL_CMDLINE))
    _run(["grub-mkrescue", "-o", str(out / "guest.iso"), f"--install-modules={GRUB_MODULES}",
          "--fonts=", "--locales=", "--themes=", "--compress=xz",
          str(iso_root), "--", "-volid", "THALUNIX_GUEST"])

    return {
        "packages": pkgs,
        "kernel_version": kver,
        "modules": [name for name, _ in modules],
        "module_args": MODULE_ARGS,
        "modules_builtin": builtins,
        "modules_unavailable": unavailable,
        "initramfs_compression": compressor,
        "initramfs_uncompressed_bytes": raw_size,
        "cmdline": KERNEL_CMDLINE,
        "grub_modules": GRUB_MODULES.split(),
        "sizes": {f.name: f.stat().st_size for f in sorted(out.iterdir())},
        "sources": {f.name: _sha256_file(f) for f in _source_files()},
        "host_tools": {
            tool: _run([tool, "--version"]).stdout.strip().splitlines()[0]
            for tool in ("grub-mkrescue", "xorriso", "zstd")
        },
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - t0, 1),
    }


def _images(entry: Path, manifest: dict) -> GuestImages:
    return GuestImages(
        kernel=entry / "bzImage",
        initrd=entry / "initrd.img",
        iso=entry / "guest.iso",
        cmdline=manifest["cmdline"],
    )


def _load_entry(entry: Path) -> GuestImages | None:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    images = _images(entry, manifest)
    if all(p.is_file() for p in (images.kernel, images.initrd, images.iso)):
        return images
    return None


def _prune(cache_root: Path, keep: Path) -> None:
    entries = [p for p in cache_root.iterdir()
               if p.is_dir() and re.fullmatch(r"[0-9a-f]{32}", p.name) and p != keep]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_ENTRIES - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def ensure_guest(cache_root: Path | None = None) -> GuestImages:
    """Return the test guest's images, building them first if the cache has no entry."""
    cache_root = Path(cache_root) if cache_root is not None else DEFAULT_CACHE_ROOT
    cache_root.mkdir(parents=True, exist_ok=True)
    pkgs = _resolve_packages(cache_root)
    key = _cache_key(pkgs)
    entry = cache_root / key
    images = _load_entry(entry)
    if images:
        return images

    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find the entry
        images = _load_entry(entry)
        if images:
            return images
        for stale in cache_root.glob(".build-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=cache_root) as tmp:
            work = Path(tmp)
            out = work / "out"
            out.mkdir()
            try:
                manifest = _build(pkgs, work, out)
            except _DownloadError:
                # The .debs in apt's index may have gone from the archive: refresh and re-key.
                _apt_update()
                pkgs = _resolve_packages(cache_root, allow_update=False)
                key = _cache_key(pkgs)
                entry = cache_root / key
                images = _load_entry(entry)
                if images:
                    return images
                shutil.rmtree(work)
                work.mkdir()
                out.mkdir()
                manifest = _build(pkgs, work, out)
            manifest["key"] = key
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if entry.exists():  # a half-written entry can't exist (rename is atomic); a stale one
                shutil.rmtree(entry)  # lacking files is replaced
            os.rename(out, entry)
        _prune(cache_root, keep=entry)
    images = _load_entry(entry)
    if images is None:
        raise GuestBuildError(f"cache entry {entry} is incomplete after the build")
    return images


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    images = ensure_guest()
    for k, v in asdict(images).items():
        print(f"{k}: {v}")
    print(f"manifest: {images.kernel.parent / MANIFEST}")
    print(f"({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
