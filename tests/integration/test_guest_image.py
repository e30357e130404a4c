"""The Debian-built test guest (tests/guest/build.py) really boots under raw QEMU.

BIOS (SeaBIOS) and UEFI (OVMF) from the hybrid ISO on a CD-ROM, and direct kernel boot with a
data disk: the guest reports THALUNIX-GUEST-READY on its serial port, answers a shell command
typed on that serial port, shows text on its VGA screen, and powers itself off (QEMU exits) on
QMP system_powerdown (ACPI power button). Nothing from thalunix/ is used: QEMU is driven raw.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ -> "guest" package
from guest.build import ensure_guest  # noqa: E402

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(1200)]

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

READY = b"THALUNIX-GUEST-READY"
POWEROFF = b"THALUNIX-GUEST-POWEROFF"
PROMPT = re.compile(rb"# ")


@pytest.fixture(scope="module")
def guest():
    return ensure_guest()


def _connect_unix(path: Path, proc: subprocess.Popen, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited early ({proc.returncode})")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"no QEMU socket at {path} after {timeout} s")
            time.sleep(0.02)


class Serial:
    """The guest's serial port through QEMU's UNIX socket chardev; all output is kept."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(0.2)
        self.buf = b""
        self.eof = False

    def _read(self) -> None:
        if self.eof:
            time.sleep(0.05)
            return
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        except OSError:
            data = b""
        if data:
            self.buf += data
        else:
            self.eof = True

    def expect(self, pattern: bytes | re.Pattern, timeout: float, start: int = 0) -> re.Match:
        """Wait for pattern in the output after offset start; return the match."""
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, start)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{rx.pattern!r} not seen on serial within {timeout} s; output tail:\n"
                    + self.buf[-3000:].decode(errors="replace")
                )
            self._read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.eof:
            self._read()


class QMP:
    """A minimal QMP client speaking raw JSON lines over a UNIX socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(30)
        self.file = sock.makefile("rb")
        greeting = self._recv()
        assert "QMP" in greeting, greeting
        assert self.execute("qmp_capabilities") == {}

    def _recv(self) -> dict:
        line = self.file.readline()
        if not line:
            raise AssertionError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._recv()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise AssertionError(f"QMP {command}: {reply['error']}")
            # else an asynchronous event: skip it

    def close(self):
        self.file.close()
        self.sock.close()


class VM:
    def __init__(self, tmp_path: Path, boot_args: list[str]):
        self.dir = tmp_path
        self.serial_path = tmp_path / "serial.sock"
        self.qmp_path = tmp_path / "qmp.sock"
        self.serial_log = tmp_path / "serial.log"
        assert len(str(self.serial_path)) < 100, "UNIX socket path too long"
        cmd = [
            QEMU, "-accel", "tcg", "-machine", "q35", "-m", "256", "-nodefaults",
            "-display", "none", "-vga", "std",
            "-chardev", f"socket,id=ser0,path={self.serial_path},server=on,wait=off,"
                        f"logfile={self.serial_log}",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *boot_args,
        ]
        self.stderr = open(tmp_path / "qemu.stderr", "w+b")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=subprocess.STDOUT)
        self.serial = Serial(_connect_unix(self.serial_path, self.proc, 30))
        self.qmp = QMP(_connect_unix(self.qmp_path, self.proc, 30))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.qmp.close()
        self.serial.sock.close()
        self.stderr.close()


@pytest.fixture
def vm_factory(tmp_path):
    vms = []

    def start(boot_args):
        vm = VM(tmp_path, boot_args)
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.stop()


def _ink(ppm: Path) -> float:
    """Share of the screen's pixels that differ from its background (most common colour)."""
    data = ppm.read_bytes()
    m = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", data)
    assert m, f"not a PPM: {data[:20]!r}"
    w, h = int(m.group(1)), int(m.group(2))
    pixels = data[m.end():]
    assert len(pixels) == w * h * 3
    counts = Counter(pixels[i:i + 3] for i in range(0, len(pixels), 3))
    return 1 - counts.most_common(1)[0][1] / (w * h)


def _screendump(vm: VM, name: str) -> Path:
    path = vm.dir / name
    vm.qmp.execute("screendump", filename=str(path))
    return path


def _shell(serial: Serial, command: bytes, expected: re.Pattern, timeout: float = 60) -> None:
    """Type a command at the guest's serial shell and wait for its output after the echo."""
    mark = len(serial.buf)
    serial.send(command + b"\n")
    serial.expect(expected, timeout, mark)


def _exercise(vm: VM, label: str, ready_timeout: float, check=None) -> float:
    """READY, a shell command, text on the screen, then power button -> QEMU exits."""
    serial = vm.serial
    ready = serial.expect(READY, ready_timeout)
    boot_s = time.monotonic() - vm.started
    print(f"\n{label}: THALUNIX-GUEST-READY after {boot_s:.1f} s")
    (vm.dir / "boot-seconds.txt").write_text(f"{label} {boot_s:.2f}\n")

    serial.expect(PROMPT, 60, ready.end())
    _shell(serial, b"echo $((6*7))", re.compile(rb"\n42\r?\n"))
    if check:
        check(serial)

    # The VGA screen shows the kernel's console (console=tty0): a screenshot is not blank, and
    # clearing tty0 from inside the guest changes it (a screen left over from the firmware or
    # grub, e.g. grub booting Linux "in blind mode" under UEFI, would not change).
    ink = _ink(_screendump(vm, "screen.ppm"))
    assert ink > 0.005, f"the guest's VGA screen is blank ({ink:.4f} of it is not background)"
    _shell(serial, b"printf '\\033[H\\033[2J' > /dev/tty0; echo cleared-$((1+1))",
           re.compile(rb"\ncleared-2\r?\n"))
    deadline = time.monotonic() + 30
    while (cleared := _ink(_screendump(vm, "screen-cleared.ppm"))) > ink / 4:
        assert time.monotonic() < deadline, (
            f"clearing tty0 did not clear the VGA screen ({ink:.4f} -> {cleared:.4f} ink): "
            "the screen does not show the kernel's console"
        )
        serial.drain(0.2)

    mark = len(serial.buf)
    vm.qmp.execute("system_powerdown")
    t0 = time.monotonic()
    try:
        rc = vm.proc.wait(30)
    except subprocess.TimeoutExpired:
        serial.drain(0.5)
        raise AssertionError(
            "QEMU still running 30 s after system_powerdown; serial tail:\n"
            + serial.buf[-2000:].decode(errors="replace")
        )
    print(f"{label}: QEMU exited {time.monotonic() - t0:.1f} s after system_powerdown")
    serial.drain(1)  # pick up what is left in the socket
    log = vm.serial_log.read_bytes()
    assert POWEROFF in serial.buf[mark:] or POWEROFF in log, log[-2000:].decode(errors="replace")
    assert rc == 0, f"QEMU exit status {rc}: {(vm.dir / 'qemu.stderr').read_text()}"
    return boot_s


def test_iso_boots_under_seabios(guest, vm_factory):
    vm = vm_factory(["-cdrom", str(guest.iso)])
    _exercise(vm, "BIOS ISO", 180)


def test_iso_boots_under_ovmf(guest, vm_factory, tmp_path):
    assert OVMF_CODE.exists(), "Debian package ovmf is missing"
    vars_copy = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    vm = vm_factory([
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={vars_copy}",
        "-cdrom", str(guest.iso),
    ])
    _exercise(vm, "UEFI ISO", 420)


def _data_disk(tmp_path: Path, fs: str, content: str) -> Path:
    src = tmp_path / "data"
    src.mkdir()
    (src / "marker.txt").write_text(content + "\n")
    disk = tmp_path / "data.img"
    if fs == "ext4":
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "THALUNIXDATA", "-d", str(src),
                        str(disk), "8M"], check=True)
    else:  # FAT labels hold at most 11 characters
        subprocess.run(["mkfs.vfat", "-n", "THALUNIXDAT", "-C", str(disk), "8192"], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["mcopy", "-i", str(disk), str(src / "marker.txt"), "::/marker.txt"],
                       check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    return disk


@pytest.mark.parametrize(
    "fs,disk_args",
    [
        ("ext4", ["-device", "virtio-blk-pci,drive=d0"]),  # /dev/vda
        ("vfat", ["-device", "virtio-scsi-pci", "-device", "scsi-hd,drive=d0"]),  # /dev/sda
    ],
)
def test_direct_kernel_boot_mounts_data_disk(guest, vm_factory, tmp_path, fs, disk_args):
    token = uuid.uuid4().hex
    disk = _data_disk(tmp_path, fs, token)
    vm = vm_factory([
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.cmdline,
        "-drive", f"file={disk},format=raw,if=none,id=d0", *disk_args,
    ])
    dev = b"/dev/vda" if fs == "ext4" else b"/dev/sda"
    expected = re.compile(
        rb"\n" + token.encode() + rb"\r?\nthalunix-guest\r?\n" + dev + rb" /mnt/data " + fs.encode()
    )
    _exercise(vm, f"direct kernel ({fs})", 120, check=lambda serial: _shell(
        serial, b"cat /mnt/data/marker.txt; hostname; grep /mnt/data /proc/mounts", expected))


def test_thalunix_run_parameter(guest, vm_factory):
    vm = vm_factory([
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", guest.cmdline + ' "thalunix.run=echo run-$((3*5)); false"',
    ])
    vm.serial.expect(re.compile(rb"\nrun-15\r?\nTHALUNIX-RUN-EXIT=1\r?\n"), 120)
    _exercise(vm, "direct kernel (thalunix.run)", 120)
