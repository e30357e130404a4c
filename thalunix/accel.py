"""Pick the QEMU accelerator that really works on this host: a ladder, cheap checks, a real self-test.

A host can *claim* hardware acceleration and still be unable to run guests: ``/dev/kvm``
may open fine while the KVM behind it is a paravirtual backend that dies on the first
x87 instruction, WHPX may be switched on but broken by another hypervisor. So each
candidate rung of the host's ladder goes through three filters:

1. the QEMU binary must list it (``qemu -accel help``, passed in by the caller);
2. :func:`host_precheck`: cheap host checks (device node, DLL, sysctl);
3. :func:`self_test`: boot the built-in 512-byte guest (:mod:`thalunix.selftest`) under
   that accelerator with a hard timeout; it goes through real mode, long mode, x87 and
   SSE and reports through QEMU's ``isa-debug-exit`` device.

Self-test verdicts are cached per (QEMU binary, host boot) in ``cache_dir/accel.json``,
so only the first VM start after a reboot or a QEMU update pays for them (~0.1-0.5 s).
TCG is always the last rung and never dropped for failing its self-test (there is
nothing below it), but such a failure is shouted in the summary.

Example::

    from thalunix.accel import choose_accelerator, is_accel_failure, next_rung

    choice = choose_accelerator("auto", Path("/usr/bin/qemu-system-x86_64"),
                                qemu_accels={"kvm", "tcg"}, cache_dir=data / "cache")
    argv += choice.accel_args            # ["-accel", "tcg"]
    print(choice.summary)   # "KVM: self-test guest died: KVM internal error. ... → TCG, expect slow guests"
    # later, if QEMU dies and is_accel_failure(stderr): restart with next_rung(choice, rung)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from thalunix import selftest
from thalunix.errors import RuntimeMissingError, ValidationError

log = logging.getLogger(__name__)

#: What a VM's ``accel`` setting may say.
PREFERENCES: tuple[str, ...] = ("auto", "kvm", "whpx", "hvf", "haxm", "tcg")
#: Seconds the self-test guest gets; it needs ~0.1 s under TCG, milliseconds under KVM.
DEFAULT_TIMEOUT = 3.0
#: Name of the verdict cache inside ``cache_dir``.
CACHE_FILE = "accel.json"
_CACHE_FORMAT = 1
# Boot identities derived from a clock (Windows, BSD/macOS) drift by a few seconds
# when the wall clock is adjusted; within this slack they still name the same boot.
_BOOT_TIME_SLACK_S = 120

_DISPLAY = {"kvm": "KVM", "whpx": "WHPX", "hvf": "HVF", "haxm": "HAXM", "tcg": "TCG"}

#: A probe answers (ok, detail); injectable so the Windows/macOS paths are testable anywhere.
Probe = Callable[[], tuple[bool, str]]


@dataclass(frozen=True)
class AccelVerdict:
    """What was learnt about one rung: can VMs use it, and why (or why not)."""

    name: str  # "kvm", "whpx", "whpx,kernel-irqchip=off", "tcg", ...
    usable: bool
    reason: str  # "KVM: /dev/kvm is not writable by this user (...)"
    #: How long the self-test took, when one ran (None for prechecks).
    seconds: float | None = None
    #: True when this verdict came from the cache instead of a fresh QEMU run.
    cached: bool = False


@dataclass(frozen=True)
class AccelChoice:
    """The outcome of :func:`choose_accelerator`."""

    accel_args: list[str]  # ["-accel", "tcg"]
    chosen: str  # first usable rung
    ladder: list[str]  # usable rungs, best first
    verdicts: list[AccelVerdict] = field(default_factory=list)  # every candidate examined
    summary: str = ""  # one line for logs and the UI

    def args_from(self, rung: str) -> list[str]:
        """The ``-accel`` arguments for ``rung`` and the usable rungs after it (for a restart)."""
        if rung not in self.ladder:
            return accel_argv([rung])
        return accel_argv(self.ladder[self.ladder.index(rung):])


# --------------------------------------------------------------------------- naming

def normalize_host_os(host_os: str | None = None) -> str:
    """Map ``platform.system()`` / ``sys.platform`` spellings to linux, windows, darwin or other."""
    raw = (host_os if host_os is not None else platform.system()).strip().lower()
    if raw.startswith("linux"):
        return "linux"
    if raw.startswith("win") or raw in ("cygwin", "msys"):
        return "windows"
    if raw in ("darwin", "macos", "mac", "osx"):
        return "darwin"
    return "other"


def base_name(rung: str) -> str:
    """``"whpx,kernel-irqchip=off"`` -> ``"whpx"``."""
    return rung.split(",", 1)[0].strip().lower()


def display_name(rung: str) -> str:
    """``"whpx,kernel-irqchip=off"`` -> ``"WHPX (kernel-irqchip=off)"``."""
    base = base_name(rung)
    options = rung.split(",", 1)[1] if "," in rung else ""
    name = _DISPLAY.get(base, base.upper())
    return f"{name} ({options})" if options else name


def accel_argv(rungs: Iterable[str]) -> list[str]:
    """``["kvm", "tcg"]`` -> ``["-accel", "kvm", "-accel", "tcg"]`` (QEMU tries them in order)."""
    argv: list[str] = []
    for rung in rungs:
        argv += ["-accel", rung]
    return argv


def ladder_for_host(host_os: str, qemu_accels: set[str] | None = None) -> list[str]:
    """The rungs worth trying on ``host_os``, best first; TCG is always last.

    HAXM (discontinued by Intel, dropped from QEMU 8.2) is added only when
    ``qemu_accels`` shows this QEMU still has it.

    Example::

        ladder_for_host("windows")   # ["whpx", "whpx,kernel-irqchip=off", "tcg"]
    """
    host = normalize_host_os(host_os)
    haxm = ["haxm"] if qemu_accels and "haxm" in qemu_accels else []
    if host == "linux":
        return ["kvm", "tcg"]
    if host == "windows":
        # kernel-irqchip=off trades speed for working around WHPX's in-kernel APIC bugs.
        return ["whpx", "whpx,kernel-irqchip=off", *haxm, "tcg"]
    if host == "darwin":
        return ["hvf", *haxm, "tcg"]
    return ["tcg"]


def list_qemu_accels(qemu_binary: Path, timeout: float = 10.0) -> set[str]:
    """What ``qemu -accel help`` lists (empty set if QEMU cannot be asked)."""
    try:
        out = subprocess.run(
            [str(qemu_binary), "-accel", "help"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            errors="replace", creationflags=_NO_WINDOW,
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("could not ask %s for its accelerators: %s", qemu_binary, error)
        return set()
    names = set()
    for line in out.splitlines():
        word = line.strip()
        if word and ":" not in word and " " not in word:
            names.add(word.lower())
    return names


# --------------------------------------------------------------------------- prechecks

def host_precheck(
    name: str,
    host_os: str | None = None,
    *,
    kvm_device: Path = Path("/dev/kvm"),
    whpx_probe: Probe | None = None,
    hvf_probe: Probe | None = None,
    haxm_probe: Probe | None = None,
) -> AccelVerdict:
    """Cheap host-side checks for one rung (no QEMU run). The probes are injectable for tests.

    Example::

        host_precheck("kvm")   # AccelVerdict("kvm", False, "KVM: /dev/kvm is not writable by this user (...)")
    """
    host = normalize_host_os(host_os)
    base = base_name(name)
    label = display_name(name)

    def verdict(ok: bool, why: str) -> AccelVerdict:
        return AccelVerdict(name, ok, f"{label}: {why}")

    if base == "tcg":
        return verdict(True, "always available (slow: no hardware acceleration)")
    if base == "kvm":
        if host != "linux":
            return verdict(False, "KVM only exists on Linux hosts")
        return _precheck_kvm(name, label, kvm_device)
    if base == "whpx":
        if host != "windows":
            return verdict(False, "WHPX only exists on Windows hosts")
        ok, detail = (whpx_probe or probe_whpx)()
        return verdict(ok, detail)
    if base == "hvf":
        if host != "darwin":
            return verdict(False, "HVF only exists on macOS hosts")
        ok, detail = (hvf_probe or probe_hvf)()
        return verdict(ok, detail)
    if base == "haxm":
        if host not in ("windows", "darwin"):
            return verdict(False, "HAXM only exists on Windows and macOS hosts")
        ok, detail = (haxm_probe or (lambda: probe_haxm(host)))()
        return verdict(ok, detail)
    return verdict(False, f"unknown accelerator (choose one of {', '.join(PREFERENCES)})")


def _precheck_kvm(name: str, label: str, device: Path) -> AccelVerdict:
    if not os.path.exists(device):
        return AccelVerdict(name, False, (
            f"{label}: {device} does not exist (enable VT-x/AMD-V in the firmware settings "
            "and load the kvm_intel or kvm_amd module)"))
    try:
        fd = os.open(device, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        return AccelVerdict(name, False, (
            f"{label}: {device} is not writable by this user (add the user to the 'kvm' group "
            "and log in again)"))
    except OSError as error:
        return AccelVerdict(name, False, f"{label}: {device} cannot be opened: {error.strerror or error}")
    os.close(fd)
    return AccelVerdict(name, True, f"{label}: {device} is present and writable")


def probe_whpx(load_library: Callable[[str], Any] | None = None) -> tuple[bool, str]:
    """Ask Windows whether its hypervisor is running: ``WHvGetCapability(HypervisorPresent)``.

    ``load_library`` defaults to ``ctypes.WinDLL``; tests pass a fake.
    """
    loader = load_library or getattr(ctypes, "WinDLL", None)
    if loader is None:
        return False, "WinHvPlatform.dll cannot be loaded on this OS"
    try:
        dll = loader("WinHvPlatform.dll")
        get_capability = dll.WHvGetCapability
    except (OSError, AttributeError):
        return False, ("WinHvPlatform.dll cannot be loaded (turn on the Windows feature "
                       "'Windows Hypervisor Platform' and restart Windows)")
    get_capability.restype = ctypes.c_long  # HRESULT
    get_capability.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32,
                               ctypes.POINTER(ctypes.c_uint32)]
    # WHV_CAPABILITY is a union; 64 bytes covers every member, HypervisorPresent is a BOOL.
    buffer = (ctypes.c_ubyte * 64)()
    written = ctypes.c_uint32(0)
    whv_capability_code_hypervisor_present = 0
    try:
        hresult = int(get_capability(whv_capability_code_hypervisor_present, buffer,
                                     ctypes.sizeof(buffer), ctypes.byref(written)))
    except OSError as error:
        return False, f"WHvGetCapability could not be called: {error}"
    if hresult < 0:
        return False, f"WHvGetCapability failed (HRESULT 0x{hresult & 0xFFFFFFFF:08x})"
    if int.from_bytes(bytes(buffer[:4]), "little") == 0:
        return False, ("the Windows hypervisor is not running (turn on 'Windows Hypervisor Platform' "
                       "and virtualisation in the firmware settings, then restart)")
    return True, "the Windows Hypervisor Platform reports a running hypervisor"


def _sysctl(name: str) -> str | None:
    """``sysctl -n name`` or None; macOS/BSD only."""
    for exe in ("/usr/sbin/sysctl", "/sbin/sysctl", "sysctl"):
        try:
            result = subprocess.run([exe, "-n", name], capture_output=True, text=True, timeout=5,
                                    stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            continue
        return result.stdout.strip() if result.returncode == 0 else None
    return None


def probe_hvf(sysctl: Callable[[str], str | None] = _sysctl) -> tuple[bool, str]:
    """macOS Hypervisor.framework is usable when ``sysctl kern.hv_support`` is 1."""
    value = sysctl("kern.hv_support")
    if value is None:
        return False, "sysctl kern.hv_support could not be read"
    if value.strip() != "1":
        return False, f"kern.hv_support is {value.strip() or 'empty'} (this Mac or VM has no hardware virtualisation)"
    return True, "kern.hv_support is 1"


def probe_haxm(host_os: str) -> tuple[bool, str]:
    """HAXM shows up as a device: ``\\\\.\\HAX`` on Windows, ``/dev/HAX`` on macOS."""
    if normalize_host_os(host_os) == "windows":
        try:
            with open(r"\\.\HAX", "rb"):
                pass
        except OSError:
            return False, "the HAXM driver is not installed or not running (HAXM is discontinued: prefer WHPX)"
        return True, "the HAXM driver answers"
    if os.path.exists("/dev/HAX"):
        return True, "/dev/HAX is present"
    return False, "/dev/HAX does not exist (HAXM is discontinued: prefer HVF)"


# --------------------------------------------------------------------------- failure recognition

_ACCEL_FAILURE_PATTERNS: list[re.Pattern[str]] = [
    re.compile(p, flags)
    for p, flags in [
        (r"KVM internal error", re.I),
        (r"kvm run failed", re.I),
        (r"failed to initialize kvm", re.I),
        (r"Could not access KVM kernel module", re.I),
        (r"KVM: entry failed", re.I),
        (r"kvm_init_vcpu failed", re.I),
        (r"\bKVM_\w+ failed", re.I),
        (r"WHPX: (Failed|Unexpected|No accelerator)", re.I),
        (r"whpx: injection failed", re.I),
        (r"failed to initialize whpx", re.I),
        (r"\bHVF\b", 0),
        (r"\bhvf\b.*(error|fail|unhandled)", re.I),
        (r"\bHV_(ERROR|BUSY|BAD_ARGUMENT|NO_RESOURCES|NO_DEVICE|UNSUPPORTED|DENIED|ILLEGAL_GUEST_STATE)\b", 0),
        (r"\bHAX\b.*(not working|fail|error)", re.I),
        (r"Failed to open the hax", re.I),
        # QEMU aborting inside its accelerator code (kvm-pvm here: "kvm.c:3183: kvm_buf_set_msrs: Assertion").
        (r"target/\w+/(kvm|whpx|hvf|hax|nvmm)/\S+\.c:\d+:", re.I),
        (r"\b(kvm|whpx|hvf|hax)_\w+: Assertion", re.I),
        (r"invalid accelerator", re.I),
        (r"no accelerator found", re.I),
        (r"accelerator \S+ (is )?not (available|supported)", re.I),
    ]
]


def accel_failure_line(qemu_stderr: str) -> str | None:
    """The first line of QEMU's output that shows the accelerator failing, if any."""
    for line in qemu_stderr.splitlines():
        if any(p.search(line) for p in _ACCEL_FAILURE_PATTERNS):
            return line.strip()
    return None


def is_accel_failure(qemu_stderr: str) -> bool:
    """Did QEMU die (or stop) because of the accelerator? Then a restart on the next rung may help.

    Example::

        is_accel_failure("KVM internal error. Suberror: 1\\nemulation failure")   # True
        is_accel_failure("qemu-system-x86_64: -drive file=x: Could not open 'x'")  # False
    """
    return accel_failure_line(qemu_stderr) is not None


def next_rung(choice: AccelChoice, failed: str) -> str | None:
    """The usable rung after ``failed`` in ``choice.ladder``, or None when there is none.

    A ``failed`` name without options (``"whpx"``) matches its exact rung first, then
    the last rung of the same accelerator; a name not on the ladder gives None.
    """
    ladder = choice.ladder
    if failed in ladder:
        index = ladder.index(failed)
    else:
        same = [i for i, rung in enumerate(ladder) if base_name(rung) == base_name(failed)]
        if not same:
            return None
        index = same[-1]
    return ladder[index + 1] if index + 1 < len(ladder) else None


# --------------------------------------------------------------------------- self-test

_NO_WINDOW = 0x08000000 if sys.platform == "win32" else 0  # CREATE_NO_WINDOW
_NEW_GROUP = 0x00000200 if sys.platform == "win32" else 0  # CREATE_NEW_PROCESS_GROUP
_POLL_S = 0.01


def _launch(argv: list[str], stderr: Any) -> subprocess.Popen[bytes]:
    """Start QEMU in its own process group (a seam for tests that count launches)."""
    kwargs: dict[str, Any] = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = _NO_WINDOW | _NEW_GROUP
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr, **kwargs)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill QEMU and anything it started; it is in its own group/session."""
    try:
        if sys.platform != "win32":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("QEMU self-test process %s did not die after SIGKILL", proc.pid)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _quote(stderr: str, binary: Path, warnings: bool = True) -> str:
    """The one stderr line worth showing: an accelerator failure, else an error, else (if
    ``warnings``) the first warning; "" when there is nothing to show."""
    line = accel_failure_line(stderr)
    if line is None:
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "warning:" not in ln.lower()]
        line = (errors or (lines if warnings else []) or [""])[0]
    for prefix in (f"{binary}: ", f"{binary.name}: ", f"{binary.stem}: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
            break
    return line[:300]


def _qemu_path(path: Path) -> str:
    """Escape a path for a QEMU ``key=value,...`` option: commas are doubled."""
    return str(path).replace(",", ",,")


def _runs_x86_guests(binary: Path) -> bool:
    name = binary.name.lower()
    return "x86_64" in name or "i386" in name


def self_test(qemu_binary: Path, accel: str, timeout: float = DEFAULT_TIMEOUT,
              *, extra_args: Sequence[str] = ()) -> AccelVerdict:
    """Boot the built-in test guest under ``accel``; usable only if it reports success in time.

    ``extra_args`` go before the test's own options (e.g. ``["-L", firmware_dir]`` for a
    portable QEMU whose BIOS is not in its default place).

    Example::

        self_test(Path("/usr/bin/qemu-system-x86_64"), "tcg")
        # AccelVerdict("tcg", True, "TCG: self-test passed in 0.13 s", seconds=0.13)
    """
    return _run_self_test(Path(qemu_binary), accel, timeout, extra_args)[0]


def _run_self_test(binary: Path, accel: str, timeout: float,
                   extra_args: Sequence[str]) -> tuple[AccelVerdict, bool]:
    """The self-test plus whether its verdict may be cached (a QEMU that would not start may be fixed)."""
    label = display_name(accel)
    if not _runs_x86_guests(binary):
        # The test guest is an x86 boot sector; other system emulators cannot run it.
        return AccelVerdict(accel, True, f"{label}: self-test skipped ({binary.name} does not run x86 guests)"), False
    with tempfile.TemporaryDirectory(prefix="thalunix-accel-") as tmp:
        image = Path(tmp) / "selftest.img"
        image.write_bytes(selftest.SELFTEST_IMAGE)
        serial = Path(tmp) / "serial.txt"
        err_path = Path(tmp) / "stderr.txt"
        argv = [
            str(binary), *extra_args,
            "-no-user-config", "-nodefaults", "-display", "none", "-no-reboot",
            "-m", "16", "-machine", "pc", "-accel", accel,
            "-drive", f"format=raw,if=ide,file={_qemu_path(image)}",
            "-device", selftest.DEBUG_EXIT_DEVICE,
            "-serial", f"file:{serial}",
        ]
        started = time.monotonic()
        with open(err_path, "wb") as err_file:
            try:
                proc = _launch(argv, err_file)
            except OSError as error:
                return AccelVerdict(accel, False, f"{label}: QEMU could not be started ({binary}): {error}"), False
            outcome = "exited"
            try:
                deadline = started + timeout
                while proc.poll() is None:
                    if is_accel_failure(_read(err_path)):
                        # KVM pauses the VM on an internal error instead of exiting: do not wait for the timeout.
                        outcome = "died"
                        break
                    if time.monotonic() >= deadline:
                        outcome = "hung"
                        break
                    time.sleep(_POLL_S)
            finally:
                if proc.poll() is None:
                    _kill(proc)
        seconds = round(time.monotonic() - started, 3)
        stderr_text = _read(err_path)
        stage = selftest.stage_reached(_read(serial))
        rc = proc.returncode

    def fail(why: str) -> tuple[AccelVerdict, bool]:
        return AccelVerdict(accel, False, f"{label}: {why}", seconds=seconds), True

    quoted = _quote(stderr_text, binary)
    if outcome == "died":
        return fail(f"self-test guest died: {quoted}; it stopped {stage}")
    if outcome == "hung":
        errors = _quote(stderr_text, binary, warnings=False)
        said = f"; QEMU said: {errors}" if errors else ""
        return fail(f"guest hung (no result in {timeout:g} s); it stopped {stage}{said}")
    if rc == selftest.QEMU_STATUS_OK:
        return AccelVerdict(accel, True, f"{label}: self-test passed in {seconds:.2f} s", seconds=seconds), True
    if rc is not None and rc > 0 and rc & 1 and (rc >> 1) in selftest.EXIT_FAILURES:
        return fail(f"self-test guest reported: {selftest.EXIT_FAILURES[rc >> 1]}")
    if is_accel_failure(stderr_text):
        return fail(f"QEMU could not use the accelerator: {quoted}")
    if rc == 0:
        # -no-reboot turns a triple fault (an unhandled CPU exception) into a clean exit.
        return fail(f"self-test guest crashed (CPU reset or triple fault) {stage}")
    detail = f": {quoted}" if quoted else ""
    return fail(f"QEMU failed to run the self-test (exit status {rc}){detail}")


# --------------------------------------------------------------------------- cache

def qemu_identity(qemu_binary: Path) -> str | None:
    """``realpath|size|mtime_ns`` of the binary: a rebuilt or updated QEMU gets new verdicts."""
    try:
        real = os.path.realpath(qemu_binary)
        st = os.stat(real)
    except OSError:
        return None
    return f"{real}|{st.st_size}|{st.st_mtime_ns}"


def boot_identity(host_os: str | None = None) -> str | None:
    """A string naming the current host boot, or None when it cannot be known (then nothing is cached)."""
    host = normalize_host_os(host_os)
    if host == "linux":
        try:
            return "linux:" + Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None
    if host == "windows":
        try:
            tick = ctypes.windll.kernel32.GetTickCount64  # type: ignore[attr-defined]
            tick.restype = ctypes.c_uint64
            booted = time.time() - tick() / 1000.0
        except (AttributeError, OSError):
            return None
        return f"boottime:{int(round(booted / 60.0) * 60)}"
    text = _sysctl("kern.boottime")  # "{ sec = 1700000000, usec = 12345 } Mon Nov ..."
    match = re.search(r"sec\s*=\s*(\d+)", text or "")
    return f"boottime:{match.group(1)}" if match else None


def _same_boot(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    if a.startswith("boottime:") and b.startswith("boottime:"):
        try:
            return abs(int(a.split(":", 1)[1]) - int(b.split(":", 1)[1])) <= _BOOT_TIME_SLACK_S
        except ValueError:
            return False
    return a == b


class VerdictCache:
    """Self-test verdicts for the current boot, in ``cache_dir/accel.json``.

    File layout: ``{"format": 1, "boot": "<boot id>", "qemu": {"<identity>": {"<rung>":
    {"usable": bool, "reason": str, "seconds": float|null}}}}``. A different boot empties it.
    """

    def __init__(self, cache_dir: Path, qemu_binary: Path, host_os: str | None = None) -> None:
        self.path = Path(cache_dir) / CACHE_FILE
        self.boot = boot_identity(host_os)
        self.qemu = qemu_identity(qemu_binary)

    @property
    def enabled(self) -> bool:
        return self.boot is not None and self.qemu is not None

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
            return {}
        if not _same_boot(data.get("boot"), self.boot) or not isinstance(data.get("qemu"), dict):
            return {}
        return data

    def get(self, rung: str) -> AccelVerdict | None:
        if not self.enabled:
            return None
        entry = self._load().get("qemu", {}).get(self.qemu, {}).get(rung)
        if not isinstance(entry, dict) or not isinstance(entry.get("reason"), str):
            return None
        return AccelVerdict(rung, bool(entry.get("usable")), entry["reason"],
                            seconds=entry.get("seconds"), cached=True)

    def put(self, verdict: AccelVerdict) -> None:
        if self.boot is None or self.qemu is None:
            return
        data = self._load() or {"format": _CACHE_FORMAT, "boot": self.boot, "qemu": {}}
        data["boot"] = self.boot
        # An updated binary at the same path makes the old entry dead weight: drop it.
        real = self.qemu.rsplit("|", 2)[0]
        for key in [k for k in data["qemu"] if k != self.qemu and k.rsplit("|", 2)[0] == real]:
            del data["qemu"][key]
        data["qemu"].setdefault(self.qemu, {})[verdict.name] = {
            "usable": verdict.usable, "reason": verdict.reason, "seconds": verdict.seconds}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".accel-", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(data, handle, indent=1, sort_keys=True)
                # Readers see the old file or the new one, never a half-written one.
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as error:
            # A read-only data folder only costs a re-test next time; it must not stop the VM.
            log.warning("could not write the accelerator cache %s: %s", self.path, error)


# --------------------------------------------------------------------------- the choice

def choose_accelerator(
    preference: str,
    qemu_binary: Path,
    qemu_accels: set[str],
    cache_dir: Path,
    host_os: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    extra_args: Sequence[str] = (),
) -> AccelChoice:
    """Decide which accelerator(s) a VM starts with.

    ``preference`` is one of :data:`PREFERENCES` (an explicit rung with options such as
    ``"whpx,kernel-irqchip=off"`` is accepted too). ``qemu_accels`` is what ``qemu -accel
    help`` lists; an empty set means "unknown" and filters nothing. ``auto`` walks the host
    ladder; an explicit choice that cannot work raises :class:`ValidationError` saying why.

    Example::

        choice = choose_accelerator("auto", qemu, {"kvm", "tcg"}, cache_dir)
        choice.chosen, choice.accel_args     # ("tcg", ["-accel", "tcg"]) on a host with broken KVM
    """
    binary = Path(qemu_binary)
    wanted = (preference or "auto").strip().lower()
    if base_name(wanted) not in PREFERENCES:
        raise ValidationError(
            f"Accelerator '{preference}' is not known: choose one of {', '.join(PREFERENCES)}.",
            field="accel")
    if not binary.is_file():
        raise RuntimeMissingError(
            f"QEMU binary {binary} does not exist: install QEMU or point Thalunix at its runtime folder.")
    host = normalize_host_os(host_os)
    host_ladder = ladder_for_host(host, qemu_accels)
    if wanted == "auto":
        candidates = host_ladder
    elif "," in wanted:
        candidates = [wanted]
    else:
        candidates = [r for r in host_ladder if base_name(r) == wanted] or [wanted]

    cache = VerdictCache(cache_dir, binary, host)
    verdicts: list[AccelVerdict] = []
    tcg_self_test_failed: AccelVerdict | None = None
    for rung in candidates:
        verdict = _examine(rung, binary, qemu_accels, host, cache, timeout, extra_args)
        if base_name(rung) == "tcg" and not verdict.usable and verdict.seconds is not None:
            # Nothing is below TCG: keep it, but make the failure impossible to miss.
            tcg_self_test_failed = verdict
            verdict = replace(verdict, usable=True,
                              reason=f"{verdict.reason} (kept as the last resort)")
        verdicts.append(verdict)

    ladder = [v.name for v in verdicts if v.usable]
    if not ladder:
        reasons = "; ".join(v.reason for v in verdicts)
        if wanted != "auto":
            raise ValidationError(
                f"Accelerator '{preference}' cannot be used on this host: {reasons}. "
                "Choose 'auto' (Thalunix picks what works, down to TCG) or 'tcg'.",
                field="accel")
        raise RuntimeMissingError(
            f"No accelerator can run VMs with {binary}: {reasons}. "
            "Install a QEMU build that includes TCG or fix the accelerator named above.")
    chosen = ladder[0]
    return AccelChoice(
        accel_args=accel_argv(ladder), chosen=chosen, ladder=ladder, verdicts=verdicts,
        summary=_summary(wanted, chosen, verdicts, host_ladder, tcg_self_test_failed))


def _examine(rung: str, binary: Path, qemu_accels: set[str], host: str, cache: VerdictCache,
             timeout: float, extra_args: Sequence[str]) -> AccelVerdict:
    label = display_name(rung)
    # Prechecks are cheap and may change within a boot (user added to the kvm group): never cached.
    # They go first because "HVF only exists on macOS" explains more than "not in this QEMU".
    pre = host_precheck(rung, host)
    if not pre.usable:
        return pre
    if qemu_accels and base_name(rung) not in qemu_accels:
        return AccelVerdict(
            rung, False, f"{label}: not built into this QEMU ({binary.name} -accel help does not list it)")
    cached = cache.get(rung)
    if cached is not None:
        return cached
    verdict, cacheable = _run_self_test(binary, rung, timeout, extra_args)
    log.info("accelerator self-test: %s", verdict.reason)
    # A failed TCG run is re-tried next time: it is more likely a busy host than a broken TCG.
    if cacheable and (verdict.usable or base_name(rung) != "tcg"):
        cache.put(verdict)
    return verdict


def _short(verdict: AccelVerdict) -> str:
    """The verdict's reason without the leading "KVM: " label."""
    label = display_name(verdict.name) + ": "
    return verdict.reason[len(label):] if verdict.reason.startswith(label) else verdict.reason


def _summary(wanted: str, chosen: str, verdicts: list[AccelVerdict], host_ladder: list[str],
             tcg_failed: AccelVerdict | None) -> str:
    failed_before = []
    for verdict in verdicts:
        if verdict.name == chosen:
            break
        if not verdict.usable:
            failed_before.append(verdict.reason)
    head = "; ".join(failed_before)
    if base_name(chosen) == "tcg":
        if wanted == "tcg":
            target = "TCG as requested (no hardware acceleration, expect slow guests)"
        elif len(host_ladder) > 1:
            target = "TCG, expect slow guests"
        else:
            target = "TCG (no hardware accelerator on this kind of host), expect slow guests"
    else:
        passed = next(v for v in verdicts if v.name == chosen)
        target = f"{display_name(chosen)} ({_short(passed)})"
    line = f"{head} → {target}" if head else f"using {target}"
    if tcg_failed is not None:
        line += f" — WARNING: TCG failed its own self-test ({_short(tcg_failed)}): VMs may not start"
    return line
