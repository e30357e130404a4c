"""The accelerator self-test against the real QEMU: TCG passes, this host's broken KVM is caught.

This machine's /dev/kvm is a paravirtual backend (module ``kvm_pvm``): QEMU accepts
``-accel kvm`` and then the guest dies with "KVM internal error. Suberror: 1" at its first
x87 instruction. The production code must find that out by itself; the test only uses
the module's presence to know which outcome to expect.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from thalunix import accel

QEMU = Path(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")
KVM_IS_PVM = Path("/sys/module/kvm_pvm").exists()

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not QEMU.exists(),
                       reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"),
]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Counts every QEMU the accelerator code starts."""
    started: list[list[str]] = []
    real_launch = accel._launch

    def counting(argv: list[str], stderr: Any) -> Any:
        started.append(argv)
        return real_launch(argv, stderr)

    monkeypatch.setattr(accel, "_launch", counting)
    return started


def test_qemu_lists_its_accelerators() -> None:
    assert "tcg" in accel.list_qemu_accels(QEMU)


def test_tcg_self_test_passes(launches: list[list[str]]) -> None:
    started = time.monotonic()
    verdict = accel.self_test(QEMU, "tcg")
    elapsed = time.monotonic() - started
    print(f"\nTCG self-test: {verdict.reason} (wall {elapsed:.3f} s)")
    assert verdict.usable, verdict.reason
    assert verdict.seconds is not None and verdict.seconds < accel.DEFAULT_TIMEOUT
    assert elapsed < accel.DEFAULT_TIMEOUT
    assert len(launches) == 1
    argv = launches[0]
    for option in ("-nodefaults", "-no-reboot", "-machine", "-accel"):
        assert option in argv
    assert argv[argv.index("-accel") + 1] == "tcg"


def test_hung_guest_is_killed_within_timeout() -> None:
    # 10 ms is too short for QEMU to even load the BIOS: the self-test must stop it and say so.
    started = time.monotonic()
    verdict = accel.self_test(QEMU, "tcg", timeout=0.01)
    assert time.monotonic() - started < 2.0
    assert not verdict.usable
    assert "guest hung (no result in 0.01 s)" in verdict.reason


def test_qemu_error_is_quoted() -> None:
    verdict = accel.self_test(QEMU, "nosuchaccel")
    assert not verdict.usable
    assert "invalid accelerator nosuchaccel" in verdict.reason


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")
def test_kvm_verdict_here() -> None:
    started = time.monotonic()
    precheck = accel.host_precheck("kvm", "linux")
    if not precheck.usable:
        print(f"\nKVM precheck: {precheck.reason}")
        assert precheck.reason.startswith("KVM: /dev/kvm")
        return
    verdict = accel.self_test(QEMU, "kvm")
    elapsed = time.monotonic() - started
    print(f"\nKVM self-test: {verdict.reason} (wall {elapsed:.3f} s)")
    assert verdict.reason.startswith("KVM: ")
    assert elapsed < accel.DEFAULT_TIMEOUT + 2.0, "the hard timeout must hold"
    if KVM_IS_PVM:
        assert not verdict.usable
        assert ("KVM internal error" in verdict.reason) or ("guest hung" in verdict.reason)
    elif verdict.usable:
        assert "self-test passed" in verdict.reason


def test_auto_choice_and_cache(tmp_path: Path, launches: list[list[str]]) -> None:
    accels = accel.list_qemu_accels(QEMU)
    cache = tmp_path / "cache"

    started = time.monotonic()
    first = accel.choose_accelerator("auto", QEMU, accels, cache)
    first_s = time.monotonic() - started
    first_launches = len(launches)
    print(f"\nfirst choice ({first_s:.3f} s, {first_launches} QEMU runs): {first.summary}")
    for verdict in first.verdicts:
        print(f"  {verdict.name}: usable={verdict.usable} {verdict.reason}")
    assert first.ladder[-1] == "tcg"
    assert first.accel_args[-2:] == ["-accel", "tcg"]
    if KVM_IS_PVM:
        assert first.chosen == "tcg"
        assert first.ladder == ["tcg"]
        assert first.accel_args == ["-accel", "tcg"]
        assert first.summary.startswith("KVM: ")
        assert first.summary.endswith("→ TCG, expect slow guests")
        assert "WARNING" not in first.summary
    assert (cache / "accel.json").exists()

    started = time.monotonic()
    second = accel.choose_accelerator("auto", QEMU, accels, cache)
    second_s = time.monotonic() - started
    print(f"second choice ({second_s:.3f} s, {len(launches) - first_launches} QEMU runs): {second.summary}")
    assert len(launches) == first_launches, "the second choice must come from the cache"
    assert second_s < 0.5
    assert second.chosen == first.chosen and second.summary == first.summary
    assert all(v.cached for v in second.verdicts if v.seconds is not None)


@pytest.mark.skipif(not KVM_IS_PVM, reason="only this host's paravirtual KVM is known to be broken")
def test_explicit_kvm_refused_here(tmp_path: Path) -> None:
    with pytest.raises(accel.ValidationError) as caught:
        accel.choose_accelerator("kvm", QEMU, accel.list_qemu_accels(QEMU), tmp_path)
    message = str(caught.value)
    print(f"\nexplicit kvm: {message}")
    assert "Accelerator 'kvm' cannot be used on this host: KVM: " in message
    assert "Choose 'auto'" in message
