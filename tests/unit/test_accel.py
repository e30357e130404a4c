"""Unit tests for thalunix.accel: ladders, prechecks, failure recognition, the cache and the choice.

No QEMU runs here: the self-test is replaced by a recording fake. The real boot is covered
by tests/integration/test_accel_selftest.py.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from thalunix import accel, selftest
from thalunix.accel import AccelChoice, AccelVerdict
from thalunix.errors import RuntimeMissingError, ThalunixError, ValidationError

# --------------------------------------------------------------------------- ladders and names


@pytest.mark.parametrize(
    ("host", "ladder"),
    [
        ("linux", ["kvm", "tcg"]),
        ("Linux", ["kvm", "tcg"]),
        ("windows", ["whpx", "whpx,kernel-irqchip=off", "tcg"]),
        ("win32", ["whpx", "whpx,kernel-irqchip=off", "tcg"]),
        ("darwin", ["hvf", "tcg"]),
        ("freebsd", ["tcg"]),
    ],
)
def test_ladder_for_host(host: str, ladder: list[str]) -> None:
    assert accel.ladder_for_host(host) == ladder


def test_haxm_only_when_qemu_lists_it() -> None:
    assert accel.ladder_for_host("windows", {"whpx", "tcg"}) == ["whpx", "whpx,kernel-irqchip=off", "tcg"]
    assert accel.ladder_for_host("windows", {"whpx", "haxm", "tcg"}) == [
        "whpx", "whpx,kernel-irqchip=off", "haxm", "tcg"]
    assert accel.ladder_for_host("darwin", {"hvf", "haxm", "tcg"}) == ["hvf", "haxm", "tcg"]
    assert accel.ladder_for_host("linux", {"kvm", "haxm", "tcg"}) == ["kvm", "tcg"]


def test_names_and_argv() -> None:
    assert accel.base_name("whpx,kernel-irqchip=off") == "whpx"
    assert accel.display_name("whpx,kernel-irqchip=off") == "WHPX (kernel-irqchip=off)"
    assert accel.display_name("kvm") == "KVM"
    assert accel.accel_argv(["kvm", "tcg"]) == ["-accel", "kvm", "-accel", "tcg"]
    assert accel.accel_argv(["tcg"]) == ["-accel", "tcg"]


# --------------------------------------------------------------------------- prechecks


def test_tcg_precheck_always_usable() -> None:
    verdict = accel.host_precheck("tcg", "linux")
    assert verdict.usable and verdict.reason.startswith("TCG: always available")


def test_kvm_precheck_missing_device(tmp_path: Path) -> None:
    verdict = accel.host_precheck("kvm", "linux", kvm_device=tmp_path / "kvm")
    assert not verdict.usable
    assert "does not exist" in verdict.reason and "VT-x" in verdict.reason


def test_kvm_precheck_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device = tmp_path / "kvm"
    device.touch()

    def denied(path: Any, flags: int, *args: Any) -> int:
        assert flags & os.O_RDWR, "KVM must be opened read-write, as QEMU does"
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(accel.os, "open", denied)
    verdict = accel.host_precheck("kvm", "linux", kvm_device=device)
    assert not verdict.usable
    assert verdict.reason == (f"KVM: {device} is not writable by this user (add the user to the 'kvm' group "
                              "and log in again)")


def test_kvm_precheck_other_open_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device = tmp_path / "kvm"
    device.touch()

    def busy(path: Any, flags: int, *args: Any) -> int:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(accel.os, "open", busy)
    verdict = accel.host_precheck("kvm", "linux", kvm_device=device)
    assert not verdict.usable and "Device or resource busy" in verdict.reason


def test_kvm_precheck_ok(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.touch()
    verdict = accel.host_precheck("kvm", "linux", kvm_device=device)
    assert verdict.usable and "present and writable" in verdict.reason


def test_wrong_host_os() -> None:
    assert "only exists on Linux" in accel.host_precheck("kvm", "windows").reason
    assert "only exists on Windows" in accel.host_precheck("whpx", "linux").reason
    assert "only exists on macOS" in accel.host_precheck("hvf", "linux").reason
    assert not accel.host_precheck("haxm", "linux").usable
    assert "unknown accelerator" in accel.host_precheck("xen", "linux").reason


def test_host_os_defaults_to_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel.platform, "system", lambda: "Windows")
    calls: list[str] = []

    def probe() -> tuple[bool, str]:
        calls.append("whpx")
        return True, "hypervisor present"

    verdict = accel.host_precheck("whpx,kernel-irqchip=off", whpx_probe=probe)
    assert verdict == AccelVerdict("whpx,kernel-irqchip=off", True,
                                   "WHPX (kernel-irqchip=off): hypervisor present")
    assert calls == ["whpx"]
    monkeypatch.setattr(accel.platform, "system", lambda: "Darwin")
    assert accel.host_precheck("hvf", hvf_probe=lambda: (False, "no")).reason == "HVF: no"


class _FakeWinHv:
    """Stands in for ctypes.WinDLL("WinHvPlatform.dll")."""

    def __init__(self, present: int, hresult: int = 0) -> None:
        self.present = present
        self.hresult = hresult
        self.calls: list[tuple[int, int]] = []
        outer = self

        class Function:
            restype: Any = None
            argtypes: Any = None

            def __call__(self, code: int, buffer: Any, size: int, written: Any) -> int:
                outer.calls.append((code, size))
                value = ctypes.c_int32(outer.present)
                ctypes.memmove(buffer, ctypes.byref(value), 4)
                return outer.hresult

        self.WHvGetCapability = Function()


def test_probe_whpx_present() -> None:
    fake = _FakeWinHv(present=1)
    ok, detail = accel.probe_whpx(lambda name: fake)
    assert ok and "running hypervisor" in detail
    assert fake.calls == [(0, 64)]  # WHvCapabilityCodeHypervisorPresent
    assert fake.WHvGetCapability.restype is ctypes.c_long


def test_probe_whpx_absent_and_errors() -> None:
    ok, detail = accel.probe_whpx(lambda name: _FakeWinHv(present=0))
    assert not ok and "not running" in detail
    ok, detail = accel.probe_whpx(lambda name: _FakeWinHv(present=1, hresult=-2143485947))
    assert not ok and "HRESULT 0x" in detail

    def missing(name: str) -> Any:
        raise OSError(126, "The specified module could not be found")

    ok, detail = accel.probe_whpx(missing)
    assert not ok and "Windows Hypervisor Platform" in detail


def test_probe_whpx_on_non_windows_python() -> None:
    if hasattr(ctypes, "WinDLL"):
        pytest.skip("running on Windows: the real DLL path is taken")
    ok, detail = accel.probe_whpx()
    assert not ok and "cannot be loaded" in detail


def test_probe_hvf() -> None:
    assert accel.probe_hvf(lambda name: "1") == (True, "kern.hv_support is 1")
    ok, detail = accel.probe_hvf(lambda name: "0")
    assert not ok and "kern.hv_support is 0" in detail
    ok, detail = accel.probe_hvf(lambda name: None)
    assert not ok and "could not be read" in detail


# --------------------------------------------------------------------------- failure recognition

# Lines QEMU really prints when an accelerator gives up (collected from QEMU sources and bug reports).
ACCEL_FAILURES = [
    "KVM internal error. Suberror: 1\nextra data[0]: 0x0000000000000001\nemulation failure",
    "error: kvm run failed Bad address",
    "qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied",
    "Could not access KVM kernel module: No such file or directory",
    "KVM: entry failed, hardware error 0x80000021",
    "WHPX: Failed to setup partition, hr=c0350005",
    "WHPX: Failed to emulate MMIO access with EmulatorReturnStatus: 2",
    "WHPX: Unexpected VP exit code 4",
    "WHPX: No accelerator found, hr=00000000",
    "whpx: injection failed, MSI (0, 0) delivery: 0, dest_mode: 0, trigger mode: 0, vector: 0, lost (c0350005)",
    "qemu-system-x86_64: -accel hvf: Error: HV_UNSUPPORTED",
    "Error: HV_ERROR",
    "HVF: unhandled exit",
    "Failed to open the hax module",
    "HAX is not working and emulator runs in emulation mode",
    "qemu-system-x86_64: -accel nosuch: invalid accelerator nosuch",
]

NOT_ACCEL_FAILURES = [
    "",
    "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]",
    "qemu-system-x86_64: -drive file=disk.qcow2: Could not open 'disk.qcow2': No such file or directory",
    "qemu: could not load PC BIOS 'bios-256k.bin'",
    "qemu-system-x86_64: terminating on signal 15 from pid 1234",
    "qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory",
]


@pytest.mark.parametrize("text", ACCEL_FAILURES)
def test_is_accel_failure_true(text: str) -> None:
    assert accel.is_accel_failure(text)


@pytest.mark.parametrize("text", NOT_ACCEL_FAILURES)
def test_is_accel_failure_false(text: str) -> None:
    assert not accel.is_accel_failure(text)


def test_accel_failure_line_picks_the_line() -> None:
    text = "qemu-system-x86_64: warning: host doesn't support pni\nKVM internal error. Suberror: 1\nRAX=0"
    assert accel.accel_failure_line(text) == "KVM internal error. Suberror: 1"


def test_quote_strips_program_name() -> None:
    binary = Path("/usr/bin/qemu-system-x86_64")
    stderr = ("qemu-system-x86_64: warning: x\n"
              "qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied\n")
    assert accel._quote(stderr, binary) == "-accel kvm: failed to initialize kvm: Permission denied"
    assert accel._quote("qemu-system-x86_64: warning: x\n", binary, warnings=False) == ""
    assert accel._quote("qemu-system-x86_64: warning: x\n", binary) == "warning: x"


def test_next_rung() -> None:
    choice = AccelChoice(accel_args=[], chosen="whpx", ladder=["whpx", "whpx,kernel-irqchip=off", "tcg"])
    assert accel.next_rung(choice, "whpx") == "whpx,kernel-irqchip=off"
    assert accel.next_rung(choice, "whpx,kernel-irqchip=off") == "tcg"
    assert accel.next_rung(choice, "tcg") is None
    assert accel.next_rung(choice, "kvm") is None
    assert accel.next_rung(choice, "WHPX,kernel-irqchip=on") == "tcg"  # same accelerator, other options
    assert choice.args_from("whpx,kernel-irqchip=off") == [
        "-accel", "whpx,kernel-irqchip=off", "-accel", "tcg"]


# --------------------------------------------------------------------------- the choice, with a fake self-test


class FakeHost:
    """Replaces the boot id and the self-test; records which rungs were really tested."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, results: dict[str, AccelVerdict],
                 prechecks: dict[str, AccelVerdict] | None = None) -> None:
        self.results = results
        self.prechecks = prechecks or {}
        self.tested: list[str] = []
        self.boot = "linux:boot-1"
        monkeypatch.setattr(accel, "boot_identity", lambda host_os=None: self.boot)
        monkeypatch.setattr(accel, "_run_self_test", self._self_test)
        real_precheck = accel.host_precheck
        monkeypatch.setattr(accel, "host_precheck",
                            lambda name, host_os=None: self.prechecks.get(name) or
                            (AccelVerdict(name, True, f"{name}: ok") if name != "tcg"
                             else real_precheck(name, host_os)))

    def _self_test(self, binary: Path, rung: str, timeout: float,
                   extra: Any) -> tuple[AccelVerdict, bool]:
        self.tested.append(rung)
        return self.results[rung], True


KVM_DIED = AccelVerdict("kvm", False, "KVM: self-test guest died: KVM internal error. Suberror: 1", 2.7)
TCG_OK = AccelVerdict("tcg", True, "TCG: self-test passed in 0.09 s", 0.09)


@pytest.fixture
def qemu(tmp_path: Path) -> Path:
    binary = tmp_path / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir()
    binary.write_bytes(b"fake qemu")
    return binary


def test_auto_falls_back_to_tcg(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    host = FakeHost(monkeypatch, {"kvm": KVM_DIED, "tcg": TCG_OK})
    choice = accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, tmp_path / "cache", "linux")
    assert choice.chosen == "tcg"
    assert choice.ladder == ["tcg"]
    assert choice.accel_args == ["-accel", "tcg"]
    assert [v.name for v in choice.verdicts] == ["kvm", "tcg"]
    assert choice.summary.startswith("KVM: self-test guest died: KVM internal error")
    assert choice.summary.endswith("→ TCG, expect slow guests")
    assert host.tested == ["kvm", "tcg"]


def test_auto_prefers_working_kvm(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    kvm_ok = AccelVerdict("kvm", True, "KVM: self-test passed in 0.01 s", 0.01)
    FakeHost(monkeypatch, {"kvm": kvm_ok, "tcg": TCG_OK})
    choice = accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, tmp_path / "cache", "linux")
    assert choice.chosen == "kvm"
    assert choice.accel_args == ["-accel", "kvm", "-accel", "tcg"]
    assert choice.summary == "using KVM (self-test passed in 0.01 s)"
    assert accel.next_rung(choice, "kvm") == "tcg"


def test_cache_reused_then_invalidated_by_boot(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    host = FakeHost(monkeypatch, {"kvm": KVM_DIED, "tcg": TCG_OK})
    cache = tmp_path / "cache"
    first = accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, cache, "linux")
    assert host.tested == ["kvm", "tcg"]
    assert [p.name for p in cache.iterdir()] == ["accel.json"], "no temp file may be left behind"

    second = accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, cache, "linux")
    assert host.tested == ["kvm", "tcg"], "cached verdicts must not rerun QEMU"
    assert all(v.cached for v in second.verdicts)
    assert second.summary == first.summary and second.chosen == "tcg"

    host.boot = "linux:boot-2"
    accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, cache, "linux")
    assert host.tested == ["kvm", "tcg", "kvm", "tcg"]
    data = json.loads((cache / "accel.json").read_text())
    assert data["boot"] == "linux:boot-2"


def test_cache_invalidated_by_new_binary(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    host = FakeHost(monkeypatch, {"kvm": KVM_DIED, "tcg": TCG_OK})
    cache = tmp_path / "cache"
    accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, cache, "linux")
    qemu.write_bytes(b"an updated fake qemu")  # new size and mtime
    accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, cache, "linux")
    assert host.tested == ["kvm", "tcg", "kvm", "tcg"]
    # Same size, only a new mtime: still a different binary.
    stat = qemu.stat()
    os.utime(qemu, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, cache, "linux")
    assert len(host.tested) == 6
    # A second QEMU binary has its own verdicts, and the first one's survive.
    other = qemu.parent / "qemu-system-x86_64-other"
    shutil.copy(qemu, other)
    accel.choose_accelerator("auto", other, {"kvm", "tcg"}, cache, "linux")
    accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, cache, "linux")
    assert len(host.tested) == 8
    assert len(json.loads((cache / "accel.json").read_text())["qemu"]) == 2


def test_corrupt_or_unknown_cache_is_ignored(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    host = FakeHost(monkeypatch, {"kvm": KVM_DIED, "tcg": TCG_OK})
    cache = tmp_path / "cache"
    cache.mkdir()
    for junk in ("{not json", json.dumps([1, 2]), json.dumps({"format": 99, "boot": host.boot, "qemu": {}})):
        (cache / "accel.json").write_text(junk)
        accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, cache, "linux")
    assert host.tested == ["kvm", "tcg"] * 3
    assert json.loads((cache / "accel.json").read_text())["format"] == 1


def test_no_boot_id_means_no_cache(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    host = FakeHost(monkeypatch, {"kvm": KVM_DIED, "tcg": TCG_OK})
    monkeypatch.setattr(accel, "boot_identity", lambda host_os=None: None)
    for _ in range(2):
        accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, tmp_path / "cache", "linux")
    assert host.tested == ["kvm", "tcg"] * 2
    assert not (tmp_path / "cache" / "accel.json").exists()


def test_unwritable_cache_does_not_break_the_choice(monkeypatch: pytest.MonkeyPatch, qemu: Path,
                                                    tmp_path: Path) -> None:
    FakeHost(monkeypatch, {"kvm": KVM_DIED, "tcg": TCG_OK})
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    choice = accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, blocker / "cache", "linux")
    assert choice.chosen == "tcg"


def test_boot_time_ids_tolerate_clock_drift() -> None:
    assert accel._same_boot("boottime:1700000040", "boottime:1700000100")
    assert not accel._same_boot("boottime:1700000000", "boottime:1700003600")
    assert accel._same_boot("linux:abc", "linux:abc")
    assert not accel._same_boot("linux:abc", "linux:abd")
    assert not accel._same_boot(None, None)


def test_linux_boot_identity() -> None:
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    if not boot_id.exists():
        pytest.skip("no /proc boot_id on this host")
    assert accel.boot_identity("linux") == "linux:" + boot_id.read_text().strip()


def test_tcg_failure_is_loud_but_kept_and_not_cached(monkeypatch: pytest.MonkeyPatch, qemu: Path,
                                                     tmp_path: Path) -> None:
    tcg_hung = AccelVerdict("tcg", False, "TCG: guest hung (no result in 3 s)", 3.0)
    host = FakeHost(monkeypatch, {"kvm": KVM_DIED, "tcg": tcg_hung})
    choice = accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, tmp_path / "cache", "linux")
    assert choice.chosen == "tcg" and choice.ladder == ["tcg"]
    assert "WARNING: TCG failed its own self-test (guest hung (no result in 3 s))" in choice.summary
    accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, tmp_path / "cache", "linux")
    assert host.tested == ["kvm", "tcg", "tcg"], "a failed TCG run is retried, KVM's verdict is cached"


def test_windows_ladder_second_rung(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    FakeHost(monkeypatch, {
        "whpx": AccelVerdict("whpx", False, "WHPX: self-test guest died: WHPX: Unexpected VP exit code 4", 0.3),
        "whpx,kernel-irqchip=off": AccelVerdict("whpx,kernel-irqchip=off", True,
                                                "WHPX (kernel-irqchip=off): self-test passed in 0.40 s", 0.4),
        "tcg": TCG_OK,
    })
    choice = accel.choose_accelerator("auto", qemu, {"whpx", "tcg"}, tmp_path / "cache", "windows")
    assert choice.chosen == "whpx,kernel-irqchip=off"
    assert choice.ladder == ["whpx,kernel-irqchip=off", "tcg"]
    assert choice.accel_args == ["-accel", "whpx,kernel-irqchip=off", "-accel", "tcg"]
    assert choice.summary == ("WHPX: self-test guest died: WHPX: Unexpected VP exit code 4 → "
                              "WHPX (kernel-irqchip=off) (self-test passed in 0.40 s)")


def test_accel_missing_from_qemu_is_not_tested(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    host = FakeHost(monkeypatch, {"tcg": TCG_OK})
    choice = accel.choose_accelerator("auto", qemu, {"tcg"}, tmp_path / "cache", "linux")
    assert host.tested == ["tcg"]
    assert choice.verdicts[0].reason == (
        "KVM: not built into this QEMU (qemu-system-x86_64 -accel help does not list it)")


def test_failed_precheck_skips_self_test(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    denied = AccelVerdict("kvm", False, "KVM: /dev/kvm is not writable by this user (...)")
    host = FakeHost(monkeypatch, {"tcg": TCG_OK}, prechecks={"kvm": denied})
    choice = accel.choose_accelerator("auto", qemu, {"kvm", "tcg"}, tmp_path / "cache", "linux")
    assert host.tested == ["tcg"]
    assert choice.summary == "KVM: /dev/kvm is not writable by this user (...) → TCG, expect slow guests"


def test_explicit_preference_failure_explains(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    FakeHost(monkeypatch, {"kvm": KVM_DIED, "tcg": TCG_OK})
    with pytest.raises(ValidationError) as caught:
        accel.choose_accelerator("kvm", qemu, {"kvm", "tcg"}, tmp_path / "cache", "linux")
    message = str(caught.value)
    assert "Accelerator 'kvm' cannot be used on this host" in message
    assert "KVM internal error. Suberror: 1" in message
    assert "Choose 'auto'" in message and "'tcg'" in message
    assert caught.value.field == "accel"
    assert isinstance(caught.value, ThalunixError)


def test_explicit_preference_on_wrong_os(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    monkeypatch.setattr(accel, "boot_identity", lambda host_os=None: "linux:x")
    with pytest.raises(ValidationError, match=r"HVF: HVF only exists on macOS hosts.*Choose 'auto'"):
        accel.choose_accelerator("hvf", qemu, {"kvm", "tcg"}, tmp_path / "cache", "linux")
    FakeHost(monkeypatch, {})  # host prechecks pass: the QEMU listing decides
    with pytest.raises(ValidationError, match=r"WHPX: not built into this QEMU"):
        accel.choose_accelerator("whpx", qemu, {"kvm", "tcg"}, tmp_path / "cache", "windows")


def test_explicit_preferences_that_work(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    kvm_ok = AccelVerdict("kvm", True, "KVM: self-test passed in 0.01 s", 0.01)
    host = FakeHost(monkeypatch, {"kvm": kvm_ok, "tcg": TCG_OK})
    choice = accel.choose_accelerator("KVM", qemu, {"kvm", "tcg"}, tmp_path / "cache", "linux")
    assert choice.ladder == ["kvm"] and choice.accel_args == ["-accel", "kvm"]
    choice = accel.choose_accelerator("tcg", qemu, {"kvm", "tcg"}, tmp_path / "cache", "linux")
    assert choice.chosen == "tcg" and choice.accel_args == ["-accel", "tcg"]
    assert "as requested" in choice.summary
    assert host.tested == ["kvm", "tcg"]


def test_unknown_preference_and_missing_binary(tmp_path: Path, qemu: Path) -> None:
    with pytest.raises(ValidationError, match="not known: choose one of auto, kvm"):
        accel.choose_accelerator("xen", qemu, {"tcg"}, tmp_path, "linux")
    with pytest.raises(RuntimeMissingError, match="does not exist"):
        accel.choose_accelerator("auto", tmp_path / "nope" / "qemu-system-x86_64", {"tcg"}, tmp_path, "linux")


def test_nothing_usable_raises(monkeypatch: pytest.MonkeyPatch, qemu: Path, tmp_path: Path) -> None:
    FakeHost(monkeypatch, {"kvm": KVM_DIED})
    with pytest.raises(RuntimeMissingError, match="TCG: not built into this QEMU"):
        accel.choose_accelerator("auto", qemu, {"kvm"}, tmp_path / "cache", "linux")


# --------------------------------------------------------------------------- the built-in guest


def test_selftest_image_shape() -> None:
    image = selftest.SELFTEST_IMAGE
    assert len(image) == 512
    assert image[-2:] == b"\x55\xaa"
    assert b"TLX:R\0" in image
    assert selftest.QEMU_STATUS_OK == 67


def test_selftest_image_matches_source() -> None:
    nasm = shutil.which("nasm")
    if nasm is None:
        pytest.skip("nasm is not installed: cannot reassemble thalunix/selftest/selftest.asm")
    source = Path(selftest.__file__).with_name("selftest.asm")
    out = subprocess.run([nasm, "-f", "bin", "-o", "/dev/stdout", str(source)], capture_output=True, check=True)
    assert out.stdout == selftest.SELFTEST_IMAGE, "stale image: run `python -m thalunix.selftest`"


def test_stage_reached() -> None:
    assert "x87" in selftest.stage_reached("TLX:RL")
    assert "never reached" in selftest.stage_reached("")
    assert "never reached" in selftest.stage_reached("SeaBIOS noise")
    assert "debug-exit" in selftest.stage_reached("TLX:RLFSOK\r\n")


def test_runs_no_qemu_for_non_x86_binary(tmp_path: Path) -> None:
    verdict = accel.self_test(tmp_path / "qemu-system-aarch64", "hvf")
    assert verdict.usable and "self-test skipped" in verdict.reason
