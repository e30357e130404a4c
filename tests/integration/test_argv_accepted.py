"""Property test: every valid VM config renders to an argv the real QEMU accepts.

Hypothesis draws valid VMConfigs (machine, firmware, disks on every bus and format, CD-ROMs, boot
orders, NICs with forwards, display, VGA, serial, tablet, sometimes a TPM); each example gets real
files (qcow2 from ``qemu-img``, raw/ISO by truncate, a per-VM OVMF variable store), UNIX sockets in a
short folder, free host ports, and paths with commas and spaces half of the time. QEMU is started
paused (``-S``, TCG: this host's KVM is broken) and must answer ``query-status`` with ``prelaunch``
over QMP, then exit 0 on ``quit`` without one ``qemu-system-x86_64:`` line on stderr.

``derandomize=True`` and no example database keep the examples the same on every run. "native"
displays need an X server: an ``Xvfb`` is started when installed, otherwise they are not drawn.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from thalunix.errors import ValidationError  # noqa: E402
from thalunix.model import (BOOT_DEVICES, CDROM_BUSES, DISK_BUSES, FIRMWARES, MACHINES,  # noqa: E402
                            NIC_MODELS, NIC_MODES, OS_HINTS, VGA_MODELS, CDRom, Disk, Display, HostLimits, Nic,
                            PortForward, VMConfig, validate)
from thalunix.qemu.argv import Endpoint, LaunchPlan, build_argv  # noqa: E402
from thalunix.runtime import Capabilities, probe_capabilities  # noqa: E402

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
SWTPM = shutil.which("swtpm")
XVFB = shutil.which("Xvfb")
OVMF = Path("/usr/share/OVMF")
FIRMWARE = {"uefi": (OVMF / "OVMF_CODE_4M.fd", OVMF / "OVMF_VARS_4M.fd"),
            "uefi-secure": (OVMF / "OVMF_CODE_4M.secboot.fd", OVMF / "OVMF_VARS_4M.ms.fd")}
HOST = HostLimits(cpus=2, ram_mib=4096)
TIMEOUT = 30.0  # seconds for QEMU to come up / answer / exit, with both host CPUs busy

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not (QEMU and QEMU_IMG), reason="needs qemu-system-x86_64 and qemu-img "
                                                       "(apt-get install qemu-system-x86 qemu-utils)"),
    pytest.mark.skipif(not all(p.is_file() for pair in FIRMWARE.values() for p in pair),
                       reason="needs OVMF 4M firmware (apt-get install ovmf)"),
]


# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def caps() -> Capabilities:
    return probe_capabilities(Path(QEMU))


@pytest.fixture(scope="module")
def x_display() -> Iterator[str]:
    """An X display for QEMU's own (GTK) window: a private Xvfb, else the session's, else none."""
    if not XVFB:
        yield os.environ.get("DISPLAY", "")
        return
    read_end, write_end = os.pipe()
    xvfb = subprocess.Popen([XVFB, "-displayfd", str(write_end), "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                            pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    try:
        with os.fdopen(read_end) as pipe:
            number = pipe.readline().strip()
        assert number, "Xvfb did not report its display number"
        yield f":{number}"
    finally:
        xvfb.terminate()
        xvfb.wait(10)


# --- the strategy -------------------------------------------------------------------------------------------

@st.composite
def vm_configs(draw: st.DrawFn, native_display: bool) -> tuple[VMConfig, dict]:
    """A valid VMConfig, plus the launch choices (endpoint kinds, odd paths, TPM) that go with it."""
    firmware = draw(st.sampled_from(FIRMWARES))
    machine = "q35" if firmware == "uefi-secure" else draw(st.sampled_from(MACHINES))  # Secure Boot needs q35
    disks = []
    for index in range(draw(st.integers(0, 3))):
        fmt = draw(st.sampled_from(("qcow2", "raw")))
        disks.append(Disk(path=f"d{index}.{'qcow2' if fmt == 'qcow2' else 'img'}", format=fmt,
                          bus=draw(st.sampled_from(DISK_BUSES)), readonly=draw(st.integers(0, 4)) == 0))
    cdroms = [CDRom(path=draw(st.sampled_from(("", f"cd{index}.iso"))), bus=draw(st.sampled_from(CDROM_BUSES)))
              for index in range(draw(st.integers(0, 2)))]
    boot_order = draw(st.permutations(BOOT_DEVICES))[:draw(st.integers(1, len(BOOT_DEVICES)))]
    nics = []
    placeholder = 40000  # distinct host ports; the real free ports are picked at launch time
    for index in range(draw(st.integers(0, 2))):
        # Bridged cards need a host bridge or TAP set up by an administrator (tests/net checks their errors).
        mode = draw(st.sampled_from([m for m in NIC_MODES if m != "bridge"]))
        forwards = []
        if mode in ("user", "restricted"):
            for _ in range(draw(st.integers(0, 2))):
                placeholder += 1
                forwards.append(PortForward(draw(st.sampled_from(("tcp", "udp"))), placeholder,
                                            draw(st.integers(1, 65535)),
                                            draw(st.sampled_from(("127.0.0.1", "0.0.0.0")))))
        nics.append(Nic(mode=mode, model=draw(st.sampled_from(NIC_MODELS)), mac=f"52:54:00:12:34:{index:02x}",
                        forwards=forwards, network="lab" if mode == "private" else ""))
    kinds = ("vnc", "native", "none") if native_display else ("vnc", "none")
    config = VMConfig(
        name=draw(st.sampled_from(("prop", "my vm", "a.b_c-d"))), os=draw(st.sampled_from(OS_HINTS)),
        cpus=draw(st.integers(1, 2)), ram_mib=draw(st.integers(64, 512)), machine=machine, firmware=firmware,
        disks=disks, cdroms=cdroms, boot_order=list(boot_order), nics=nics,
        display=Display(draw(st.sampled_from(kinds)), draw(st.sampled_from(VGA_MODELS))),
        serial=draw(st.booleans()), usb_tablet=draw(st.booleans()), accel="tcg", tpm="off")
    config.set_defaults()
    validate(config, HOST)
    launch = {
        "odd_paths": draw(st.booleans()),          # commas and spaces in every file and socket name
        "qmp_tcp": draw(st.booleans()),            # Windows-style TCP endpoints for QMP and serial
        "vnc_tcp": draw(st.booleans()),
        "websocket": draw(st.booleans()),
        "vars_format": draw(st.sampled_from(("qcow2", "raw"))),
        "data_dir": draw(st.booleans()),           # -L /usr/share/qemu, as a bundled runtime passes its own
        "tpm": bool(SWTPM) and draw(st.integers(0, 3)) == 0,
    }
    return config, launch


# --- helpers ------------------------------------------------------------------------------------------------

def _free_ports(specs: list[tuple[str, str]]) -> list[int]:
    """One free port per (protocol, address); all held open until every one is picked, so they differ."""
    held = []
    try:
        for protocol, address in specs:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM)
            sock.bind((address, 0))
            held.append(sock)
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def _connect(endpoint: Endpoint, proc: subprocess.Popen, stderr_path: Path) -> socket.socket:
    deadline = time.monotonic() + TIMEOUT
    while True:
        if endpoint.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: object = endpoint.path
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (endpoint.host, endpoint.port)
        try:
            sock.connect(address)
            sock.settimeout(TIMEOUT)
            return sock
        except OSError:
            sock.close()
        if proc.poll() is not None:
            pytest.fail(f"QEMU exited with {proc.returncode} before QMP answered:\n{stderr_path.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"QMP did not come up in {TIMEOUT} s:\n{stderr_path.read_text()}")
        time.sleep(0.02)


class _QMP:
    """Just enough QMP: one JSON object per line; events are skipped."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rwb")
        greeting = self._read()
        assert "QMP" in greeting, greeting

    def _read(self) -> dict:
        line = self.file.readline()
        assert line, "QMP closed the connection"
        return json.loads(line)

    def execute(self, command: str) -> object:
        self.file.write(json.dumps({"execute": command}).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            assert "return" in reply, f"{command}: {reply}"
            return reply["return"]


@contextlib.contextmanager
def _swtpm(state_dir: Path, ctrl: Path) -> Iterator[None]:
    proc = subprocess.Popen([SWTPM, "socket", "--tpm2", "--tpmstate", f"dir={state_dir}",
                             "--ctrl", f"type=unixio,path={ctrl}", "--terminate"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ctrl.exists():
            assert proc.poll() is None, "swtpm exited at start"
            assert time.monotonic() < deadline, "swtpm did not create its control socket"
            time.sleep(0.01)
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _prepare(config: VMConfig, launch: dict, work: Path, socks: Path) -> LaunchPlan:
    """Create every file the config names and allocate sockets and ports, as the runner would."""
    odd = (lambda name: f"x {name.replace('.', ',.', 1)}") if launch["odd_paths"] else (lambda name: name)
    paths = {}
    for disk in config.disks:
        target = work / odd(disk.path)
        if disk.format == "qcow2":
            _run(QEMU_IMG, "create", "-q", "-f", "qcow2", str(target), "64M")
        else:
            with open(target, "wb") as file:
                file.truncate(64 << 20)
        paths[disk.path] = str(target)
    for cdrom in config.cdroms:
        if cdrom.path:
            target = work / odd(cdrom.path)
            with open(target, "wb") as file:
                file.truncate(1 << 20)
            paths[cdrom.path] = str(target)
    code = vars_path = ""
    if config.firmware in FIRMWARE:
        code_file, vars_template = FIRMWARE[config.firmware]
        code = str(code_file)
        vars_path = str(work / odd(f"efivars.{launch['vars_format']}"))
        if launch["vars_format"] == "qcow2":
            _run(QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", str(vars_template), vars_path)
        else:
            shutil.copyfile(vars_template, vars_path)
    # Real free ports for the forwards (the strategy only made them distinct).
    forwards = [fw for nic in config.nics for fw in nic.forwards]
    for forward, port in zip(forwards, _free_ports([(fw.protocol, fw.host_address) for fw in forwards])):
        forward.host_port = port
    private = [index for index, nic in enumerate(config.nics) if nic.mode == "private"]
    udp_ports = iter(_free_ports([("udp", "127.0.0.1")] * 2 * len(private)))
    links = tuple((index, next(udp_ports), next(udp_ports)) for index in private)
    tcp_ports = iter(_free_ports([("tcp", "127.0.0.1")] * 4))
    if launch["qmp_tcp"]:
        qmp, serial = Endpoint.tcp(next(tcp_ports)), Endpoint.tcp(next(tcp_ports))
    else:
        qmp, serial = Endpoint.unix(str(socks / odd("qmp.sock"))), Endpoint.unix(str(socks / odd("serial.sock")))
    vnc = None
    if config.display.kind == "vnc":
        vnc = Endpoint.tcp(next(tcp_ports)) if launch["vnc_tcp"] else Endpoint.unix(str(socks / odd("vnc.sock")))
    return LaunchPlan(
        qemu=QEMU, qmp=qmp, serial=serial if config.serial else None,
        serial_log=str(work / odd("serial.log")), paths=paths, accel_args=("-accel", "tcg"), accel="tcg",
        firmware_code=code, firmware_vars=vars_path, firmware_vars_format=launch["vars_format"],
        data_dir="/usr/share/qemu" if launch["data_dir"] else "", vnc=vnc,
        vnc_websocket_port=next(tcp_ports) if vnc and launch["websocket"] else 0,
        tpm_socket=str(socks / "tpm.sock") if launch["tpm"] else "", private_links=links,
        agent=Endpoint.unix(str(socks / odd("qga.sock"))))


def _launch_paused(config: VMConfig, plan: LaunchPlan, argv: list[str], work: Path, display: str) -> None:
    stderr_path = work / "qemu.stderr"
    env = dict(os.environ, DISPLAY=display)
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(argv + ["-S"], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env,
                                start_new_session=True)
    try:
        try:
            qmp = _QMP(_connect(plan.qmp, proc, stderr_path))
            assert qmp.execute("qmp_capabilities") == {}
            status = qmp.execute("query-status")
        except (OSError, AssertionError) as error:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            pytest.fail(f"QMP failed ({error!r}); QEMU exit code {proc.poll()}:\n{stderr_path.read_text()}")
        assert status["status"] == "prelaunch", status
        # What the argv promised is there: the serial log, the VNC socket, the host forwards.
        if plan.serial:
            assert Path(plan.serial_log).exists()
        if plan.vnc and plan.vnc.kind == "unix":
            assert Path(plan.vnc.path).exists()
        for nic in config.nics:
            for forward in nic.forwards:
                kind = socket.SOCK_STREAM if forward.protocol == "tcp" else socket.SOCK_DGRAM
                with socket.socket(socket.AF_INET, kind) as probe, pytest.raises(OSError):
                    probe.bind((forward.host_address, forward.host_port))  # QEMU holds it
        try:
            qmp.execute("quit")
        except (ConnectionResetError, AssertionError) as error:
            # QEMU may close the socket before its reply to quit gets out; the exit code decides.
            if "closed" not in str(error) and not isinstance(error, ConnectionResetError):
                raise
        code = proc.wait(TIMEOUT)
        output = stderr_path.read_text(errors="replace")
        assert code == 0, f"QEMU exited with {code}:\n{output}"
        errors = [line for line in output.splitlines() if "qemu-system-x86_64:" in line]
        assert not errors, "\n".join(errors)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# --- the test -----------------------------------------------------------------------------------------------

def test_qemu_accepts_every_valid_config(caps: Capabilities, x_display: str) -> None:
    stats: Counter[str] = Counter()
    started = time.monotonic()

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(vm_configs(native_display=bool(x_display)))
    def check(example: tuple[VMConfig, dict]) -> None:
        config, launch = example
        work = Path(tempfile.mkdtemp(prefix="thalunix-argv-"))
        socks = Path(tempfile.mkdtemp(dir="/tmp", prefix="ta"))  # sun_path holds 107 bytes
        try:
            plan = _prepare(config, launch, work, socks)
            try:
                argv = build_argv(config, caps, plan)
            except ValidationError as error:
                # The only legitimate refusals of a valid config: more drives than the controllers hold, and
                # a read-only IDE/SATA hard disk (QEMU's ide-hd cannot be read-only).
                assert (error.field == "disks" and ("SATA" in str(error) or "IDE" in str(error))
                        or re.fullmatch(r"disks\[\d\]\.readonly", error.field or "")), error
                stats["rejected"] += 1
                assume(False)
            stats["accepted"] += 1
            note(f"config: {json.dumps(config.to_dict())}\nlaunch: {launch}\nargv: {argv}")
            stats.update([f"machine:{config.machine}", f"firmware:{config.firmware}", f"display:{config.display.kind}",
                          f"vga:{config.display.vga}", f"serial:{config.serial}", f"tablet:{config.usb_tablet}",
                          f"boot:{config.boot_order[0]}", f"disks:{len(config.disks)}", f"cdroms:{len(config.cdroms)}",
                          f"nics:{len(config.nics)}", *(f"launch:{k}" for k, v in launch.items() if v is True),
                          *(f"bus:{d.bus}/{d.format}" for d in config.disks), *(f"cd:{c.bus}" for c in config.cdroms),
                          *(f"nic:{n.model}/{n.mode}" for n in config.nics),
                          *(f"fwd:{f.protocol}/{f.host_address}" for n in config.nics for f in n.forwards)])
            (socks / "tpm-state").mkdir()
            with _swtpm(socks / "tpm-state", socks / "tpm.sock") if launch["tpm"] else contextlib.nullcontext():
                _launch_paused(config, plan, argv, work, x_display)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(socks, ignore_errors=True)

    check()
    elapsed = time.monotonic() - started
    print(f"\nargv accepted by QEMU in {elapsed:.1f} s: {dict(sorted(stats.items()))}")
    total = stats["accepted"] + stats["rejected"]
    assert stats["accepted"] >= 20 and stats["accepted"] >= 0.7 * total, stats
