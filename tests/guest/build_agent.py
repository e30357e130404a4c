"""Build (and cache) the *agent* test guest: the test guest plus qemu-guest-agent and USB drivers.

Same busybox userland and ``init.sh`` as :mod:`build` (whose functions this reuses), but on Debian's
generic kernel (``linux-image-amd64``: the cloud kernel has no USB support at all) with the USB
host/HID/storage modules, and Debian's ``qemu-guest-agent`` binary with the shared libraries it
needs (resolved with ``ldd``; the host runs the same Debian release) in a second cpio archive
appended to the initramfs (the kernel unpacks concatenated archives in order). That archive also
replaces ``/init`` by ``init.sh`` with one hook line that runs ``/etc/thalunix/boot.sh`` before the
READY line: it loads the extra modules and starts ``qemu-ga`` on the virtio-serial port named
``org.qemu.guest_agent.0`` when the VM has one. ``/sbin/shutdown`` (what qemu-ga runs for
``guest-shutdown``) prints THALUNIX-GUEST-POWEROFF and powers off, like the power button.

Usage (``tests/`` on sys.path)::

    from guest.build_agent import ensure_agent_guest
    images = ensure_agent_guest()     # GuestImages(kernel=..., initrd=..., iso=..., cmdline=...)

Cache: ``<repo>/.cache/guest-agent/<key>/``, keyed over the exact .debs, this file, ``build.py`` and
the guest scripts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from guest import build  # noqa: E402

CACHE_ROOT = build.REPO_ROOT / ".cache" / "guest-agent"
KERNEL_METAPACKAGE = "linux-image-amd64"
AGENT_PACKAGE = "qemu-guest-agent"
EXTRA_MODULES = ["xhci_pci", "xhci_hcd", "ehci_pci", "usbhid", "hid_generic", "usb_storage"]
#: Where init.sh prints READY: the hook goes right before it.
READY_ANCHOR = "echo THALUNIX-GUEST-READY > /dev/tty0"
HOOK = "[ -f /etc/thalunix/boot.sh ] && . /etc/thalunix/boot.sh\n"

BOOT_SH = """\
# Sourced by /init before READY (agent test guest only).
for port in /sys/class/virtio-ports/*; do
    if [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
        qemu-ga -m virtio-serial -p "/dev/${port##*/}" -d -l /run/qemu-ga.log -f /run/qemu-ga.pid \\
            || log "qemu-ga failed"
    fi
done
"""

SHUTDOWN_SH = """\
#!/bin/sh
# qemu-ga's guest-shutdown runs /sbin/shutdown -h -P +0 "...": power off like the power button does.
echo THALUNIX-GUEST-POWEROFF > /dev/ttyS0
echo THALUNIX-GUEST-POWEROFF > /dev/tty0
sync
case " $* " in *" -r "*) reboot -f ;; esac
poweroff -f
"""

OS_RELEASE = """\
NAME="Thalunix test guest"
PRETTY_NAME="Thalunix test guest (agent)"
ID=thalunix
VERSION_ID=1
"""


def _resolve() -> list[dict[str, str]]:
    recs = build._apt_show([KERNEL_METAPACKAGE, build.BUSYBOX_PACKAGE, AGENT_PACKAGE])
    if KERNEL_METAPACKAGE not in recs or AGENT_PACKAGE not in recs:
        build._apt_update()
        recs = build._apt_show([KERNEL_METAPACKAGE, build.BUSYBOX_PACKAGE, AGENT_PACKAGE])
    meta = recs.get(KERNEL_METAPACKAGE)
    if not meta:
        raise build.GuestBuildError(f"apt-cache knows no {KERNEL_METAPACKAGE}")
    match = re.search(r"(linux-image-[0-9][^\s,(]*-amd64)", meta.get("Depends", ""))
    if not match:
        raise build.GuestBuildError(f"cannot find the kernel package in {meta.get('Depends')!r}")
    kernel = build._apt_show([match.group(1)]).get(match.group(1))
    if not kernel:
        raise build.GuestBuildError(f"apt-cache knows no {match.group(1)}")
    return [{"package": rec["Package"], "version": rec["Version"], "deb": rec["Filename"].rsplit("/", 1)[-1],
             "sha256": rec["SHA256"]} for rec in (kernel, recs[build.BUSYBOX_PACKAGE], recs[AGENT_PACKAGE])]


def _key(pkgs: list[dict[str, str]]) -> str:
    digest = hashlib.sha256()
    for pkg in pkgs:
        digest.update(f"deb {pkg['deb']} {pkg['sha256']}\n".encode())
    for path in [Path(__file__).resolve(), *build._source_files()]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def _modules(moddir: Path) -> list[tuple[str, Path]]:
    """build.WANTED_MODULES plus the USB ones, in dependency order, for this kernel."""
    norm = lambda s: s.replace("-", "_")  # noqa: E731
    kos = {norm(p.name[: -len(".ko")]): p for p in moddir.rglob("*.ko")}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        ko = kos.get(name)
        if ko is None:
            return   # built in, or not in this kernel
        for dep in filter(None, build._modinfo(ko).get("depends", "").split(",")):
            visit(norm(dep))
        order.append((name, ko))

    for name in [*build.WANTED_MODULES, *EXTRA_MODULES]:
        visit(norm(name))
    return order


def _libraries(binary: Path) -> list[Path]:
    out = build._run(["ldd", str(binary)]).stdout
    libs = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    if not any("ld-linux" in str(lib) for lib in libs):
        raise build.GuestBuildError(f"ldd {binary}: no dynamic loader found in\n{out}")
    return libs


def _overlay(agent_root: Path, out: Path) -> dict[str, object]:
    cpio = build._Cpio()
    for folder in ("etc", "etc/thalunix", "sbin", "usr", "usr/sbin", "lib", "lib/x86_64-linux-gnu", "lib64"):
        cpio.dir(folder)
    init = (HERE / "init.sh").read_text()
    if READY_ANCHOR not in init:
        raise build.GuestBuildError(f"init.sh has no line {READY_ANCHOR!r} to hook the agent before")
    cpio.file("init", init.replace(READY_ANCHOR, HOOK + READY_ANCHOR, 1).encode(), 0o755)
    cpio.file("etc/thalunix/boot.sh", BOOT_SH.encode())
    cpio.file("sbin/shutdown", SHUTDOWN_SH.encode(), 0o755)
    cpio.file("etc/os-release", OS_RELEASE.encode())
    agent = agent_root / "usr" / "sbin" / "qemu-ga"
    cpio.file("usr/sbin/qemu-ga", agent.read_bytes(), 0o755)
    libs = _libraries(agent)
    for lib in libs:
        real = Path(os.path.realpath(lib))
        target = "lib64/" + lib.name if "ld-linux" in lib.name else "lib/x86_64-linux-gnu/" + lib.name
        cpio.file(target, real.read_bytes(), 0o755)
    raw = cpio.finish()
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    out.write_bytes(packer.compress(raw) + packer.flush())
    return {"libraries": [str(lib) for lib in libs], "overlay_bytes": len(raw)}


def _build(pkgs: list[dict[str, str]], work: Path, out: Path) -> dict[str, object]:
    started = time.monotonic()
    debs = work / "debs"
    debs.mkdir()
    files = build._download(pkgs, debs)
    roots = {}
    for pkg in pkgs:
        root = work / "x" / pkg["package"]
        root.mkdir(parents=True)
        build._run(["dpkg-deb", "-x", str(files[pkg["package"]]), str(root)])
        roots[pkg["package"]] = root
    kroot = roots[pkgs[0]["package"]]
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise build.GuestBuildError(f"expected one vmlinuz in {kroot / 'boot'}, found {vmlinuz}")
    kver = vmlinuz[0].name[len("vmlinuz-"):]
    modules = _modules(kroot / "lib" / "modules" / kver)
    missing = [m for m in EXTRA_MODULES if m not in {name for name, _ in modules}]
    shutil.copyfile(vmlinuz[0], out / "bzImage")
    base = work / "base.img"
    build._make_initramfs(roots[build.BUSYBOX_PACKAGE] / "bin" / "busybox", modules, base, "gzip")
    overlay = work / "overlay.img"
    details = _overlay(roots[AGENT_PACKAGE], overlay)
    # The kernel unpacks concatenated cpio archives in order: the overlay's /init replaces the base one.
    (out / "initrd.img").write_bytes(base.read_bytes() + overlay.read_bytes())
    iso_root = work / "iso"
    (iso_root / "boot" / "grub").mkdir(parents=True)
    shutil.copyfile(out / "bzImage", iso_root / "boot" / "bzImage")
    shutil.copyfile(out / "initrd.img", iso_root / "boot" / "initrd.img")
    (iso_root / "boot" / "grub" / "grub.cfg").write_text(build.GRUB_CFG.format(cmdline=build.KERNEL_CMDLINE))
    build._run(["grub-mkrescue", "-o", str(out / "guest.iso"), f"--install-modules={build.GRUB_MODULES}",
                "--fonts=", "--locales=", "--themes=", "--compress=xz", str(iso_root), "--", "-volid", "THALUNIX_AGENT"])
    return {"packages": pkgs, "kernel_version": kver, "modules": [name for name, _ in modules],
            "modules_missing": missing, "cmdline": build.KERNEL_CMDLINE, **details,
            "sizes": {f.name: f.stat().st_size for f in sorted(out.iterdir())},
            "build_seconds": round(time.monotonic() - started, 1)}


def ensure_agent_guest(cache_root: Path | None = None) -> build.GuestImages:
    """The agent guest's images, built first if the cache has none."""
    root = Path(cache_root) if cache_root else CACHE_ROOT
    root.mkdir(parents=True, exist_ok=True)
    pkgs = _resolve()
    entry = root / _key(pkgs)
    images = build._load_entry(entry)
    if images:
        return images
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        images = build._load_entry(entry)
        if images:
            return images
        for stale in root.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=root) as tmp:
            work = Path(tmp)
            out = work / "out"
            out.mkdir()
            manifest = _build(pkgs, work, out)
            manifest["key"] = entry.name
            (out / build.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(out, entry)
        for old in sorted((p for p in root.iterdir() if p.is_dir() and p != entry and not p.name.startswith(".")),
                          key=lambda p: p.stat().st_mtime)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    images = build._load_entry(entry)
    if images is None:
        raise build.GuestBuildError(f"cache entry {entry} is incomplete after the build")
    return images


if __name__ == "__main__":
    started = time.monotonic()
    for key, value in vars(ensure_agent_guest()).items():
        print(f"{key}: {value}")
    print(f"({time.monotonic() - started:.1f} s)")
