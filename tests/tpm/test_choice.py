"""Which TPM backend a VM gets for each mode on each kind of host (real runtime, real files; no QEMU started)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from thalunix.doctor import diagnose, render
from thalunix.engine import DirectEngine
from thalunix.model import VMConfig
from thalunix.runtime import Capabilities, Runtime
from thalunix.tpm import HelperImageError, TpmManager, TpmUnavailableError


@pytest.fixture
def runtime(helper_image: Path) -> Runtime:
    found = Runtime.discover()
    assert found.swtpm is not None, "swtpm is not installed; run `python3 build.py setup`"
    return dataclasses.replace(found, helper_vm=helper_image)


@pytest.fixture
def manager(engine: DirectEngine) -> TpmManager:
    return engine.supervisor.tpm


def vm(mode: str) -> VMConfig:
    return VMConfig(name="chooser", tpm=mode)


def test_everything_available(manager: TpmManager, runtime: Runtime) -> None:
    assert manager.choose(vm("off"), runtime).backend is None
    for mode in ("auto", "on", "native"):
        assert manager.choose(vm(mode), runtime).backend == "native"
    assert manager.choose(vm("helper"), runtime).backend == "helper"


def test_no_swtpm(manager: TpmManager, runtime: Runtime, tmp_path: Path) -> None:
    not_executable = tmp_path / "swtpm"
    not_executable.write_text("#!/bin/sh\n")
    for swtpm, words in ((None, "swtpm was not found"), (not_executable, "is not executable")):
        host = dataclasses.replace(runtime, swtpm=swtpm)
        for mode in ("auto", "on"):
            choice = manager.choose(vm(mode), host)
            assert choice.backend == "helper" and words in choice.reason
        with pytest.raises(TpmUnavailableError, match=f"TPM is 'native' but .*{words}"):
            manager.choose(vm("native"), host)


def test_neither_backend(manager: TpmManager, runtime: Runtime, tmp_path: Path) -> None:
    host = dataclasses.replace(runtime, swtpm=None, helper_vm=tmp_path / "missing")
    choice = manager.choose(vm("auto"), host)
    assert choice.backend is None
    assert "native: swtpm was not found" in choice.reason and "helper VM:" in choice.reason
    with pytest.raises(TpmUnavailableError, match="TPM is 'on' but none can be had"):
        manager.choose(vm("on"), host)
    with pytest.raises(HelperImageError, match="TPM is 'helper' but .*has no manifest.json"):
        manager.choose(vm("helper"), host)


def test_qemu_without_tpm_emulation(manager: TpmManager, runtime: Runtime) -> None:
    caps = Capabilities(**{**dataclasses.asdict(runtime.caps), "tpm_backends": [], "notes": {}})
    host = dataclasses.replace(runtime, caps=caps)
    assert manager.choose(vm("auto"), host).reason == "no TPM: this QEMU build has no TPM emulation"
    for mode in ("on", "native", "helper"):
        with pytest.raises(TpmUnavailableError, match=f"TPM is '{mode}' but this QEMU build has no TPM emulation"):
            manager.choose(vm(mode), host)


def test_doctor_reports_tpm(engine: DirectEngine, helper_image: Path) -> None:
    report = diagnose(engine)
    tpm = report["tpm"]
    assert tpm["emulator"] is True and tpm["auto"] == "native" and tpm["native_problem"] == ""
    text = render(report)
    assert "TPM: VMs with TPM 'auto' get native" in text
    assert "native swtpm:" in text and "helper VM:" in text
