"""The "Windows 11 setup" answer-file drive: its content, where it sits on QEMU's command line, what a guest
reads from it, when it is on by default, and how the engine, CLI and API attach it.

The image is read back two ways: with pycdlib (what Thalunix uses) and with xorriso (independent).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests

from firmware.support import boot, guest_run
from thalunix import win11
from thalunix.api import ApiServer
from thalunix.cli import main as cli_main
from thalunix.engine import CreateOptions, DirectEngine
from thalunix.qemu.argv import Endpoint, LaunchPlan, build_argv
from thalunix.runtime import Capabilities

GOLDEN_CAPS = Path(__file__).resolve().parent.parent / "unit" / "golden" / "caps-qemu-7.2.json"
NS = {"u": "urn:schemas-microsoft-com:unattend"}
WCM = "{http://schemas.microsoft.com/WMIConfig/2002/State}action"
EXPECTED_COMMANDS = [rf"reg add HKLM\SYSTEM\Setup\LabConfig /v {key} /t REG_DWORD /d 1 /f"
                     for key in ("BypassTPMCheck", "BypassSecureBootCheck", "BypassRAMCheck")]


def check_answer_file(xml: bytes) -> None:
    """Well-formed; one windowsPE pass whose Setup component only runs the three LabConfig commands."""
    root = ET.fromstring(xml)
    assert root.tag == "{urn:schemas-microsoft-com:unattend}unattend"
    passes = root.findall("u:settings", NS)
    assert [p.get("pass") for p in passes] == ["windowsPE"]   # nothing in specialize/oobeSystem: no account etc.
    components = passes[0].findall("u:component", NS)
    assert [(c.get("name"), c.get("processorArchitecture")) for c in components] == \
        [("Microsoft-Windows-Setup", "amd64")]
    # Only RunSynchronous: no UserData (product key, EULA), ImageInstall, DiskConfiguration: the user chooses.
    assert [child.tag.split("}")[1] for child in components[0]] == ["RunSynchronous"]
    commands = components[0].findall("u:RunSynchronous/u:RunSynchronousCommand", NS)
    assert [c.findtext("u:Path", namespaces=NS) for c in commands] == EXPECTED_COMMANDS
    assert [c.findtext("u:Order", namespaces=NS) for c in commands] == ["1", "2", "3"]
    assert all(c.get(WCM) == "add" for c in commands)


def test_answer_image_holds_only_the_labconfig_bypass(tmp_path: Path) -> None:
    image = win11.write_answer_image(tmp_path / "w11.iso")
    assert image.stat().st_size < 128 * 1024
    check_answer_file(win11.read_answer_file(image))
    # An independent reader sees the same file, under the name Windows looks for, and the volume label.
    out = tmp_path / "out"
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(image), "-extract", "/", str(out)],
                   check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "autounattend.xml"]
    check_answer_file((out / "autounattend.xml").read_bytes())
    pvd = subprocess.run(["xorriso", "-indev", str(image), "-pvd_info"], capture_output=True, text=True).stdout
    assert "Volume Id    : THALUNIX_W11" in pvd
    assert not list(tmp_path.glob(".*.writing"))


def test_answer_drive_is_the_second_cdrom_on_the_command_line(engine: DirectEngine, tmp_path: Path) -> None:
    installer = tmp_path / "Win11_24H2_English_x64.iso"
    installer.write_bytes(b"\0" * 4096)
    config = engine.create(CreateOptions(name="w11", iso=str(installer), os="windows11", firmware="uefi-secure",
                                         tpm="off", win11_setup=True))
    image = engine.data.vm_path(config.id, win11.IMAGE_NAME)
    assert [(c.id, c.path) for c in config.cdroms] == [("cd0", str(installer)), ("cd1", f"vms/{config.id}/win11-setup.iso")]
    check_answer_file(win11.read_answer_file(image))
    caps = Capabilities(**json.loads(GOLDEN_CAPS.read_text()))
    paths = {c.path: str(engine.data.resolve(c.path)) for c in config.cdroms}
    plan = LaunchPlan(qemu="/usr/bin/qemu-system-x86_64", qmp=Endpoint.unix("qmp.sock"), paths=paths,
                      firmware_code="/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", firmware_vars="/v/vars.qcow2")
    argv = build_argv(config, caps, plan)
    start = argv.index("-blockdev", argv.index("-mon"))   # the drives follow the monitor
    assert argv[start:start + 8] == [
        "-blockdev", '{"driver":"raw","node-name":"cd0","read-only":true,"file":{"driver":"file","filename":"'
                     f'{installer}","read-only":true}}}}',
        "-device", "ide-cd,id=cd0-dev,bus=ide.0,drive=cd0,bootindex=1",
        "-blockdev", '{"driver":"raw","node-name":"cd1","read-only":true,"file":{"driver":"file","filename":"'
                     f'{image}","read-only":true}}}}',
        "-device", "ide-cd,id=cd1-dev,bus=ide.1,drive=cd1,bootindex=2",
    ]
    assert "-tpmdev" not in argv
    assert argv[argv.index("-machine") + 1] == "q35,pflash0=fw-code,pflash1=fw-vars,smm=on"


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_guest_reads_the_answer_file_from_the_second_drive(engine: DirectEngine, make_vm) -> None:
    # machine pc: IDE CD-ROMs, which the test guest's kernel has a driver for (it has no AHCI).
    config = make_vm("w11guest", os="windows11", machine="pc", win11_setup=True)
    image = engine.data.vm_path(config.id, win11.IMAGE_NAME)
    image.unlink()                          # written again at start (after an import, say)
    boot(engine, "w11guest")
    assert image.is_file()
    out = guest_run(engine, "w11guest", "mkdir -p /mnt/w11 && mount -t iso9660 -o ro /dev/sr1 /mnt/w11 && "
                                        "ls /mnt/w11 && cat /mnt/w11/autounattend.xml")
    assert "autounattend.xml" in out and "README.txt" in out
    check_answer_file(out[out.index("<?xml"):out.index("</unattend>") + len("</unattend>")].encode())
    engine.stop("w11guest", force=True)


def test_option_defaults_on_for_windows11_without_tpm_emulation(engine: DirectEngine) -> None:
    real = engine.runtime()
    assert real.caps.has_tpm_emulator   # this host: QEMU with -tpmdev emulator
    info = engine.win11_setup_info()
    assert info["tpm_emulation"] is True and info["default"] is False and info["keys"] == list(win11.LABCONFIG_KEYS)
    assert not engine.create(CreateOptions(name="a", os="windows11")).cdroms[1:]
    assert win11.has_answer_image(engine.create(CreateOptions(name="b", os="windows11", tpm="off")))
    # A QEMU like the Windows builds': no -tpmdev at all.
    caps = dataclasses.replace(real.caps, tpm_backends=[], notes={"tpm": "-tpmdev is not an option of this QEMU"})
    engine._runtime = dataclasses.replace(real, caps=caps)
    info = engine.win11_setup_info()
    assert info == {**info, "tpm_emulation": False, "default": True, "reason": "-tpmdev is not an option of this QEMU"}
    assert "TPM 2.0, Secure Boot and RAM checks" in info["about"]
    assert win11.has_answer_image(engine.create(CreateOptions(name="c", os="windows11")))
    assert not win11.has_answer_image(engine.create(CreateOptions(name="d", os="windows11", win11_setup=False)))
    assert not win11.has_answer_image(engine.create(CreateOptions(name="e", os="linux")))


def test_a_clone_gets_its_own_answer_drive(engine: DirectEngine) -> None:
    source = engine.create(CreateOptions(name="src", os="windows11", win11_setup=True))
    engine.clone("src", "copy", wait=True)
    clone = engine.get("copy")
    fixed, changed = win11.ensure_answer_image(clone, engine.data)
    assert changed and fixed.cdroms[1].path == f"vms/{clone.id}/win11-setup.iso" != source.cdroms[1].path
    assert engine.data.vm_path(clone.id, win11.IMAGE_NAME).is_file()


def test_cli_and_api_attach_it(engine: DirectEngine, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--data-dir", str(data_dir), "vm", "create", "cli11", "--os", "windows11", "--win11-setup",
                     "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [Path(c["path"]).name for c in shown["cdroms"]] == ["", "win11-setup.iso"]
    server = ApiServer(engine).start()
    try:
        headers = {"Authorization": f"Bearer {server.token}"}
        answer = requests.get(server.url + "/api/win11-setup", headers=headers, timeout=60)
        assert answer.status_code == 200 and answer.json()["default"] is False
        created = requests.post(server.url + "/api/vms", json={"name": "api11", "os": "windows11", "win11_setup": True},
                                headers=headers, timeout=60)
        assert created.status_code == 201, created.text
        assert created.json()["cdroms"][1]["path"].endswith("/win11-setup.iso")
        wrong = requests.post(server.url + "/api/vms", json={"name": "bad11", "win11_setup": "yes"}, headers=headers,
                              timeout=60)
        assert wrong.status_code == 400 and wrong.json()["field"] == "win11_setup"
        document = requests.get(server.url + "/api/openapi.json", headers=headers, timeout=60).json()
        assert document["components"]["schemas"]["CreateOptions"]["properties"]["win11_setup"] == \
            {"type": "boolean", "nullable": True}
    finally:
        server.stop()
