"""Golden tests of the pure command builder: fixed configs → the exact QEMU argv, one argument per line.

Each named configuration below is rendered with the capabilities QEMU 7.2 reported on Debian 12
(``golden/caps-qemu-7.2.json``, saved once from ``probe_capabilities``) and compared with
``golden/<name>.argv``. After an intended change to ``thalunix/qemu/argv.py``, regenerate with::

    THALUNIX_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_argv.py -q

and review the diff of every golden file (``git diff tests/unit/golden``) against QEMU's semantics
before committing it. ``tests/integration/test_argv_accepted.py`` checks that the real QEMU accepts
what the builder renders.
"""

from __future__ import annotations

import builtins
import json
import os
import socket
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

from thalunix.errors import ValidationError
from thalunix.model import CDRom, Disk, Display, HostLimits, Nic, PortForward, VMConfig, validate
from thalunix.qemu.argv import Endpoint, LaunchPlan, build_argv
from thalunix.runtime import Capabilities

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("THALUNIX_REGEN_GOLDEN") == "1"
CAPS = Capabilities(**json.loads((GOLDEN / "caps-qemu-7.2.json").read_text()))

VM_ID = "0123456789abcdef0123456789abcdef"
QEMU = "/usr/bin/qemu-system-x86_64"
RUN = "/data/vms/0123/run"
OVMF = "/usr/share/OVMF"
HOST = HostLimits(cpus=16, ram_mib=65536)


def vm(**fields) -> VMConfig:
    """A VM with a fixed id and creation time, defaults filled and validated like the store does."""
    fields.setdefault("name", "golden")
    fields.setdefault("nics", [])
    config = VMConfig(id=VM_ID, created="2024-01-01T00:00:00+00:00", **fields)
    config.set_defaults()
    validate(config, HOST)
    return config


def plan(config: VMConfig, **fields) -> LaunchPlan:
    """What the runner allocates on Linux: UNIX sockets in run/, stored paths resolved under /data."""
    paths = {d.path: d.path if d.path.startswith(("/", "C:")) else f"/data/{d.path}" for d in config.disks}
    paths.update({c.path: c.path if c.path.startswith(("/", "C:")) else f"/data/{c.path}"
                  for c in config.cdroms if c.path})
    values = dict(qemu=QEMU, qmp=Endpoint.unix(f"{RUN}/qmp.sock"),
                  serial=Endpoint.unix(f"{RUN}/serial.sock") if config.serial else None,
                  serial_log="/data/vms/0123/logs/serial.log", paths=paths,
                  accel_args=("-accel", "tcg"), accel="tcg",
                  vnc=Endpoint.unix(f"{RUN}/vnc.sock") if config.display.kind == "vnc" else None,
                  vnc_websocket_port=5701 if config.display.kind == "vnc" else 0)
    if config.firmware == "uefi":
        values.update(firmware_code=f"{OVMF}/OVMF_CODE_4M.fd", firmware_vars="/data/vms/0123/efivars.qcow2")
    elif config.firmware == "uefi-secure":
        values.update(firmware_code=f"{OVMF}/OVMF_CODE_4M.secboot.fd",
                      firmware_vars="/data/vms/0123/efivars.qcow2")
    values.update(fields)
    return LaunchPlan(**values)


def mac(n: int) -> str:
    return f"52:54:00:00:00:{n:02x}"


# --- the named configurations -------------------------------------------------------------------------------

def case_default_uefi_q35() -> tuple[VMConfig, LaunchPlan]:
    """What `thalunix create --iso` makes: q35, UEFI, virtio qcow2 disk, SATA CD, NAT with an SSH forward."""
    config = vm(name="debian", disks=[Disk("vms/0123/disks/system.qcow2")],
                cdroms=[CDRom("isos/debian-12.iso")],
                nics=[Nic(mac=mac(1), forwards=[PortForward("tcp", 2222, 22)])])
    return config, plan(config)


def case_bios_pc_ide() -> tuple[VMConfig, LaunchPlan]:
    """Legacy guest: pc + SeaBIOS, IDE disk (raw) and IDE CD on the PIIX controller, e1000, CD first."""
    config = vm(name="dos", machine="pc", firmware="bios", cpus=1, ram_mib=64,
                disks=[Disk("vms/0123/disks/c.img", bus="ide")], cdroms=[CDRom("isos/freedos.iso")],
                nics=[Nic(model="e1000", mac=mac(2))], display=Display("vnc", "cirrus"), usb_tablet=False)
    return config, plan(config)


def case_pc_empty_cdrom_ide() -> tuple[VMConfig, LaunchPlan]:
    """pc with an empty IDE CD-ROM (no medium: no -blockdev) and no disk; serial without a log file."""
    config = vm(name="empty cd", machine="pc", firmware="bios", cdroms=[CDRom()], boot_order=["cdrom"],
                display=Display("none", "std"))
    return config, plan(config, serial_log="")


def case_pc_four_ide_disk_first() -> tuple[VMConfig, LaunchPlan]:
    """pc's PIIX has exactly 4 IDE units (ide.0/1 × unit 0/1): 3 disks + 1 CD fill it; disks boot first."""
    config = vm(machine="pc", firmware="bios", boot_order=["disk", "cdrom"],
                disks=[Disk("d/a.qcow2", bus="ide"), Disk("d/b.raw", bus="ide"), Disk("d/c.qcow2", bus="ide")],
                cdroms=[CDRom("isos/x.iso", bus="ide")])
    return config, plan(config)


def case_pc_sata_adds_ahci() -> tuple[VMConfig, LaunchPlan]:
    """pc has no AHCI: SATA disks/CDs get an ich9-ahci controller (ahci.N); IDE CD stays on PIIX."""
    config = vm(machine="pc", firmware="bios", disks=[Disk("d/a.qcow2", bus="sata"), Disk("d/b.img", bus="sata")],
                cdroms=[CDRom("isos/x.iso", bus="sata"), CDRom("isos/y.iso", bus="ide")])
    return config, plan(config)


def case_uefi_pc_raw_vars() -> tuple[VMConfig, LaunchPlan]:
    """OVMF on i440fx (pflash works there, without SMM) with a raw variable store."""
    config = vm(machine="pc", firmware="uefi", disks=[Disk("d/sys.qcow2")], boot_order=["disk"])
    return config, plan(config, firmware_vars="/data/vms/0123/efivars.fd", firmware_vars_format="raw")


def case_q35_six_sata() -> tuple[VMConfig, LaunchPlan]:
    """q35's built-in ICH9 AHCI has six ports (ide.0 … ide.5): 4 SATA + 1 IDE-bus disk + 1 CD fill them."""
    disks = [Disk(f"d/s{i}.qcow2", bus="sata") for i in range(4)] + [Disk("d/ide.img", bus="ide")]
    config = vm(firmware="bios", disks=disks, cdroms=[CDRom("isos/x.iso")], boot_order=["disk", "cdrom"])
    return config, plan(config)


def case_scsi_nvme_virtio_mixed() -> tuple[VMConfig, LaunchPlan]:
    """Every non-ATA bus in one VM; one virtio-scsi controller serves both SCSI disks and the SCSI CD."""
    config = vm(firmware="bios", disks=[Disk("d/a.qcow2", bus="scsi"), Disk("d/b.raw", bus="scsi"),
                                        Disk("d/c.qcow2", bus="nvme"), Disk("d/ro.img", bus="virtio",
                                                                            readonly=True)],
                cdroms=[CDRom("isos/x.iso", bus="scsi"), CDRom(bus="scsi")],
                boot_order=["network", "disk", "cdrom"], nics=[Nic(mac=mac(3))])
    return config, plan(config)


def case_nics_every_model() -> tuple[VMConfig, LaunchPlan]:
    """Every NIC model and mode; TCP/UDP forwards, one on an explicit host address; PXE first."""
    nics = [Nic("user", "virtio-net-pci", mac(0x10), [PortForward("tcp", 8080, 80), PortForward("udp", 5353, 53)]),
            Nic("restricted", "e1000e", mac(0x11), [PortForward("tcp", 2222, 22, "0.0.0.0")]),
            Nic("none", "e1000", mac(0x12)),
            Nic("user", "rtl8139", mac(0x13))]
    config = vm(firmware="bios", disks=[Disk("d/a.qcow2")], boot_order=["network", "disk"], nics=nics)
    return config, plan(config)


def case_uefi_secure_windows11_tpm() -> tuple[VMConfig, LaunchPlan]:
    """Windows 11: Secure Boot (smm + secure pflash), local-time RTC, NVMe, TPM over the emulator socket."""
    config = vm(name="win11", os="windows11", firmware="uefi-secure", cpus=4, ram_mib=4096,
                disks=[Disk("vms/0123/disks/c.qcow2", bus="nvme")], cdroms=[CDRom("isos/Win11.iso"), CDRom()],
                boot_order=["disk", "cdrom"], nics=[Nic(model="e1000e", mac=mac(4))],
                display=Display("vnc", "virtio"))
    return config, plan(config, tpm_socket=f"{RUN}/tpm.sock",
                        firmware_vars="/data/vms/0123/efivars-ms.qcow2")


def case_tpm_pc_tis() -> tuple[VMConfig, LaunchPlan]:
    """A TPM on pc is the ISA tpm-tis (tpm-crb is for q35)."""
    config = vm(machine="pc", firmware="bios", display=Display("vnc", "std"))
    return config, plan(config, tpm_socket=f"{RUN}/tpm.sock", vnc_websocket_port=0)


def case_windows_host_bundled() -> tuple[VMConfig, LaunchPlan]:
    """On a Windows host: bundled QEMU with -L, TCP endpoints for QMP/serial/VNC, WHPX, Windows paths."""
    config = vm(name="xp", os="windows", machine="pc", firmware="bios",
                disks=[Disk(r"C:\Users\Ann\VMs\xp.img", bus="ide")], cdroms=[CDRom(r"C:\Users\Ann\isos\xp.iso")],
                nics=[Nic(model="rtl8139", mac=mac(5), forwards=[PortForward("tcp", 3389, 3389)])],
                display=Display("vnc", "std"))
    root = r"C:\Program Files\Thalunix\bundled\windows-x86_64"
    return config, plan(config, qemu=rf"{root}\bin\qemu-system-x86_64.exe", data_dir=rf"{root}\share\qemu",
                        qmp=Endpoint.tcp(50123), serial=Endpoint.tcp(50124),
                        serial_log=r"C:\Users\Ann\Thalunix\vms\0123\logs\serial.log",
                        vnc=Endpoint.tcp(5987), vnc_websocket_port=50125,
                        accel_args=("-accel", "whpx,kernel-irqchip=off"), accel="whpx,kernel-irqchip=off")


def case_vnc_tcp_no_websocket_kvm() -> tuple[VMConfig, LaunchPlan]:
    """VNC on a TCP display number without websocket; KVM accel gives -cpu host."""
    config = vm(firmware="bios", display=Display("vnc", "qxl"), serial=False, usb_tablet=False)
    return config, plan(config, vnc=Endpoint.tcp(5901), vnc_websocket_port=0,
                        accel_args=("-accel", "kvm"), accel="kvm")


def case_display_native_qxl() -> tuple[VMConfig, LaunchPlan]:
    """QEMU's own window: no -display at all; QXL card."""
    config = vm(firmware="bios", display=Display("native", "qxl"), nics=[Nic(mac=mac(6))])
    return config, plan(config)


def case_headless_no_vga_no_serial() -> tuple[VMConfig, LaunchPlan]:
    """Nothing to look at: no VGA, no display, no serial, no tablet, no NIC."""
    config = vm(firmware="bios", disks=[Disk("d/a.raw", format="raw")], boot_order=["disk"],
                display=Display("none", "none"), serial=False, usb_tablet=False)
    return config, plan(config)


def case_paths_commas_spaces() -> tuple[VMConfig, LaunchPlan]:
    """Commas are doubled in key=value options (chardev, vnc), but not inside JSON -blockdev or -L."""
    base = "/home/ann/My VMs, old"
    config = vm(name="my vm", disks=[Disk(f"{base}/disk, 1.qcow2"), Disk(f"{base}/raw disk.img", bus="sata")],
                cdroms=[CDRom(f"{base}/a,b.iso")], nics=[Nic(mac=mac(7))])
    return config, plan(config, qmp=Endpoint.unix(f"{base}/run/q,mp.sock"), serial=Endpoint.unix(f"{base}/s l.sock"),
                        serial_log=f"{base}/logs/serial,1.log", vnc=Endpoint.unix(f"{base}/v,nc.sock"),
                        firmware_code="/opt/ovmf, 4m/OVMF_CODE_4M.fd", firmware_vars=f"{base}/efi,vars.qcow2",
                        data_dir="/opt/thalunix, portable/share/qemu", tpm_socket=f"{base}/tp,m.sock")


CASES: dict[str, Callable[[], tuple[VMConfig, LaunchPlan]]] = {
    name[len("case_"):]: function for name, function in sorted(globals().items()) if name.startswith("case_")
}


def test_enough_cases() -> None:
    assert len(CASES) >= 12


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    config, launch = CASES[name]()
    argv = build_argv(config, CAPS, launch)
    golden = GOLDEN / f"{name}.argv"
    text = "".join(f"{arg}\n" for arg in argv)
    assert all("\n" not in arg for arg in argv)
    if REGEN:
        golden.write_text(text)
    assert golden.exists(), f"{golden} is missing; run with THALUNIX_REGEN_GOLDEN=1 and review it"
    assert text == golden.read_text(), f"argv differs from {golden.name}; if intended, regenerate and review"


def test_no_stale_golden_files() -> None:
    names = {p.stem for p in GOLDEN.glob("*.argv")}
    assert names == set(CASES)


# --- semantic spot checks, independent of the golden text ---------------------------------------------------

def _options(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def test_boot_indexes_follow_boot_order() -> None:
    config, launch = case_scsi_nvme_virtio_mixed()
    devices = _options(build_argv(config, CAPS, launch), "-device")
    indexes = {d.split(",")[0] + ":" + d.split("id=")[1].split(",")[0]: d.split("bootindex=")[1]
               for d in devices if "bootindex=" in d}
    assert indexes == {"virtio-net-pci:net0-dev": "1", "scsi-hd:disk0-dev": "2", "scsi-hd:disk1-dev": "3",
                       "nvme:disk2-dev": "4", "virtio-blk-pci:disk3-dev": "5", "scsi-cd:cd0-dev": "6",
                       "scsi-cd:cd1-dev": "7"}
    assert _options(build_argv(config, CAPS, launch), "-device").count("virtio-scsi-pci,id=scsi0") == 1


def test_blockdevs_are_json_with_raw_paths() -> None:
    config, launch = case_paths_commas_spaces()
    argv = build_argv(config, CAPS, launch)
    blockdevs = [json.loads(b) for b in _options(argv, "-blockdev")]
    files = [b["file"]["filename"] if "file" in b else b["filename"] for b in blockdevs]
    assert "/home/ann/My VMs, old/disk, 1.qcow2" in files and "/home/ann/My VMs, old/a,b.iso" in files
    assert "/opt/ovmf, 4m/OVMF_CODE_4M.fd" in files
    assert _options(argv, "-L") == ["/opt/thalunix, portable/share/qemu"]
    for chardev in _options(argv, "-chardev"):
        # after undoing QEMU's ",," escaping, splitting on "," must give key=value pairs only
        assert all("=" in part for part in chardev.replace(",,", "\0").split(",")[1:]), chardev


def test_non_boot_nics_have_no_option_rom() -> None:
    config, launch = case_default_uefi_q35()
    devices = _options(build_argv(config, CAPS, launch), "-device")
    nic = next(d for d in devices if d.startswith("virtio-net-pci"))
    assert nic.endswith(",romfile=") and "bootindex" not in nic


# --- errors -------------------------------------------------------------------------------------------------

def _error(config: VMConfig, launch: LaunchPlan, caps: Capabilities = CAPS) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        build_argv(config, caps, launch)
    return info.value


def test_pc_with_secure_boot_is_refused() -> None:
    config, launch = case_uefi_secure_windows11_tpm()
    # set_defaults() moves a Secure Boot VM to q35 and validate() refuses pc; the builder refuses it too
    # (OVMF's Secure Boot build needs SMM on q35) for a config that did not go through them.
    config.machine = "pc"
    with pytest.raises(ValidationError) as info:
        validate(config, HOST)
    assert info.value.field == "machine"
    error = _error(config, launch)
    assert error.field == "machine" and "q35" in str(error)


def _without(*devices: str) -> Capabilities:
    return replace(CAPS, devices=[d for d in CAPS.devices if d not in devices])


@pytest.mark.parametrize("device, case, field", [
    ("nvme", case_uefi_secure_windows11_tpm, "disks"),
    ("virtio-scsi-pci", case_scsi_nvme_virtio_mixed, "disks"),
    ("virtio-blk-pci", case_default_uefi_q35, "disks"),
    ("e1000e", case_nics_every_model, "nics[1].model"),
    ("rtl8139", case_nics_every_model, "nics[3].model"),
    ("qxl-vga", case_display_native_qxl, "display.vga"),
    ("qemu-xhci", case_default_uefi_q35, "usb_tablet"),
])
def test_device_missing_from_caps(device: str, case, field: str) -> None:
    config, launch = case()
    error = _error(config, launch, _without(device))
    assert error.field == field
    assert device in str(error) and config.name in str(error)


def test_machine_missing_from_caps() -> None:
    config, launch = case_bios_pc_ide()
    error = _error(config, launch, replace(CAPS, machines=[m for m in CAPS.machines if m != "pc"]))
    assert error.field == "machine"


def test_unprobed_caps_check_nothing() -> None:
    """An empty Capabilities (nothing probed) does not refuse devices; the golden output is unchanged."""
    config, launch = case_nics_every_model()
    assert build_argv(config, Capabilities(), launch) == build_argv(config, CAPS, launch)


@pytest.mark.parametrize("firmware", ["uefi", "uefi-secure"])
@pytest.mark.parametrize("missing", ["firmware_code", "firmware_vars"])
def test_uefi_without_firmware_paths(firmware: str, missing: str) -> None:
    config = vm(firmware=firmware)
    error = _error(config, replace(plan(config), **{missing: ""}))
    assert error.field == "firmware" and "OVMF" in str(error)


def test_seventh_sata_drive_on_q35() -> None:
    config = vm(firmware="bios", disks=[Disk(f"d/s{i}.qcow2", bus="sata") for i in range(6)],
                cdroms=[CDRom("isos/x.iso")])
    assert _error(config, plan(config)).field == "disks"
    config = vm(firmware="bios", disks=[Disk(f"d/s{i}.qcow2", bus=("sata", "ide")[i % 2]) for i in range(7)])
    assert _error(config, plan(config)).field == "disks"


def test_seventh_sata_drive_on_pc() -> None:
    config = vm(machine="pc", firmware="bios", disks=[Disk(f"d/s{i}.qcow2", bus="sata") for i in range(7)])
    assert _error(config, plan(config)).field == "disks"


def test_fifth_ide_drive_on_pc() -> None:
    config = vm(machine="pc", firmware="bios", disks=[Disk(f"d/i{i}.qcow2", bus="ide") for i in range(4)],
                cdroms=[CDRom()])
    error = _error(config, plan(config))
    assert error.field == "disks" and "4 IDE" in str(error)


@pytest.mark.parametrize("bus", ["sata", "ide"])
def test_read_only_ata_disk(bus: str) -> None:
    """QEMU's ide-hd always asks for write access: a read-only IDE/SATA disk fails at start."""
    config = vm(firmware="bios", disks=[Disk("d/a.qcow2"), Disk("d/b.qcow2", bus=bus, readonly=True)])
    error = _error(config, plan(config))
    assert error.field == "disks[1].readonly" and bus.upper() in str(error)


def test_tpm_with_a_qemu_without_emulator() -> None:
    config, launch = case_tpm_pc_tis()
    error = _error(config, launch, replace(CAPS, tpm_backends=["passthrough"]))
    assert error.field == "tpm"


def test_tpm_with_a_windows_qemu() -> None:
    """QEMU for Windows has no -tpmdev at all: the probe lists no backend and notes why."""
    config, launch = case_tpm_pc_tis()
    windows_caps = replace(CAPS, tpm_backends=[],
                           notes={"tpm": "this QEMU build has no TPM emulation (QEMU builds for Windows never "
                                         "have it)"})
    assert _error(config, launch, windows_caps).field == "tpm"


def test_unresolved_path() -> None:
    config, launch = case_default_uefi_q35()
    error = _error(config, replace(launch, paths={}))
    assert error.field == "paths" and "system.qcow2" in str(error)


# --- purity -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_pure_no_io_and_repeatable(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config, launch = CASES[name]()
    before = config.to_dict()

    def forbidden(*args, **kwargs):
        raise AssertionError(f"build_argv did I/O: {args!r}")

    for target, attr in [(builtins, "open"), (os, "open"), (os, "stat"), (os, "lstat"), (os, "listdir"),
                         (os, "scandir"), (os.path, "exists"), (os.path, "isfile"), (os, "access"),
                         (subprocess, "Popen"), (socket, "socket")]:
        monkeypatch.setattr(target, attr, forbidden)
    first = build_argv(config, CAPS, launch)
    second = build_argv(config, CAPS, launch)
    monkeypatch.undo()
    assert first == second and first is not second
    assert config.to_dict() == before  # the config is not changed
    # none of the files exist on this machine, and that does not matter
    assert not any(Path(p).exists() for p in launch.paths.values())
