"""Build (and cache) a Secure Boot test ISO: Debian's signed shim → signed grub → signed kernel.

The chain is the one a real distribution boots through: shim (signed by Microsoft's UEFI CA,
so OVMF with the Microsoft keys enrolled runs it), Debian's signed grub (checked by shim) and
Debian's signed cloud kernel (checked by grub through shim). The kernel is the test guest's own
(``tests/guest/build.py``; Debian's ``linux-image-*-cloud-amd64`` is the signed build), its
initrd is the test guest's initrd with one more cpio appended that adds ``efivarfs.ko`` (the
cloud kernel has efivarfs as a module, the test guest does not carry it), so a test can write
an EFI variable from the guest's shell::

    insmod /lib/modules/efivarfs.ko; mount -t efivarfs none /sys/firmware/efi/efivars

Layout: an El Torito EFI image (FAT) with ``EFI/BOOT/BOOTX64.EFI`` (shim) and
``EFI/BOOT/grubx64.efi`` (grub's CD build, ``gcdx64.efi``), which looks for ``/.disk/info`` on the
ISO9660 filesystem and reads ``/boot/grub/grub.cfg`` there; kernel and initrd are on the ISO9660.
The kernel gets ``console=ttyS0`` and logs ``secureboot: Secure boot enabled`` when it is.

Usage from tests (``tests/`` on sys.path)::

    from guest.secureboot import ensure_secureboot_iso
    image = ensure_secureboot_iso()     # SecureBootImage(iso=..., manifest=...)

or ``python tests/guest/secureboot.py`` to build and print the path.

Cache: ``<repo>/.cache/secureboot/<key>/`` where *key* is a sha256 over the .deb names and
sha256s (from apt's index, checked against the downloads), the test guest's kernel and initrd,
and this file. Built in a temporary folder and renamed into place when complete.
Host tools: ``xorriso``, ``mtools`` and ``dosfstools`` (already in the guest build's APT_PACKAGES);
the signed packages are downloaded with ``apt-get download``, never installed on the host.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest.build import (REPO_ROOT, GuestBuildError, _apt_show, _apt_update, _Cpio, _download, _run,  # noqa: E402
                         _sha256_file, ensure_guest)

DEFAULT_CACHE_ROOT = REPO_ROOT / ".cache" / "secureboot"
SHIM_PACKAGE = "shim-signed"
GRUB_PACKAGE = "grub-efi-amd64-signed"
SHIM_FILE = "usr/lib/shim/shimx64.efi.signed"
GRUB_FILE = "usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed"
KERNEL_CMDLINE = "console=ttyS0,115200 panic=-1"
MANIFEST = "manifest.json"
KEEP_ENTRIES = 2

GRUB_CFG = f"""\
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
set default=0
menuentry "Thalunix Secure Boot test" {{
    echo "THALUNIX-SB-GRUB"
    linux /boot/vmlinuz {KERNEL_CMDLINE}
    initrd /boot/initrd.img
}}
"""


@dataclass(frozen=True)
class SecureBootImage:
    iso: Path
    manifest: dict


def _packages(kernel_package: str, kernel_version: str) -> list[dict[str, str]]:
    """The .debs to download, from apt's index (name, version, file name, sha256)."""
    names = [SHIM_PACKAGE, GRUB_PACKAGE, kernel_package]
    records = _apt_show(names)
    if any(name not in records for name in names):
        _apt_update()
        records = _apt_show(names)
    missing = [name for name in names if name not in records]
    if missing:
        raise GuestBuildError(f"apt-cache knows no {', '.join(missing)}; check the apt sources")
    if records[kernel_package]["Version"] != kernel_version:
        raise GuestBuildError(f"the test guest was built from {kernel_package} {kernel_version} but apt offers "
                              f"{records[kernel_package]['Version']}; rebuild the guest (python tests/guest/build.py)")
    return [{"package": name, "version": records[name]["Version"], "sha256": records[name]["SHA256"],
             "deb": records[name]["Filename"].rsplit("/", 1)[-1]} for name in names]


def _cache_key(pkgs: list[dict[str, str]], kernel: Path, initrd: Path) -> str:
    digest = hashlib.sha256()
    for pkg in sorted(pkgs, key=lambda p: p["deb"]):
        digest.update(f"deb {pkg['deb']} {pkg['sha256']}\n".encode())
    for path in (kernel, initrd):
        digest.update(f"file {path.name} {_sha256_file(path)}\n".encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:32]


def _efivarfs_cpio(kernel_root: Path) -> bytes:
    """A cpio holding the kernel's efivarfs.ko as /lib/modules/efivarfs.ko (appended to the guest's initrd)."""
    found = sorted(kernel_root.glob("lib/modules/*/kernel/fs/efivarfs/efivarfs.ko*"))
    if len(found) != 1:
        raise GuestBuildError(f"expected one efivarfs.ko in the kernel package, found {found}")
    if found[0].suffix != ".ko":
        raise GuestBuildError(f"{found[0].name} is compressed; the guest's busybox insmod needs a plain .ko")
    cpio = _Cpio()
    for folder in ("lib", "lib/modules"):
        cpio.dir(folder)
    cpio.file("lib/modules/efivarfs.ko", found[0].read_bytes())
    return cpio.finish()


def _build(pkgs: list[dict[str, str]], kernel: Path, initrd: Path, work: Path, out: Path) -> dict:
    started = time.monotonic()
    debs = work / "debs"
    debs.mkdir()
    files = _download(pkgs, debs)
    roots = {}
    for pkg in pkgs:
        root = work / "x" / pkg["package"]
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(files[pkg["package"]]), str(root)])
        roots[pkg["package"]] = root
    shim = roots[SHIM_PACKAGE] / SHIM_FILE
    grub = roots[GRUB_PACKAGE] / GRUB_FILE
    for needed in (shim, grub):
        if not needed.is_file():
            raise GuestBuildError(f"{needed.relative_to(work)} is not in its package")

    iso_root = work / "iso"
    (iso_root / "boot" / "grub").mkdir(parents=True)
    (iso_root / ".disk").mkdir()
    (iso_root / ".disk" / "info").write_text("Thalunix Secure Boot test\n")
    (iso_root / "boot" / "grub" / "grub.cfg").write_text(GRUB_CFG)
    shutil.copyfile(kernel, iso_root / "boot" / "vmlinuz")
    # Linux reads concatenated cpio archives, each compressed or not: the guest's initrd stays as built. An
    # uncompressed archive is only recognised at a 4-byte aligned offset; the zeros in between are skipped.
    first = initrd.read_bytes()
    with open(iso_root / "boot" / "initrd.img", "wb") as handle:
        handle.write(first + b"\0" * (-len(first) % 512))
        handle.write(_efivarfs_cpio(roots[pkgs[2]["package"]]))

    efi = iso_root / "boot" / "efi.img"
    kib = (shim.stat().st_size + grub.stat().st_size) // 1024 + 1024   # the two files plus FAT overhead
    _run(["mkfs.vfat", "-C", "-n", "THALUNIX_SB", str(efi), str(kib)])
    _run(["mmd", "-i", str(efi), "::/EFI", "::/EFI/BOOT"])
    _run(["mcopy", "-i", str(efi), str(shim), "::/EFI/BOOT/BOOTX64.EFI"])
    _run(["mcopy", "-i", str(efi), str(grub), "::/EFI/BOOT/grubx64.efi"])
    _run(["xorriso", "-as", "mkisofs", "-o", str(out / "secureboot.iso"), "-V", "THALUNIX_SB", "-J", "-R",
          "-e", "boot/efi.img", "-no-emul-boot", str(iso_root)])
    return {
        "packages": pkgs,
        "kernel_sha256": _sha256_file(kernel),
        "initrd_sha256": _sha256_file(initrd),
        "cmdline": KERNEL_CMDLINE,
        "sizes": {f.name: f.stat().st_size for f in sorted(out.iterdir())},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
    }


def _load(entry: Path) -> SecureBootImage | None:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    iso = entry / "secureboot.iso"
    return SecureBootImage(iso, manifest) if iso.is_file() else None


def ensure_secureboot_iso(cache_root: Path | None = None) -> SecureBootImage:
    """The Secure Boot test ISO, built first if the cache has none for the current inputs."""
    cache_root = Path(cache_root) if cache_root is not None else DEFAULT_CACHE_ROOT
    cache_root.mkdir(parents=True, exist_ok=True)
    guest = ensure_guest()
    guest_manifest = json.loads((guest.kernel.parent / "manifest.json").read_text())
    kernel_pkg = guest_manifest["packages"][0]
    pkgs = _packages(kernel_pkg["package"], kernel_pkg["version"])
    entry = cache_root / _cache_key(pkgs, guest.kernel, guest.initrd)
    image = _load(entry)
    if image:
        return image
    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one builder at a time; the others then find the entry
        image = _load(entry)
        if image:
            return image
        for stale in cache_root.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=cache_root) as tmp:
            work = Path(tmp)
            out = work / "out"
            out.mkdir()
            manifest = _build(pkgs, guest.kernel, guest.initrd, work, out)
            manifest["key"] = entry.name
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(out, entry)
        older = sorted((p for p in cache_root.iterdir() if p.is_dir() and p != entry and not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        for old in older[KEEP_ENTRIES - 1:]:
            shutil.rmtree(old, ignore_errors=True)
    image = _load(entry)
    if image is None:
        raise GuestBuildError(f"cache entry {entry} is incomplete after the build")
    return image


if __name__ == "__main__":
    built = ensure_secureboot_iso()
    print(built.iso)
    print(json.dumps(built.manifest, indent=2))
