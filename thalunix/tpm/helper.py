"""The swtpm helper micro-VM: a tiny Linux (built by ``helper-vm/build.py``) whose swtpm listens on TCP.

Hosts without a native swtpm still get a TPM: QEMU runs the helper (``microvm``,
user networking restricted to two forwards on 127.0.0.1, no other way out), its TPM
state lives on a small raw disk formatted by the guest (ext4, synchronous mount), and
:class:`HelperVM` reports it ready once a TPM2 command is answered through the
forwarded data port. The two host ports are consecutive (data, data+1) because
tpm2-tss's swtpm TCTI assumes so.

Example::

    image = HelperImage.load(runtime.helper_vm)
    helper = HelperVM(runtime.qemu, image, Path("vms/1f/tpm/helper-state.img"), log=print)
    helper.start()                    # → helper.data_port, helper.ctrl_port
    ...                               # TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=<data_port>
    helper.stop()                     # CMD_SHUTDOWN: swtpm exits, the guest syncs and powers off
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from thalunix.tpm import protocol as p
from thalunix.tpm.errors import HelperImageError, PortInUseError, TpmError

STATE_DISK_BYTES = 4 << 20
READY_TIMEOUT = 60.0
#: TCG's translation cache: QEMU's default (1 GiB, touched as it fills) would be most of the helper's RSS;
#: the helper's small kernel and swtpm run in 16 MiB as fast as in 32 (8 costs ~0.5 s a boot).
TCG_TB_MIB = 16
STOP_TIMEOUT = 15.0
HOST = "127.0.0.1"
_HOSTFWD_FAILED = re.compile(r"Could not set up host forwarding rule")
_verified: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class HelperImage:
    """A built helper image: kernel, initramfs, read-only root disk and what the manifest says about them."""

    folder: Path
    kernel: Path
    initrd: Path
    cmdline: str
    ram_mib: int
    guest_data_port: int
    guest_ctrl_port: int
    rootfs: Path | None = None

    @classmethod
    def load(cls, folder: Path | None, verify: bool = True) -> "HelperImage":
        """Read and check an image folder; raise :class:`HelperImageError` saying how to get a good one."""
        rebuild = "rebuild it with `python3 helper-vm/build.py` (or reinstall the portable Thalunix build)"
        if folder is None:
            raise HelperImageError(f"the swtpm helper VM image was not found (no bundled runtime image and no "
                                   f"build in the checkout's .cache/helper-vm); {rebuild}")
        manifest_path = Path(folder) / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = manifest["files"]
            image = cls(folder=Path(folder), kernel=Path(folder) / manifest["kernel"],
                        initrd=Path(folder) / manifest["initrd"], cmdline=str(manifest["cmdline"]),
                        ram_mib=int(manifest.get("ram_mib", 96)),
                        guest_data_port=int(manifest["guest_ports"]["data"]),
                        guest_ctrl_port=int(manifest["guest_ports"]["ctrl"]),
                        rootfs=Path(folder) / manifest["rootfs"] if manifest.get("rootfs") else None)
        except FileNotFoundError:
            raise HelperImageError(f"the swtpm helper VM image in {folder} has no manifest.json; {rebuild}") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise HelperImageError(f"the swtpm helper VM manifest {manifest_path} is unreadable ({error}); "
                                   f"{rebuild}") from None
        for name in [image.kernel.name, image.initrd.name] + ([image.rootfs.name] if image.rootfs else []):
            if name not in files:
                raise HelperImageError(f"the helper manifest {manifest_path} does not list {name}; {rebuild}")
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:
                raise HelperImageError(f"the swtpm helper VM file {path} is missing; {rebuild}") from None
            if stat.st_size != files[name]["size"]:
                raise HelperImageError(f"the swtpm helper VM file {path} is damaged ({stat.st_size} bytes, "
                                       f"expected {files[name]['size']}); {rebuild}")
            if verify:
                key = (str(path), stat.st_size, stat.st_mtime_ns)
                if key not in _verified:
                    digest = hashlib.sha256()
                    with open(path, "rb") as handle:
                        for chunk in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(chunk)
                    _verified[key] = digest.hexdigest()
                if _verified[key] != files[name]["sha256"]:
                    raise HelperImageError(f"the swtpm helper VM file {path} is damaged (its sha256 does not match "
                                           f"the manifest); {rebuild}")
        return image


def free_port_pair(avoid: set[int] = frozenset()) -> tuple[int, int]:  # type: ignore[assignment]
    """Two consecutive free loopback ports (P, P+1), as tpm2-tss's swtpm TCTI expects."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
            if port + 1 > 65535 or port in avoid:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind((HOST, port + 1))
                except OSError:
                    continue
            return port, port + 1
    raise TpmError("no two consecutive free TCP ports on 127.0.0.1 for the TPM helper; free some ports")


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def host_tsc_khz() -> int:
    """The host's TSC rate, given to the guest so it skips calibration (which hangs under load with microvm)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 0
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)
    return int(float(match.group(1)) * 1000) if match else 0


try:
    # Looked up now, in the parent: between fork and exec the child must not load anything.
    _prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the process that started the helper dies, so no helper is orphaned."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class HelperVM:
    """One helper micro-VM: started, watched, stopped. Not thread-safe; one owner drives it."""

    def __init__(self, qemu: Path, image: HelperImage, state_disk: Path,
                 log: Callable[[str], None] = lambda line: None, *, accel: str = "tcg",
                 ram_mib: int | None = None, ports: tuple[int, int] | None = None,
                 machines: list[str] | None = None, data_dir: str = "", log_file: Path | None = None,
                 ready_timeout: float = READY_TIMEOUT, name: str = "TPM helper") -> None:
        self.qemu = qemu
        self.image = image
        self.state_disk = Path(state_disk)
        self.log = log
        self.accel = accel
        self.ram_mib = ram_mib or image.ram_mib
        self.fixed_ports = ports
        self.machines = machines or []
        self.data_dir = data_dir
        self.log_file = log_file
        self.ready_timeout = ready_timeout
        self.name = name
        self.data_port = 0
        self.ctrl_port = 0
        self.proc: subprocess.Popen | None = None
        self.lines: deque[str] = deque(maxlen=200)
        self.guest_error = ""
        self.started_at = 0.0
        self.ready_seconds = 0.0
        self._reader: threading.Thread | None = None
        self._guest_net_up = False
        self._log_handle: IO[str] | None = None

    # -- argv -----------------------------------------------------------------------------------------
    def argv(self) -> list[str]:
        img = self.image
        cmdline = img.cmdline
        kvm = self.accel.split(",")[0] in ("kvm", "hvf", "whpx")
        khz = host_tsc_khz()
        if khz and not kvm:
            # The TSC rate skips calibration (which hangs under load with microvm); "reliable" keeps the
            # clocksource watchdog from dropping the TSC for jiffies when TCG's timing wobbles.
            cmdline += f" tsc_early_khz={khz} tsc=reliable"
        microvm = not self.machines or "microvm" in self.machines
        suffix = "device" if microvm else "pci"
        argv = [str(self.qemu)] + (["-L", self.data_dir] if self.data_dir else [])
        argv += ["-name", "thalunix-tpm-helper", "-nodefaults", "-no-user-config", "-display", "none",
                 "-no-reboot", "-M", "microvm" if microvm else "q35",
                 # Under TCG a plain CPU boots ~8% faster than "max"; RDRAND spares the kernel an entropy wait.
                 "-accel", self.accel if kvm else f"tcg,tb-size={TCG_TB_MIB}",
                 "-cpu", "host" if kvm else "qemu64,+rdrand",
                 "-m", str(self.ram_mib), "-smp", "1",
                 "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", cmdline,
                 "-netdev", (f"user,id=n0,restrict=on,ipv6=off,"
                             f"hostfwd=tcp:{HOST}:{self.data_port}-:{img.guest_data_port},"
                             f"hostfwd=tcp:{HOST}:{self.ctrl_port}-:{img.guest_ctrl_port}"),
                 "-device", f"virtio-net-{suffix},netdev=n0",
                 "-blockdev", json.dumps({"driver": "raw", "node-name": "state",
                                          "file": {"driver": "file", "filename": str(self.state_disk)}}),
                 "-device", f"virtio-blk-{suffix},drive=state",
                 *(["-blockdev", json.dumps({"driver": "raw", "node-name": "root", "read-only": True,
                                             "file": {"driver": "file", "filename": str(img.rootfs),
                                                      "read-only": True}}),
                    "-device", f"virtio-blk-{suffix},drive=root"] if img.rootfs else []),
                 "-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0"]
        return argv

    # -- start ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Boot the helper and return once swtpm answers; raise :class:`TpmError` and leave nothing running."""
        self._prepare_disk()
        if self.fixed_ports:
            for port in self.fixed_ports:
                if not port_free(port):
                    raise PortInUseError(f"{self.name}: TCP port {port} on {HOST} is already in use; choose "
                                         "other ports or stop the program using it")
        attempts = 1 if self.fixed_ports else 3
        for attempt in range(attempts):
            self.data_port, self.ctrl_port = self.fixed_ports or free_port_pair()
            try:
                self._start_once()
                return
            except PortInUseError:
                if attempt == attempts - 1:
                    raise
                self.log(f"ports {self.data_port}/{self.ctrl_port} were taken meanwhile; trying others")

    def _prepare_disk(self) -> None:
        try:
            self.state_disk.parent.mkdir(parents=True, exist_ok=True)
            if not self.state_disk.exists():
                with open(self.state_disk, "wb") as handle:
                    handle.truncate(STATE_DISK_BYTES)   # sparse zeros: the guest formats it on first boot
        except OSError as error:
            raise TpmError(f"{self.name}: cannot create the TPM state disk {self.state_disk}: "
                           f"{error.strerror or error}") from None
        size = self.state_disk.stat().st_size
        if size < 1 << 20:
            raise TpmError(f"{self.name}: the TPM state disk {self.state_disk} is only {size} bytes; it is damaged. "
                           "Move it away to start with a new, empty TPM")

    def _start_once(self) -> None:
        self.guest_error = ""
        self._guest_net_up = False
        self.lines.clear()
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "a", encoding="utf-8", errors="replace")
        self.started_at = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, close_fds=True,
                                         preexec_fn=_die_with_parent if _prctl is not None else None)
        except OSError as error:
            raise TpmError(f"{self.name}: cannot run {self.qemu}: {error}") from None
        self._reader = threading.Thread(target=self._read_console, name="tpm-helper-console", daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        self.ready_seconds = time.monotonic() - self.started_at
        self.log(f"{self.name} ready on {HOST}:{self.data_port} (control {self.ctrl_port}) "
                 f"after {self.ready_seconds:.2f} s")

    def _read_console(self) -> None:
        assert self.proc and self.proc.stdout
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                continue
            self.lines.append(line)
            if line.startswith("THALUNIX-HELPER-ERROR:"):
                self.guest_error = line.split(":", 1)[1].strip()
            if self._log_handle:
                with contextlib.suppress(OSError, ValueError):
                    self._log_handle.write(line + "\n")
                    self._log_handle.flush()
            self.log(line)

    def _wait_ready(self) -> None:
        """Poll with a real TPM2 command: user networking accepts connections before the guest listens."""
        assert self.proc
        deadline = self.started_at + self.ready_timeout
        while True:
            code = self.proc.poll()
            if code is not None or self.guest_error:
                if self._reader:
                    self._reader.join(2)
                raise self._failure(code)
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise TpmError(f"{self.name} did not answer a TPM command within {self.ready_timeout:.0f} s "
                               f"(last console line: {self.lines[-1] if self.lines else 'none'!r}); see "
                               f"{self.log_file or 'its console'}. The image may be damaged: rebuild it with "
                               "`python3 helper-vm/build.py`")
            time.sleep(0.02)

    def _answers(self) -> bool:
        """One readiness probe. User networking accepts at once and then connects to the guest: before the
        guest's network is up nothing comes back (short timeout, probe again); once it is up, a closed port
        ends the connection at once, and a listening swtpm gets the time it needs to answer."""
        try:
            with socket.create_connection((HOST, self.data_port), timeout=0.2) as sock:
                sock.settimeout(2.0 if self._guest_net_up else 0.08)
                response = p.tpm_command(sock, p.TPM2_GET_RANDOM_8)
            return p.tpm_response_code(response) in (0, p.TPM_RC_INITIALIZE)
        except p.ProtocolError:
            self._guest_net_up = True   # the guest refused: its stack is up, swtpm not yet
            return False
        except OSError:
            return False

    def _failure(self, code: int | None) -> TpmError:
        text = "\n".join(self.lines)
        if self.guest_error:
            return TpmError(f"{self.name} failed: {self.guest_error} (state disk {self.state_disk})")
        if _HOSTFWD_FAILED.search(text):
            return PortInUseError(f"{self.name}: QEMU could not listen on {HOST}:{self.data_port}/{self.ctrl_port} "
                                  "(port in use?); choose other ports or stop the program using them")
        if 'Failed to get "write" lock' in text:
            return TpmError(f"{self.name}: the TPM state disk {self.state_disk} is in use by another helper; stop "
                            "the VM using it first")
        last = [line for line in self.lines if "qemu" in line.lower()] or list(self.lines)
        return TpmError(f"{self.name} exited (code {code}) before answering: {last[-1] if last else 'no output'}; "
                        f"see {self.log_file or 'its console'}")

    # -- stop -----------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Clean stop: CMD_SHUTDOWN to swtpm, the guest syncs and powers off. Returns False if it had to kill."""
        if not self.running:
            self._finish()
            return True
        try:
            with socket.create_connection((HOST, self.ctrl_port), timeout=2) as ctrl:
                ctrl.settimeout(5)
                p.ctrl_request(ctrl, p.CMD_SHUTDOWN)
        except OSError as error:
            self.log(f"{self.name}: no answer to SHUTDOWN ({error}); stopping it hard")
            self.kill()
            return False
        assert self.proc
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.log(f"{self.name} did not power off in {timeout:.0f} s; killing it")
            self.kill()
            return False
        self._finish()
        return True

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._finish()

    def _finish(self) -> None:
        if self._reader:
            self._reader.join(2)
        if self._log_handle:
            with contextlib.suppress(OSError):
                self._log_handle.close()
            self._log_handle = None
