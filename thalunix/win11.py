"""The "Windows 11 setup" option: an answer-file image that lets Setup skip its TPM, Secure Boot and RAM checks.

Windows QEMU builds (and any host without ``swtpm``) cannot give a VM a TPM 2.0, which Windows 11
Setup demands. Setup reads ``autounattend.xml`` from the root of any removable drive; the one made
here does exactly one thing, in the ``windowsPE`` pass: it adds the documented community keys
``HKLM\\SYSTEM\\Setup\\LabConfig`` ``BypassTPMCheck``, ``BypassSecureBootCheck`` and
``BypassRAMCheck`` = 1, so Setup's hardware check passes. Nothing else is answered: language,
edition, disk, account and privacy choices all stay with the person installing.

The image is a tiny ISO (made with pycdlib, so it works on every host without extra tools)
attached as a second CD-ROM, ``vms/<id>/win11-setup.iso``. It holds nothing specific to the VM,
so it is simply written again whenever it is missing (after an import, a clone, a deletion).

Example::

    config.cdroms.append(answer_cdrom(config, data))    # at create, when the option is on
    write_answer_image(data.vm_path(config.id, IMAGE_NAME))
    read_answer_file(path)                               # b'<?xml ...' back from the image
    config = ensure_answer_image(config, data)           # before a start
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from thalunix.errors import ThalunixError
from thalunix.model import CDRom, VMConfig
from thalunix.store import DataFolder

IMAGE_NAME = "win11-setup.iso"
VOLUME_LABEL = "THALUNIX_W11"
#: The registry values Setup's hardware check reads (each set to 1).
LABCONFIG_KEYS = ("BypassTPMCheck", "BypassSecureBootCheck", "BypassRAMCheck")
LABCONFIG_PATH = r"HKLM\SYSTEM\Setup\LabConfig"
#: What fronts show next to the option.
ABOUT = ("Adds a small answer-file drive (autounattend.xml) that lets Windows 11 Setup skip its TPM 2.0, "
         "Secure Boot and RAM checks (the LabConfig registry keys). Every other choice in Setup stays yours.")

_COMMAND = """\
        <RunSynchronousCommand wcm:action="add">
          <Order>{order}</Order>
          <Description>Windows 11 Setup: skip the {what} check</Description>
          <Path>reg add {path} /v {key} /t REG_DWORD /d 1 /f</Path>
        </RunSynchronousCommand>
"""
_WHAT = {"BypassTPMCheck": "TPM 2.0", "BypassSecureBootCheck": "Secure Boot", "BypassRAMCheck": "RAM"}

AUTOUNATTEND_XML = f"""\
<?xml version="1.0" encoding="utf-8"?>
<!-- Made by Thalunix ("Windows 11 setup" option) for a VM whose host cannot emulate a TPM.
     It only adds the LabConfig keys below so Windows 11 Setup skips its TPM 2.0, Secure Boot
     and RAM checks; every other choice is left to you. Remove this drive from the VM after setup. -->
<unattend xmlns="urn:schemas-microsoft-com:unattend">
  <settings pass="windowsPE">
    <component name="Microsoft-Windows-Setup" processorArchitecture="amd64" publicKeyToken="31bf3856ad364e35"
               language="neutral" versionScope="nonSxS"
               xmlns:wcm="http://schemas.microsoft.com/WMIConfig/2002/State"
               xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
      <RunSynchronous>
{"".join(_COMMAND.format(order=i + 1, what=_WHAT[key], path=LABCONFIG_PATH, key=key)
         for i, key in enumerate(LABCONFIG_KEYS))}      </RunSynchronous>
    </component>
  </settings>
</unattend>
"""

README_TXT = f"""\
Thalunix "Windows 11 setup" drive
=================================

Windows Setup reads autounattend.xml from this drive. It only sets the registry values
{LABCONFIG_PATH} {', '.join(LABCONFIG_KEYS)} = 1 so that Setup skips its TPM 2.0,
Secure Boot and RAM checks on a host that cannot emulate a TPM. Nothing else is automated.
You can remove this drive from the VM once Windows is installed.
""".replace("\n", "\r\n")


class AnswerImageError(ThalunixError):
    """The answer-file image could not be written or read."""

    code = "win11-setup"


def _pycdlib() -> Any:
    try:
        import pycdlib
    except ImportError:   # pragma: no cover - a dependency; only a broken install lacks it
        raise AnswerImageError("the Windows 11 setup image needs the pycdlib package; reinstall Thalunix "
                               "(pip install pycdlib)") from None
    return pycdlib


def answer_image_bytes() -> bytes:
    """The ISO image (ISO 9660 + Joliet) holding ``autounattend.xml`` and ``README.txt`` at its root."""
    pycdlib = _pycdlib()
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, vol_ident=VOLUME_LABEL, app_ident_str="THALUNIX")
    try:
        for short, long, text in (("AUTOUNAT.XML;1", "autounattend.xml", AUTOUNATTEND_XML),
                                  ("README.TXT;1", "README.txt", README_TXT)):
            data = text.encode("utf-8")
            iso.add_fp(io.BytesIO(data), len(data), f"/{short}", joliet_path=f"/{long}")
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def write_answer_image(path: Path) -> Path:
    """Write the image to ``path`` (beside it first, then renamed: never half an image)."""
    temp = path.with_name(f".{path.name}.writing")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(answer_image_bytes())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise AnswerImageError(f"cannot write the Windows 11 setup image {path}: {error.strerror or error}; "
                               "check the data folder is writable and has space") from None
    return path


def read_answer_file(path: Path, name: str = "autounattend.xml") -> bytes:
    """A file from the image's root as Windows sees it (by its Joliet name)."""
    pycdlib = _pycdlib()
    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
    except (OSError, pycdlib.pycdlibexception.PyCdlibException) as error:
        raise AnswerImageError(f"{path} is not a readable ISO image: {error}") from None
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, joliet_path=f"/{name}")
        return out.getvalue()
    except pycdlib.pycdlibexception.PyCdlibException as error:
        raise AnswerImageError(f"{path} has no {name}: {error}") from None
    finally:
        iso.close()


def stored_path(config: VMConfig, data: DataFolder) -> str:
    return data.to_stored_path(data.vm_path(config.id, IMAGE_NAME))


def is_answer_cdrom(cdrom: CDRom) -> bool:
    return Path(cdrom.path.replace("\\", "/")).name == IMAGE_NAME


def has_answer_image(config: VMConfig) -> bool:
    return any(is_answer_cdrom(cdrom) for cdrom in config.cdroms)


def answer_cdrom(config: VMConfig, data: DataFolder) -> CDRom:
    """The second CD-ROM drive carrying the image (after the installer's, so it never comes first)."""
    taken = {cdrom.id for cdrom in config.cdroms} | {disk.id for disk in config.disks}
    number = len(config.cdroms)
    while f"cd{number}" in taken:
        number += 1
    return CDRom(path=stored_path(config, data), id=f"cd{number}")


def default_for(os_hint: str, tpm_mode: str, has_tpm_emulation: bool) -> bool:
    """On for a Windows 11 VM that will get no TPM: the host cannot emulate one, or the VM's TPM is off."""
    return os_hint == "windows11" and (not has_tpm_emulation or tpm_mode == "off")


def ensure_answer_image(config: VMConfig, data: DataFolder) -> tuple[VMConfig, bool]:
    """Before a start: the VM's answer drive points at its own image, which exists. (config, changed)."""
    own = stored_path(config, data)
    changed = False
    for cdrom in config.cdroms:
        if is_answer_cdrom(cdrom) and cdrom.path != own:
            cdrom.path = own   # a clone or an import still naming another VM's copy
            changed = True
    if has_answer_image(config) and not data.vm_path(config.id, IMAGE_NAME).is_file():
        write_answer_image(data.vm_path(config.id, IMAGE_NAME))
    return config, changed
