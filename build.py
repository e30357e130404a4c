#!/usr/bin/env python3
"""Developer entry point: set up, test, run (and, later, assemble the portable exe).

    python3 build.py run      # install what is missing, then start Thalunix
    python3 build.py test     # install what is missing, then run the whole test suite
    python3 build.py setup    # only install (Debian packages as root, .venv, pip packages)

Works on a fresh Debian/Ubuntu machine as root. Everything Python goes into
``.venv/`` in the checkout; Debian packages are installed only when missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")

# What Thalunix itself needs on a Linux host when run from source.
RUN_PACKAGES = ["python3-venv", "qemu-system-x86", "qemu-utils", "ovmf", "swtpm", "swtpm-tools",
                # the window: WebKit for pywebview, and what PyGObject needs to build into .venv
                "gir1.2-webkit2-4.1", "libgirepository1.0-dev", "libcairo2-dev", "pkg-config", "gcc", "python3-dev"]
# What the test suite adds: the test guest's build tools (tests/guest/build.py keeps its own list).
TEST_PACKAGES = ["nasm", "xvfb", "imagemagick", "xdotool",   # the window under Xvfb, screenshotted
                 "tpm2-tools", "zstd", "lz4",   # TPM tests: NV through the helper; helper-vm/build.py
                 "chromium",                    # UI tests: Playwright drives the system's Chromium
                 "curl"]                        # bench/download.py's baseline


def _guest_packages() -> list[str]:
    spec = importlib.util.spec_from_file_location("guest_build", ROOT / "tests" / "guest" / "build.py")
    if spec is None or spec.loader is None:
        return []
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(getattr(module, "APT_PACKAGES", []))


def _missing_debian_packages(names: list[str]) -> list[str]:
    if not shutil.which("dpkg-query"):
        return []
    missing = []
    for name in dict.fromkeys(names):
        done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
        if "install ok installed" not in done.stdout:
            missing.append(name)
    return missing


def install_debian_packages(names: list[str]) -> None:
    missing = _missing_debian_packages(names)
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"build.py: these Debian packages are missing: {' '.join(missing)}\n"
                 f"  install them as root: apt-get install -y {' '.join(missing)}")
    print(f"build.py: installing Debian packages: {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def ensure_venv(extras: str) -> None:
    stamp = VENV / f".installed-{extras}"
    inputs = (ROOT / "pyproject.toml").stat().st_mtime_ns
    if stamp.exists() and stamp.read_text() == str(inputs):
        return
    if not VENV_PYTHON.exists():
        print("build.py: creating .venv", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    print(f"build.py: installing Python packages ({extras})", flush=True)
    subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "-q", "-e", f"{ROOT}[{extras}]"], check=True)
    stamp.write_text(str(inputs))


def ensure_web() -> None:
    """web/node_modules (noVNC, xterm.js) exactly as web/package-lock.json pins them; redone when the lock changes."""
    import hashlib
    web = ROOT / "web"
    digest = hashlib.sha256((web / "package-lock.json").read_bytes()).hexdigest()
    stamp = web / "node_modules" / ".thalunix-lock-sha256"
    if stamp.exists() and stamp.read_text() == digest:
        return
    npm = shutil.which("npm")
    if npm is None and sys.platform.startswith("linux"):
        install_debian_packages(["nodejs", "npm"])
        npm = shutil.which("npm")
    if npm is None:
        sys.exit("build.py: npm is missing; install Node.js (it brings npm), then run build.py again")
    print("build.py: installing the interface's npm packages (npm ci)", flush=True)
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=web, check=True)
    stamp.write_text(digest)


def setup(for_tests: bool) -> None:
    packages = RUN_PACKAGES + (TEST_PACKAGES + _guest_packages() if for_tests else [])
    if sys.platform.startswith("linux"):
        install_debian_packages(packages)
    ensure_venv("test" if for_tests else "gui")
    ensure_web()


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "help"
    if command == "setup":
        setup(for_tests=True)
        return 0
    if command == "test":
        setup(for_tests=True)
        return subprocess.run([str(VENV_PYTHON), "-m", "pytest", *argv[1:]], cwd=ROOT).returncode
    if command == "run":
        setup(for_tests=False)
        return subprocess.run([str(VENV_PYTHON), "-m", "thalunix", *argv[1:]], cwd=ROOT).returncode
    print(__doc__)
    return 0 if command in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
