"""TPM NV storage in the helper VM survives a clean restart and a SIGKILL (tpm2-tools through the forwarded port)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from thalunix.tpm.helper import HelperImage, HelperVM

pytestmark = pytest.mark.qemu
NV_INDEX = "0x1500016"


def tpm2(helper: HelperVM, *args: str, data: bytes | None = None) -> bytes:
    env = {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:host=127.0.0.1,port={helper.data_port}"}
    done = subprocess.run([args[0], *args[1:]], input=data, capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.decode(errors='replace')}"
    return done.stdout


def nv_write(helper: HelperVM, value: bytes) -> None:
    tpm2(helper, "tpm2_nvwrite", NV_INDEX, "-C", "o", "-i", "-", data=value)


def nv_read(helper: HelperVM, size: int) -> bytes:
    return tpm2(helper, "tpm2_nvread", NV_INDEX, "-C", "o", "-s", str(size))


def test_nv_survives_clean_restart_and_sigkill(helper_image: Path, tpm2_tools, tmp_path: Path) -> None:
    image = HelperImage.load(helper_image)
    qemu = Path(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    disk = tmp_path / "state.img"

    def boot() -> HelperVM:
        helper = HelperVM(qemu, image, disk, log_file=tmp_path / "helper.log")
        helper.start()
        tpm2(helper, "tpm2_startup", "-c")
        return helper

    helper = boot()
    tpm2(helper, "tpm2_nvdefine", NV_INDEX, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite|authread|authwrite")
    nv_write(helper, b"first-value-0001")
    assert nv_read(helper, 16) == b"first-value-0001"
    assert helper.stop(), "the clean stop had to kill the helper"
    assert "swtpm exited with status 0" in "\n".join(helper.lines)

    expected = b"first-value-0001"
    for round_ in range(3):
        helper = boot()
        assert nv_read(helper, 16) == expected, f"round {round_}"
        expected = f"killed-value-{round_:03d}".encode()
        nv_write(helper, expected)
        assert helper.proc is not None
        helper.proc.kill()            # SIGKILL right after the write: no sync, no unmount
        helper.proc.wait(10)

    helper = boot()
    try:
        assert nv_read(helper, 16) == expected
        assert any("thalunix-tpm" in line for line in helper.lines), "the state disk was checked at boot"
    finally:
        helper.stop()


def test_helper_on_q35_where_qemu_has_no_microvm(helper_image: Path, tpm2_tools, tmp_path: Path) -> None:
    """QEMU builds without microvm boot the same image on q35 (virtio-pci): the kernel has both transports."""
    image = HelperImage.load(helper_image)
    qemu = Path(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    helper = HelperVM(qemu, image, tmp_path / "state.img", machines=["q35", "pc"])
    assert "q35" in helper.argv() and "virtio-blk-pci,drive=state" in helper.argv()
    helper.start()
    try:
        tpm2(helper, "tpm2_startup", "-c")
        assert len(tpm2(helper, "tpm2_getrandom", "--hex", "16")) == 32
        assert not [line for line in helper.lines if "THALUNIX-HELPER-ERROR" in line]
    finally:
        assert helper.stop(), "the clean stop had to kill the helper"
