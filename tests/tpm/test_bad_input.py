"""Bad input: each a clear error, and the VM does not start half-configured (no QEMU, swtpm or helper left)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import stat
from pathlib import Path

import pytest

from thalunix.engine import DirectEngine
from thalunix.tpm import HelperImageError, PortInUseError, TpmError, TpmUnavailableError
from thalunix.tpm import helper as helper_module
from thalunix.tpm.helper import HelperImage, HelperVM
from tpm.support import owned_processes, wait_no_processes

pytestmark = pytest.mark.qemu


def _set_runtime(engine: DirectEngine, **changes) -> None:
    engine._runtime = dataclasses.replace(engine.runtime(), **changes)


def _assert_not_started(engine: DirectEngine, name: str, data_dir: Path) -> None:
    config = engine.get(name)
    assert engine.status(name)["state"] == "stopped"
    assert not engine.data.vm_path(config.id, "run", "state.json").exists()
    assert not engine.data.vm_path(config.id, "run", "tpm.json").exists()
    assert not engine.data.vm_path(config.id, "run", "tpm.sock").exists()
    assert wait_no_processes(data_dir, timeout=5) == []


def _copy_image(source: Path, target: Path) -> Path:
    target.mkdir()
    for item in source.iterdir():
        shutil.copyfile(item, target / item.name)
    return target


def test_swtpm_missing(engine: DirectEngine, make_vm, data_dir: Path, helper_image: Path) -> None:
    _set_runtime(engine, swtpm=None)
    make_vm("nat", tpm="native")
    with pytest.raises(TpmUnavailableError, match=r"TPM is 'native' but swtpm was not found.*apt install swtpm"):
        engine.start("nat")
    _assert_not_started(engine, "nat", data_dir)

    # auto (and on) fall back to the helper VM, and say so.
    make_vm("fallback", tpm="auto")
    engine.start("fallback")
    config = engine.get("fallback")
    events = engine.data.vm_path(config.id, "logs", "events.log").read_text()
    assert "TPM: helper VM on 127.0.0.1:" in events
    assert "-tpmdev" in engine.supervisor.sessions[config.id].record.argv
    engine.stop("fallback", force=True)
    assert engine.supervisor.tpm.wait_released(config)
    assert wait_no_processes(data_dir) == []


def test_swtpm_that_fails(engine: DirectEngine, make_vm, data_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "swtpm"
    broken.write_text("#!/bin/sh\necho 'swtpm: Could not open TPM state: permission denied' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    _set_runtime(engine, swtpm=broken)
    make_vm("nat", tpm="on")
    with pytest.raises(TpmError, match=r"swtpm exited \(code 1\) before creating its control socket: "
                                       r".*permission denied.*swtpm\.log"):
        engine.start("nat")
    _assert_not_started(engine, "nat", data_dir)


def test_helper_image_missing_or_damaged(engine: DirectEngine, make_vm, data_dir: Path, helper_image: Path,
                                         tmp_path: Path) -> None:
    make_vm("h", tpm="helper")
    _set_runtime(engine, helper_vm=None)
    with pytest.raises(HelperImageError, match=r"helper VM image was not found.*python3 helper-vm/build.py"):
        engine.start("h")
    _assert_not_started(engine, "h", data_dir)

    # on: neither backend → both reasons; auto: no TPM, with the reason logged.
    _set_runtime(engine, swtpm=None, helper_vm=tmp_path / "nowhere")
    engine.edit("h", {"tpm": "on"})
    with pytest.raises(TpmUnavailableError, match=r"none can be had \(native: swtpm was not found.*helper VM: .*"
                                                  r"has no manifest.json"):
        engine.start("h")
    _assert_not_started(engine, "h", data_dir)

    flipped = _copy_image(helper_image, tmp_path / "flipped")
    data = bytearray((flipped / "initrd.img").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "initrd.img").write_bytes(bytes(data))
    _set_runtime(engine, helper_vm=flipped)
    engine.edit("h", {"tpm": "helper"})
    with pytest.raises(HelperImageError, match=r"initrd.img is damaged \(its sha256 does not match"):
        engine.start("h")
    _assert_not_started(engine, "h", data_dir)

    truncated = _copy_image(helper_image, tmp_path / "truncated")
    kernel = json.loads((truncated / "manifest.json").read_text())["kernel"]
    with open(truncated / kernel, "r+b") as handle:
        handle.truncate(1 << 20)
    _set_runtime(engine, helper_vm=truncated)
    with pytest.raises(HelperImageError, match=rf"{kernel} is damaged \(1048576 bytes, expected"):
        engine.start("h")
    _assert_not_started(engine, "h", data_dir)


def _newc(name: str, data: bytes, mode: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)


def _silent_image(helper_image: Path, target: Path) -> Path:
    """A well-formed image whose guest boots but never starts swtpm (a later cpio replaces /init)."""
    folder = _copy_image(helper_image, target)
    init = b"#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs d /dev\necho silent > /dev/ttyS0\n" \
           b"exec /bin/busybox sleep 100000\n"
    extra = _newc("init", init, 0o100755) + _newc("TRAILER!!!", b"", 0)
    with open(folder / "initrd.img", "ab") as handle:
        handle.write(b"\0" * (-handle.tell() % 4) + extra)
    manifest = json.loads((folder / "manifest.json").read_text())
    import hashlib
    manifest["files"]["initrd.img"] = {"size": (folder / "initrd.img").stat().st_size,
                                       "sha256": hashlib.sha256((folder / "initrd.img").read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_helper_that_never_answers(engine: DirectEngine, make_vm, data_dir: Path, helper_image: Path,
                                   tmp_path: Path) -> None:
    _set_runtime(engine, helper_vm=_silent_image(helper_image, tmp_path / "silent"))
    engine.supervisor.tpm.helper_ready_timeout = 10
    make_vm("h", tpm="helper")
    with pytest.raises(TpmError, match=r"TPM helper did not answer a TPM command within 10 s \(last console line: "
                                       r"'silent'\)"):
        engine.start("h")
    _assert_not_started(engine, "h", data_dir)


def test_damaged_state_disk_is_reported_not_replaced(engine: DirectEngine, make_vm, data_dir: Path,
                                                     helper_image: Path) -> None:
    make_vm("h", tpm="helper")
    config = engine.get("h")
    disk = engine.data.vm_path(config.id, "tpm", "helper-state.img")
    disk.write_bytes(b"\xde\xad\xbe\xef" * (1 << 20))
    with pytest.raises(TpmError, match=r"the TPM state disk is damaged"):
        engine.start("h")
    _assert_not_started(engine, "h", data_dir)
    assert disk.read_bytes()[:4] == b"\xde\xad\xbe\xef"


def test_ports_taken(helper_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = HelperImage.load(helper_image)
    qemu = Path(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        helper = HelperVM(qemu, image, tmp_path / "state.img", ports=(taken, taken + 1))
        with pytest.raises(PortInUseError, match=f"TCP port {taken} on 127.0.0.1 is already in use"):
            helper.start()
        assert helper.proc is None

        # Automatic ports taken between the choice and QEMU's start: QEMU refuses, the helper retries.
        real = helper_module.free_port_pair
        picks = iter([(taken, taken + 1)])
        monkeypatch.setattr(helper_module, "free_port_pair", lambda: next(picks, None) or real())
        lines: list[str] = []
        helper = HelperVM(qemu, image, tmp_path / "state.img", log=lines.append)
        helper.start()
        try:
            assert helper.data_port != taken
            assert any("were taken meanwhile" in line for line in lines), lines
        finally:
            assert helper.stop()
    assert not helper.running


def test_on_mode_without_any_backend_leaves_nothing(engine: DirectEngine, make_vm, data_dir: Path) -> None:
    _set_runtime(engine, swtpm=None, helper_vm=None)
    make_vm("auto-off", tpm="auto")
    engine.start("auto-off")
    config = engine.get("auto-off")
    assert "-tpmdev" not in engine.supervisor.sessions[config.id].record.argv
    assert "TPM: no TPM (native: swtpm was not found" in \
        engine.data.vm_path(config.id, "logs", "events.log").read_text()
    engine.stop("auto-off", force=True)
    assert owned_processes(data_dir) == [] or wait_no_processes(data_dir) == []


def test_state_disk_in_use_by_another_helper(helper_image: Path, tmp_path: Path) -> None:
    image = HelperImage.load(helper_image)
    qemu = Path(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    first = HelperVM(qemu, image, tmp_path / "state.img")
    first.start()
    try:
        second = HelperVM(qemu, image, tmp_path / "state.img")
        with pytest.raises(TpmError, match=r"state disk .*state.img is in use by another helper"):
            second.start()
        assert not second.running
    finally:
        assert first.stop()
