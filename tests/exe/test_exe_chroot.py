"""The Linux exe where nothing else is: a minimal Debian (debootstrap minbase: no QEMU, no Python) entered with
chroot. It reports its bundled runtime, boots the real test guest headless through the CLI, writes nothing outside
its own folder, and its VMs still start after the whole folder moved elsewhere."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from exe.conftest import Chroot, wait_for_bytes

# The first run builds the exe and the debootstrap tree (minutes); later runs reuse both.
pytestmark = [pytest.mark.exe, pytest.mark.qemu, pytest.mark.timeout(2400)]

GUEST_ARGS = ("--ram", "256M", "--cpus", "1", "--firmware", "bios", "--tpm", "off")


def put_stick(chroot: Chroot, exe: Path, guest, stick: str) -> tuple[str, str]:
    """The exe and an ISO inside its data folder, as on a USB stick; returns (exe path, iso path) inside."""
    chroot.install(exe, f"{stick}/thalunix")
    iso = f"{stick}/thalunix-data/isos/guest.iso"
    chroot.install(guest.iso, iso)
    return f"{stick}/thalunix", iso


def boot_and_stop(chroot: Chroot, binary: str, name: str, data_inside: str) -> None:
    """`vm start`, the guest's serial marker (in the log QEMU itself writes), `vm stop` with its power-off marker."""
    config = json.loads(chroot.run(binary, "vm", "show", name, "--json").stdout)
    serial = chroot.path(f"{data_inside}/vms/{config['id']}/logs/serial.log")
    offset = serial.stat().st_size if serial.exists() else 0   # QEMU appends: this boot's part starts here
    started = chroot.run(binary, "vm", "start", name, timeout=300)
    assert "is running (accelerator tcg" in started.stdout, started.stdout + started.stderr
    shown = json.loads(chroot.run(binary, "vm", "show", name, "--json").stdout)
    assert wait_for_bytes(serial, b"THALUNIX-GUEST-READY", 180, offset), serial.read_bytes()[offset:][-2000:]
    # The shell prompt comes after READY: by then the guest's acpid (forked just before READY) listens for the
    # power button; a press in between is lost and the stop would end in a forced quit.
    assert wait_for_bytes(serial, b"thalunix-guest:/# ", 60, offset)
    assert shown["state"] == "running"
    stopped = chroot.run(binary, "vm", "stop", name, "--timeout", "120", timeout=300)
    assert stopped.stdout.strip() == f"VM '{name}' is stopped", stopped.stdout + stopped.stderr
    assert b"THALUNIX-GUEST-POWEROFF" in serial.read_bytes()[offset:]


class Watch:
    """inotify over the whole chroot (but /proc, /dev, /sys): every path something created, changed or removed.

    Events go to a file, not a pipe: PyInstaller's unpack alone fills a pipe, and a blocked inotifywait loses
    events when the kernel's queue overflows."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        excluded = f"^{re.escape(str(root))}/(proc|dev|sys)(/|$)"
        with open(log, "w") as sink:
            self.proc = subprocess.Popen(["inotifywait", "-m", "-r", "--format", "%e %w%f", "--exclude", excluded,
                                          "-e", "create,modify,attrib,close_write,moved_to,moved_from,delete",
                                          str(root)], stdout=sink, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:   # the watches are set on every folder first; then it says so
            if "Watches established" in line:
                break
        else:
            pytest.fail("inotifywait did not start")

    def stop(self) -> list[tuple[str, str]]:
        time.sleep(0.5)   # let the last events arrive
        self.proc.terminate()
        _, errors = self.proc.communicate(timeout=30)
        assert "overflow" not in errors.lower(), errors
        events = []
        for line in self.log.read_text().splitlines():
            kinds, _, path = line.partition(" ")
            assert "Q_OVERFLOW" not in kinds, "inotify lost events"
            events.append((kinds, "/" + str(Path(path).relative_to(self.root))))
        return events


def test_bare_debian_runs_the_exe_and_writes_only_its_folder(exe: Path, chroot: Chroot, guest, tmp_path: Path) -> None:
    stick = "/media/stick"
    binary, iso = put_stick(chroot, exe, guest, stick)
    data = f"{stick}/thalunix-data"
    watch = Watch(chroot.root, tmp_path / "inotify.log")
    try:
        doctor = chroot.run(binary, "doctor", timeout=300).stdout
        assert re.search(rf"QEMU: 7\.\d+\.\d+ at {data}/runtime/[0-9a-f]{{64}}/bin/qemu-system-x86_64 \(bundled\)",
                         doctor), doctor
        assert f"Bundled runtime: {data}/runtime/" in doctor and "Accelerator: tcg" in doctor
        assert re.search(r"qemu-img: \S+/bin/qemu-img\s+swtpm: \S+/bin/swtpm", doctor), doctor
        assert re.search(rf"UEFI firmware: {data}/runtime/\S+/OVMF_CODE_4M.fd", doctor), doctor
        licences = chroot.run(binary, "doctor", "--licences").stdout
        assert "qemu-system-x86 1:7.2" in licences and "https://snapshot.debian.org/package/qemu/" in licences
        assert re.search(r"inside the exe: waitress \S+ \(ZPL", licences) and "helper VM: busybox-static" in licences
        sources = chroot.path(re.search(r"Sources: (\S+)", licences).group(1)).read_text()
        assert "| ovmf |" in sources and "| swtpm |" in sources and "Python 3." in sources
        created = chroot.run(binary, "vm", "create", "bare", "--iso", iso, *GUEST_ARGS)
        assert "bare" in created.stdout
        boot_and_stop(chroot, binary, "bare", data)
    finally:
        events = watch.stop()
    assert events, "the watch saw nothing: it would prove nothing"
    mei = [path for _, path in events if re.match(r"/tmp/_MEI\w+(/|$)", path)]
    inside = [path for _, path in events if path.startswith(data + "/")]
    outside = sorted({f"{kinds} {path}" for kinds, path in events
                      if not path.startswith(data + "/") and path not in mei})
    assert inside and outside == [], "\n".join(outside)
    # PyInstaller's own unpack folder (its bootloader, before any Thalunix code runs) is removed at each exit.
    assert mei and not list(chroot.path("/tmp").glob("_MEI*"))
    runtime = chroot.path(f"{data}/runtime")
    assert len([p for p in runtime.iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name)]) == 1


def test_moved_folder_still_starts_its_vms(exe: Path, chroot: Chroot, guest) -> None:
    binary, iso = put_stick(chroot, exe, guest, "/mnt/usb-a/Thalunix")
    chroot.run(binary, "vm", "create", "mover", "--iso", iso, *GUEST_ARGS, "--disk", "64M")
    boot_and_stop(chroot, binary, "mover", "/mnt/usb-a/Thalunix/thalunix-data")
    runtime_before = sorted(p.name for p in chroot.path("/mnt/usb-a/Thalunix/thalunix-data/runtime").iterdir())

    # Another mount point, another folder name: what a stick gets on another machine.
    chroot.path("/srv/elsewhere").mkdir(parents=True)
    shutil.move(str(chroot.path("/mnt/usb-a/Thalunix")), str(chroot.path("/srv/elsewhere/Moved Stick")))
    assert not chroot.path("/mnt/usb-a/Thalunix").exists()
    moved = "/srv/elsewhere/Moved Stick"
    config = json.loads(next(chroot.path(f"{moved}/thalunix-data/vms").glob("*/vm.json")).read_text())
    assert "usb-a" not in json.dumps(config)   # every stored path is relative to the data folder
    shown = json.loads(chroot.run(f"{moved}/thalunix", "vm", "show", "mover", "--json").stdout)
    assert shown["state"] == "stopped"
    boot_and_stop(chroot, f"{moved}/thalunix", "mover", f"{moved}/thalunix-data")
    doctor = chroot.run(f"{moved}/thalunix", "doctor").stdout
    assert "QEMU: 7." in doctor and f"at {moved}/thalunix-data/runtime/" in doctor
    # The runtime unpacked at the old place is reused as it is: it moved with the folder.
    assert sorted(p.name for p in chroot.path(f"{moved}/thalunix-data/runtime").iterdir()) == runtime_before


@pytest.mark.parametrize("tpm", ["native", "helper"])
def test_uefi_and_tpm_from_the_bundle(exe: Path, chroot: Chroot, guest, tpm: str) -> None:
    """OVMF, swtpm (native) and the TPM helper VM all come from the unpacked runtime: the bare Debian has none."""
    stick = f"/media/tpm-{tpm}"
    binary, iso = put_stick(chroot, exe, guest, stick)
    data = f"{stick}/thalunix-data"
    chroot.run(binary, "vm", "create", "secure", "--iso", iso, "--ram", "256M", "--cpus", "1", "--firmware", "uefi",
               "--tpm", tpm)
    boot_and_stop(chroot, binary, "secure", data)
    vm = next(chroot.path(f"{data}/vms").iterdir())
    argv = next(line for line in (vm / "logs" / "qemu.log").read_text().splitlines() if line.startswith("=== argv"))
    assert re.search(rf"{data}/runtime/[0-9a-f]{{64}}/share/OVMF/OVMF_CODE_4M\.fd", argv), argv
    assert "-tpmdev emulator" in argv
    events = (vm / "logs" / "events.log").read_text()
    if tpm == "native":
        assert "TPM: native swtpm pid" in events, events
        assert list((vm / "tpm").glob("tpm2-00.permall")), "the TPM state stays with the VM"
    else:
        assert re.search(r"TPM: helper VM on 127\.0\.0\.1:\d+", events), events
