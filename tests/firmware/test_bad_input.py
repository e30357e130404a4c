"""Bad firmware input: missing OVMF files and damaged variable stores give clear errors, and no VM starts.

Real QEMU and qemu-img; the "runtime without firmware" is a portable-style runtime folder
($THALUNIX_RUNTIME) whose share/OVMF is empty or incomplete, as a broken unpack would leave it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from firmware.support import boot
from thalunix.engine import DirectEngine
from thalunix.firmware import FirmwareMissingError, FirmwareVarsError, firmware_files, prepare_firmware
from thalunix.model import VMConfig
from thalunix.runtime import Runtime, find_firmware

REPO = Path(__file__).resolve().parent.parent.parent
SYSTEM_OVMF = Path("/usr/share/OVMF")


def runtime_folder(root: Path, ovmf: tuple[str, ...] = ()) -> Path:
    """A runtime laid out like the portable build's (bin/, share/OVMF/) around the system's QEMU."""
    (root / "bin").mkdir(parents=True)
    (root / "share" / "OVMF").mkdir(parents=True)
    for tool in ("qemu-system-x86_64", "qemu-img"):
        (root / "bin" / tool).symlink_to(shutil.which(tool))
    for name in ovmf:
        (root / "share" / "OVMF" / name).symlink_to(SYSTEM_OVMF / name)
    return root


def assert_not_started(engine: DirectEngine, name: str) -> None:
    config = engine.get(name)
    assert engine.status(name)["state"] == "stopped"
    assert not engine.data.vm_path(config.id, "run", "state.json").exists()
    qemu_log = engine.data.vm_path(config.id, "logs", "qemu.log")
    assert not qemu_log.exists() or "=== argv" not in qemu_log.read_text()   # QEMU was never launched


@pytest.mark.parametrize("firmware, present, missing, present_named", [
    ("uefi", (), ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), None),
    ("uefi-secure", ("OVMF_CODE_4M.secboot.fd",), ("OVMF_VARS_4M.ms.fd",), "OVMF_CODE_4M.secboot.fd"),
])
def test_missing_firmware_files_are_named_and_the_vm_does_not_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: DirectEngine, make_vm, firmware: str,
        present: tuple[str, ...], missing: tuple[str, ...], present_named: str | None) -> None:
    root = runtime_folder(tmp_path / "runtime", present)
    monkeypatch.setenv("THALUNIX_RUNTIME", str(root))
    make_vm("nofw", firmware=firmware)
    with pytest.raises(FirmwareMissingError) as raised:
        engine.start("nofw")
    message = str(raised.value)
    assert engine.runtime().source == "bundled"
    assert message.startswith("VM 'nofw': ")
    for name in missing:
        assert name in message
    if present_named:
        assert present_named not in message   # only what is missing is named
    assert str(root / "share" / "OVMF") in message                   # where it was looked for
    assert "unpack Thalunix again" in message and "BIOS" in message  # what to do
    assert_not_started(engine, "nofw")
    assert not engine.data.vm_path(engine.get("nofw").id, "firmware", "vars.qcow2").exists()

    # The command line says the same, in one line, with exit status 1.
    done = subprocess.run([sys.executable, "-m", "thalunix", "--data-dir", str(engine.data.root), "vm", "start",
                           "nofw"], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "THALUNIX_RUNTIME": str(root)})
    assert done.returncode == 1, done
    assert done.stderr.startswith("thalunix: VM 'nofw': ") and missing[0] in done.stderr
    assert_not_started(engine, "nofw")


def test_missing_firmware_on_a_system_qemu_says_to_install_ovmf(tmp_path: Path) -> None:
    runtime = Runtime.discover(cache_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = dataclasses.replace(runtime, source="system", firmware=find_firmware([empty]))
    with pytest.raises(FirmwareMissingError, match=r"OVMF_CODE_4M\.fd or OVMF_CODE\.fd .*apt install ovmf"):
        firmware_files(VMConfig(name="sys", firmware="uefi"), bare)
    # The real system folder has everything (the other tests boot from it).
    code, template = firmware_files(VMConfig(name="sys", firmware="uefi-secure"), runtime)
    assert (code.name, template.name) == ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd")


def _garbage(store: Path) -> None:
    store.write_bytes(os.urandom(4096) * 16)


def _truncated(store: Path) -> None:
    with open(store, "r+b") as handle:   # the header survives, the tables behind it do not
        handle.truncate(200_000)


def _scribbled(store: Path) -> None:
    with open(store, "r+b") as handle:   # random bytes over the refcount table
        handle.seek(65536)
        handle.write(os.urandom(4096))


def _other_build(store: Path) -> None:
    # A well-formed qcow2 of the 2 MB OVMF build's variables: QEMU would refuse the pflash size.
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(SYSTEM_OVMF / "OVMF_VARS.fd"),
                    str(store)], check=True)


@pytest.mark.parametrize("damage, reason", [
    (_garbage, "not a qcow2 image"), (_truncated, "corruption"), (_scribbled, "corruption"),
    (_other_build, "the firmware's template 540672"),
])
def test_damaged_variable_store_is_refused_with_the_reset_command(engine: DirectEngine, make_vm, damage,
                                                                  reason: str) -> None:
    make_vm("damaged", firmware="uefi")
    config = engine.get("damaged")
    prepare_firmware(config, engine.runtime(), engine.data)   # the store a first start makes
    store = engine.data.vm_path(config.id, "firmware", "vars.qcow2")
    damage(store)
    with pytest.raises(FirmwareVarsError) as raised:
        engine.start("damaged")
    message = str(raised.value)
    assert message.startswith(f"VM 'damaged': its UEFI variable store {store} is unusable")
    assert reason in message and "`thalunix vm firmware damaged reset`" in message
    assert raised.value.code == "firmware-vars-damaged" and raised.value.http_status == 409
    assert_not_started(engine, "damaged")
    assert store.exists()   # nothing is thrown away without being asked


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_reset_recovers_a_damaged_store_and_the_vm_boots(engine: DirectEngine, make_vm, data_dir: Path) -> None:
    make_vm("recover", firmware="uefi")
    config = engine.get("recover")
    prepare_firmware(config, engine.runtime(), engine.data)
    store = engine.data.vm_path(config.id, "firmware", "vars.qcow2")
    _garbage(store)
    damaged = store.read_bytes()
    cli = [sys.executable, "-m", "thalunix", "--data-dir", str(data_dir), "vm"]
    done = subprocess.run([*cli, "start", "recover"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1 and "thalunix vm firmware recover reset" in done.stderr, done
    done = subprocess.run([*cli, "firmware", "recover", "reset"], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0 and "the old store is kept as" in done.stdout, done
    backup = store.with_name("vars.qcow2.prev")
    assert backup.read_bytes() == damaged and not store.exists()
    boot(engine, "recover")                       # the test guest's ISO under OVMF, from a fresh store
    info = engine.firmware("recover")
    assert info["vars"]["made_for"] == "uefi" and info["vars"]["template"] == "OVMF_VARS_4M.fd"
    engine.stop("recover", force=True)
