"""Finds the binaries Thalunix runs (bundled first, then the system) and probes what they can do.

Capabilities come from the QEMU binary itself (``--version``, ``-accel help``,
``-machine help``, ``-device help``, ``-tpmdev help``, ``-netdev help``), never
from guesses about the OS, and are cached keyed by the binary's identity (real
path, size, mtime), so a new QEMU is probed again and an old one is not.

Example::

    runtime = Runtime.discover(cache_dir=data.cache_dir)
    runtime.qemu            # Path to qemu-system-x86_64
    runtime.caps.accels     # ["tcg", "kvm"]
    runtime.caps.has_device("virtio-net-pci")
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from thalunix.errors import RuntimeMissingError

if TYPE_CHECKING:
    from thalunix.accel import AccelChoice

ENV_RUNTIME = "THALUNIX_RUNTIME"
ENV_HELPER_VM = "THALUNIX_HELPER_VM"   # a helper VM image folder, overriding the bundled/checkout one
PROBE_VERSION = 2   # bump when the parsing below changes, so old caches are not trusted
EXE = ".exe" if os.name == "nt" else ""


def host_os() -> str:
    """``linux``, ``windows`` or ``darwin``."""
    return {"win32": "windows", "cygwin": "windows"}.get(sys.platform, sys.platform.rstrip("0123456789"))


def platform_tag() -> str:
    machine = platform.machine().lower().replace("amd64", "x86_64")
    return f"{host_os()}-{machine}"


#: Runtimes the portable exe unpacked at start-up (:mod:`thalunix.bundle`), searched right after $THALUNIX_RUNTIME.
_unpacked_roots: list[Path] = []


def add_bundled_root(root: Path) -> None:
    """Search ``root`` (a runtime unpacked into the data folder) before any other bundled or system runtime."""
    if root not in _unpacked_roots:
        _unpacked_roots.insert(0, root)


def bundled_roots() -> list[Path]:
    """Where a bundled runtime may be, most specific first."""
    roots = []
    if os.environ.get(ENV_RUNTIME):
        roots.append(Path(os.environ[ENV_RUNTIME]))
    roots += _unpacked_roots
    meipass = getattr(sys, "_MEIPASS", None)
    if meipass:
        roots.append(Path(meipass) / "bundled" / platform_tag())
    roots.append(Path(__file__).resolve().parent.parent / "bundled" / platform_tag())
    return roots


@dataclass(frozen=True)
class BinaryIdentity:
    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "BinaryIdentity":
        real = os.path.realpath(path)
        stat = os.stat(real)
        return cls(real, stat.st_size, stat.st_mtime_ns)

    def key(self) -> str:
        return hashlib.sha256(f"{PROBE_VERSION}|{self.path}|{self.size}|{self.mtime_ns}".encode()).hexdigest()[:20]


@dataclass
class Capabilities:
    """What one QEMU binary offers, as it says itself."""

    version: str = ""
    accels: list[str] = field(default_factory=list)
    machines: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    tpm_backends: list[str] = field(default_factory=list)
    netdevs: list[str] = field(default_factory=list)
    #: Why a probe came back empty (e.g. ``-tpmdev`` is not an option in Windows builds).
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", self.version)[:3])

    def has_device(self, name: str) -> bool:
        return name in self.devices

    @property
    def has_tpm_emulator(self) -> bool:
        return "emulator" in self.tpm_backends

    def summary(self) -> dict[str, object]:
        return {
            "version": self.version, "accelerators": self.accels,
            "machines": [m for m in ("q35", "pc", "microvm") if m in self.machines],
            "tpm": "emulator" if self.has_tpm_emulator else self.notes.get("tpm", "no TPM emulation"),
            "devices": len(self.devices), "netdevs": self.netdevs,
        }


def parse_version(text: str) -> str:
    match = re.search(r"version\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else ""


def parse_accels(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()[1:] if re.fullmatch(r"\s*[a-z0-9_-]+\s*", line)]


def parse_machines(text: str) -> list[str]:
    names = []
    for line in text.splitlines()[1:]:
        match = re.match(r"(\S+)\s", line)
        if match:
            names.append(match.group(1))
        alias = re.search(r"\(alias of (\S+)\)", line)
        if alias:
            names.append(alias.group(1))
    return sorted(set(names))


def parse_devices(text: str) -> list[str]:
    return sorted(set(re.findall(r'^name "([^"]+)"', text, re.MULTILINE)))


def parse_tpm(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\s+(passthrough|emulator)\s", text, re.MULTILINE)]


def parse_netdevs(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()[1:] if re.fullmatch(r"\s*[a-z0-9_-]+\s*", line)]


_PROBES = {
    "version": (["--version"], parse_version),
    "accels": (["-accel", "help"], parse_accels),
    "machines": (["-machine", "help"], parse_machines),
    "devices": (["-device", "help"], parse_devices),
    "tpm_backends": (["-tpmdev", "help"], parse_tpm),
    "netdevs": (["-netdev", "help"], parse_netdevs),
}


def probe_capabilities(qemu: Path, firmware_dir: Path | None = None) -> Capabilities:
    """Ask the binary; run the probes side by side (each is a QEMU start)."""
    caps = Capabilities()
    base = [str(qemu)] + (["-L", str(firmware_dir)] if firmware_dir else [])

    def run(args: list[str]) -> tuple[int, str]:
        try:
            done = subprocess.run(base + args, capture_output=True, text=True, timeout=30,
                                  stdin=subprocess.DEVNULL, errors="replace")
        except (OSError, subprocess.TimeoutExpired) as error:
            return -1, str(error)
        return done.returncode, done.stdout + done.stderr

    with concurrent.futures.ThreadPoolExecutor(len(_PROBES)) as pool:
        results = {name: pool.submit(run, args) for name, (args, _) in _PROBES.items()}
    for name, (args, parser) in _PROBES.items():
        code, output = results[name].result()
        if name == "version" and code != 0:
            raise RuntimeMissingError(f"QEMU at {qemu} does not run ({output.strip()[:300]}); "
                                      "reinstall it or use the portable Thalunix build")
        # Parse whatever came back: QEMU 7.2 lists its TPM backends and still exits 1.
        value = parser(output)
        setattr(caps, name, value)
        if not value:
            last_line = (output.strip().splitlines() or [""])[-1]
            caps.notes[name.split("_")[0]] = f"`qemu {' '.join(args)}` listed nothing: {last_line}"
    if not caps.has_tpm_emulator:
        caps.notes["tpm"] = "this QEMU build has no TPM emulation (QEMU builds for Windows never have it)"
    return caps


@dataclass(frozen=True)
class Firmware:
    """UEFI firmware files (OVMF): code and its pristine variable template, plain and Secure Boot."""

    code: Path | None = None
    vars: Path | None = None
    secure_code: Path | None = None
    secure_vars: Path | None = None
    #: The folders searched, joined by os.pathsep (error messages and the doctor say where to put the files).
    searched: str = ""


_OVMF_NAMES = {
    "code": ("OVMF_CODE_4M.fd", "OVMF_CODE.fd", "edk2-x86_64-code.fd"),
    "vars": ("OVMF_VARS_4M.fd", "OVMF_VARS.fd", "edk2-i386-vars.fd"),
    "secure_code": ("OVMF_CODE_4M.secboot.fd", "OVMF_CODE.secboot.fd", "edk2-x86_64-secure-code.fd"),
    "secure_vars": ("OVMF_VARS_4M.ms.fd", "OVMF_VARS.ms.fd"),
}
SYSTEM_FIRMWARE_DIRS = (Path("/usr/share/OVMF"), Path("/usr/share/edk2/ovmf"), Path("/usr/share/qemu"),
                        Path("/usr/share/edk2/x64"))


def find_firmware(dirs: list[Path]) -> Firmware:
    found: dict[str, Path] = {}
    for role, names in _OVMF_NAMES.items():
        for folder in dirs:
            hit = next((folder / name for name in names if (folder / name).is_file()), None)
            if hit:
                found[role] = hit
                break
    # Code and vars must come from one build: a 2 MB vars with 4 MB code does not boot.
    for code_role, vars_role in (("code", "vars"), ("secure_code", "secure_vars")):
        if code_role in found and vars_role in found and found[code_role].parent != found[vars_role].parent:
            found.pop(vars_role)
    return Firmware(**found, searched=os.pathsep.join(str(folder) for folder in dirs))


@dataclass
class Runtime:
    """The binaries and firmware Thalunix will use, and what the QEMU binary can do."""

    qemu: Path
    qemu_img: Path | None
    swtpm: Path | None
    firmware: Firmware
    #: QEMU's ``-L`` folder when bundled (BIOS, VGA ROMs, keymaps); None for a system QEMU.
    data_dir: Path | None
    caps: Capabilities
    source: str  # "bundled" or "system"
    #: The swtpm helper micro-VM image folder (manifest.json, bzImage, initrd.img, rootfs.img), if any.
    helper_vm: Path | None = None

    @classmethod
    def discover(cls, cache_dir: Path | None = None, search_path: str | None = None) -> "Runtime":
        """Bundled binaries first, then the system ``PATH``; raise with advice if QEMU is nowhere."""
        qemu_name = "qemu-system-x86_64" + EXE
        for root in bundled_roots():
            binary = root / "bin" / qemu_name
            if binary.is_file():
                share = root / "share"
                return cls._build(binary, root / "bin", "bundled", share / "qemu" if (share / "qemu").is_dir()
                                  else None, [share / "OVMF", share / "qemu"], cache_dir, search_path=None)
        system = shutil.which(qemu_name, path=search_path)
        if not system:
            raise RuntimeMissingError(
                "QEMU (qemu-system-x86_64) was not found: no bundled runtime and none on PATH. Use the portable "
                "Thalunix build, or install QEMU (Debian/Ubuntu: apt install qemu-system-x86 qemu-utils ovmf)")
        bin_dir = Path(system).parent
        return cls._build(Path(system), bin_dir, "system", None, list(SYSTEM_FIRMWARE_DIRS), cache_dir,
                          search_path=search_path)

    @classmethod
    def _build(cls, qemu: Path, bin_dir: Path, source: str, data_dir: Path | None, firmware_dirs: list[Path],
               cache_dir: Path | None, search_path: str | None) -> "Runtime":
        def sibling(name: str) -> Path | None:
            candidate = bin_dir / (name + EXE)
            if candidate.is_file():
                return candidate
            found = shutil.which(name + EXE, path=search_path) if source == "system" else None
            return Path(found) if found else None

        return cls(qemu=qemu, qemu_img=sibling("qemu-img"), swtpm=sibling("swtpm"),
                   firmware=find_firmware(firmware_dirs), data_dir=data_dir,
                   caps=cached_capabilities(qemu, cache_dir, data_dir), source=source,
                   helper_vm=find_helper_vm(bin_dir.parent if source == "bundled" else None))

    def accelerator(self, preference: str, cache_dir: Path) -> "AccelChoice":
        """The accelerator ladder for ``preference`` (auto/kvm/whpx/hvf/haxm/tcg), self-tested and cached."""
        from thalunix.accel import choose_accelerator
        return choose_accelerator(preference, self.qemu, set(self.caps.accels), cache_dir,
                                  extra_args=["-L", str(self.data_dir)] if self.data_dir else ())

    def require_qemu_img(self) -> Path:
        if not self.qemu_img:
            raise RuntimeMissingError(f"qemu-img was not found next to {self.qemu} or on PATH; install "
                                      "qemu-utils or use the portable Thalunix build")
        return self.qemu_img


def find_helper_vm(bundled_root: Path | None = None) -> Path | None:
    """The swtpm helper VM image: ``$THALUNIX_HELPER_VM``, the bundled runtime's, or a checkout's build.

    A checkout's images are built by ``helper-vm/build.py`` into ``.cache/helper-vm/<key>/``;
    its ``current`` file names the newest. Only the folder is found here; the image is checked
    (manifest, sizes, sha256) when it is used, by ``thalunix.tpm.helper.HelperImage``.
    """
    if os.environ.get(ENV_HELPER_VM):
        return Path(os.environ[ENV_HELPER_VM])
    roots = ([bundled_root] if bundled_root else []) + bundled_roots()
    for root in roots:
        folder = root / "share" / "thalunix" / "helper-vm"
        if (folder / "manifest.json").is_file():
            return folder
    cache = Path(__file__).resolve().parent.parent / ".cache" / "helper-vm"
    try:
        key = (cache / "current").read_text().strip()
    except OSError:
        return None
    return cache / key if key and (cache / key).is_dir() else None


def cached_capabilities(qemu: Path, cache_dir: Path | None, data_dir: Path | None = None) -> Capabilities:
    identity = BinaryIdentity.of(qemu)
    cache_file = cache_dir / f"caps-{identity.key()}.json" if cache_dir else None
    if cache_file and cache_file.is_file():
        try:
            return Capabilities(**json.loads(cache_file.read_text()))
        except (ValueError, TypeError):
            pass  # an unreadable cache is just probed again
    caps = probe_capabilities(qemu, data_dir)
    if cache_file:
        from thalunix.store import atomic_write_json
        atomic_write_json(cache_file, asdict(caps))
    return caps
