"""The bridge against a real swtpm on TCP, with this test playing QEMU's part on the UNIX control socket."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from thalunix.tpm import protocol as p
from thalunix.tpm.bridge import Bridge
from thalunix.tpm.helper import free_port_pair


@pytest.fixture
def tcp_swtpm(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """A real swtpm serving TPM commands and its control channel on loopback TCP, as the helper's does."""
    swtpm = shutil.which("swtpm")
    if not swtpm:
        pytest.fail("swtpm is not installed; run `python3 build.py setup`")
    data_port, ctrl_port = free_port_pair()
    (tmp_path / "state").mkdir()
    proc = subprocess.Popen([swtpm, "socket", "--tpm2", "--server", f"type=tcp,port={data_port},bindaddr=127.0.0.1",
                             "--ctrl", f"type=tcp,port={ctrl_port},bindaddr=127.0.0.1",
                             "--tpmstate", f"dir={tmp_path / 'state'}", "--flags", "not-need-init"])
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", ctrl_port), timeout=0.1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("swtpm exited at start")
            threading.Event().wait(0.02)
    yield proc, data_port, ctrl_port
    proc.kill()
    proc.wait(10)


def _serve(bridge: Bridge, result: list[str], timeout: float = 30) -> threading.Thread:
    thread = threading.Thread(target=lambda: result.append(bridge.serve(timeout)), daemon=True)
    thread.start()
    return thread


def test_bridge_relays_a_qemu_session_and_lets_the_next_one_in(tmp_path: Path, tcp_swtpm) -> None:
    proc, data_port, ctrl_port = tcp_swtpm
    lines: list[str] = []
    bridge = Bridge(str(tmp_path / "tpm.sock"), "127.0.0.1", data_port, ctrl_port, log=lines.append)
    bridge.listen()
    result: list[str] = []
    thread = _serve(bridge, result)
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu.connect(str(tmp_path / "tpm.sock"))
    qemu.settimeout(10)

    # QEMU 7.2's order: SET_DATAFD first, with the data channel's fd passed over the socket.
    ours, theirs = socket.socketpair()
    socket.send_fds(qemu, [struct.pack(">I", p.CMD_SET_DATAFD)], [theirs.fileno()])
    theirs.close()
    assert p.recv_exact(qemu, 4) == b"\0\0\0\0"
    qemu.sendall(struct.pack(">I", p.CMD_GET_CAPABILITY))
    caps = struct.unpack(">Q", p.recv_exact(qemu, 8))[0]
    assert caps & p.PTM_CAP_SET_DATAFD, "QEMU refuses a TPM without SET_DATAFD"
    assert caps & 0x1, "the real capabilities (INIT) come from swtpm"
    assert p.ctrl_request(qemu, p.CMD_STOP) == 0
    qemu.sendall(struct.pack(">II", p.CMD_SET_BUFFERSIZE, 4096))
    reply = p.recv_exact(qemu, 16)
    result_code, size, minimum, maximum = struct.unpack(">IIII", reply)
    assert result_code == 0 and minimum <= size <= maximum
    assert p.ctrl_request(qemu, p.CMD_INIT, struct.pack(">I", 0)) == 0

    # TPM commands go through the passed descriptor to swtpm's TCP data port and back.
    ours.settimeout(10)
    assert p.tpm_response_code(p.tpm_command(ours, p.TPM2_STARTUP_CLEAR)) == 0
    response = p.tpm_command(ours, p.TPM2_GET_RANDOM_8)
    assert p.tpm_response_code(response) == 0 and len(response) == 10 + 2 + 8

    # SHUTDOWN (QEMU exiting) is answered but not relayed: the helper's swtpm must live on.
    assert p.ctrl_request(qemu, p.CMD_SHUTDOWN) == 0
    assert proc.poll() is None
    ours.close()
    qemu.close()
    thread.join(10)
    assert result == ["QEMU closed the TPM control channel"]
    assert any("SHUTDOWN" in line for line in lines)

    # The bridge shut its TCP connections down, so swtpm accepts the next control client.
    with socket.create_connection(("127.0.0.1", ctrl_port), timeout=5) as ctrl:
        ctrl.settimeout(5)
        ctrl.sendall(struct.pack(">I", p.CMD_GET_CAPABILITY))
        assert struct.unpack(">Q", p.recv_exact(ctrl, 8))[0] & 0x1
    with socket.create_connection(("127.0.0.1", data_port), timeout=5) as data:
        data.settimeout(5)
        assert p.tpm_response_code(p.tpm_command(data, p.TPM2_GET_RANDOM_8)) == 0
    bridge.close()
    assert not (tmp_path / "tpm.sock").exists()


def test_bridge_gives_up_when_no_vm_connects(tmp_path: Path, tcp_swtpm) -> None:
    _proc, data_port, ctrl_port = tcp_swtpm
    bridge = Bridge(str(tmp_path / "tpm.sock"), "127.0.0.1", data_port, ctrl_port)
    bridge.listen()
    assert bridge.serve(0.3) == "no VM connected within 0 s"
    bridge.close()


def test_set_datafd_without_a_descriptor_fails_cleanly(tmp_path: Path, tcp_swtpm) -> None:
    _proc, data_port, ctrl_port = tcp_swtpm
    bridge = Bridge(str(tmp_path / "tpm.sock"), "127.0.0.1", data_port, ctrl_port)
    bridge.listen()
    result: list[str] = []
    thread = _serve(bridge, result)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu:
        qemu.connect(str(tmp_path / "tpm.sock"))
        qemu.settimeout(10)
        assert p.ctrl_request(qemu, p.CMD_SET_DATAFD) == p.TPM_FAIL
    thread.join(10)
    bridge.close()
