"""The bridge: serves QEMU's tpm-emulator control socket (UNIX) and relays it to a swtpm reachable only by TCP.

QEMU's ``-tpmdev emulator`` speaks swtpm's control protocol on a UNIX socket and hands
over the TPM data channel as a file descriptor (``CMD_SET_DATAFD``, SCM_RIGHTS); a TCP
control channel cannot carry that (QEMU says "Failed to send CMD_SET_DATAFD"). The
bridge answers ``CMD_SET_DATAFD`` itself and pumps bytes between that descriptor and
swtpm's TCP data port; every other control command goes to swtpm's TCP control port,
except two it rewrites:

* ``CMD_GET_CAPABILITY``: swtpm's TCP channel does not announce SET_DATAFD, which QEMU
  requires, so the bridge adds the bit;
* ``CMD_SHUTDOWN`` (QEMU sends it when it exits): answered here and not relayed, because
  it would end the helper's swtpm; the helper is stopped on purpose by its owner.

At the end of a session every socket is ``shutdown()`` before it is closed: swtpm serves
one control and one data client at a time and accepts the next only after a clean end.

Example::

    bridge = Bridge("tpm.sock", "127.0.0.1", data_port=40001, ctrl_port=40002, log=print)
    bridge.listen()                       # before QEMU starts
    reason = bridge.serve(accept_timeout=60)   # returns when QEMU's session ends
    bridge.close()
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
from typing import Callable

from thalunix.tpm import protocol as p

#: Reply sizes on success (a failing swtpm may send only the 4-byte result).
_REPLY_SIZE = {p.CMD_GET_TPMESTABLISHED: 8, p.CMD_GET_CONFIG: 8, p.CMD_SET_BUFFERSIZE: 16}


def _close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Pump(threading.Thread):
    """Copies one direction of the data channel until EOF, then half-closes the other side."""

    def __init__(self, source: socket.socket, target: socket.socket, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.source, self.target = source, target

    def run(self) -> None:
        try:
            while True:
                chunk = self.source.recv(65536)
                if not chunk:
                    break
                self.target.sendall(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self.target.shutdown(socket.SHUT_WR)


class Bridge:
    """One UNIX control socket for one QEMU, relayed to one swtpm's TCP ports."""

    def __init__(self, socket_path: str, host: str, data_port: int, ctrl_port: int,
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.socket_path = socket_path
        self.host = host
        self.data_port = data_port
        self.ctrl_port = ctrl_port
        self.log = log
        self.commands = 0
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        self._ctrl: socket.socket | None = None
        self._data: list[socket.socket] = []
        self._pumps: list[_Pump] = []
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------------------
    def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)
        listener.listen(1)
        self._listener = listener

    def serve(self, accept_timeout: float) -> str:
        """Wait for QEMU, relay its session; return why it ended."""
        assert self._listener is not None, "listen() first"
        ready, _, _ = select.select([self._listener], [], [], accept_timeout)
        if self._closing:
            return "stopped"
        if not ready:
            return f"no VM connected within {accept_timeout:.0f} s"
        self._client, _ = self._listener.accept()
        self.log("QEMU connected to the TPM control socket")
        try:
            return self._session()
        finally:
            self._end_session()

    def close(self) -> None:
        """End the session and stop listening (safe from a signal handler or another thread)."""
        self._closing = True
        self._end_session()
        if self._listener is not None:
            _close(self._listener)
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)

    def _end_session(self) -> None:
        client, self._client = self._client, None
        ctrl, self._ctrl = self._ctrl, None
        data, self._data = self._data, []
        for sock in [client, ctrl, *data]:
            _close(sock)
        for pump in self._pumps:
            pump.join(5)
        self._pumps = []

    # -- the control session --------------------------------------------------------------------------
    def _session(self) -> str:
        assert self._client is not None
        while True:
            try:
                message, fds, _flags, _addr = socket.recv_fds(self._client, 4096, 4)
            except OSError as error:
                return "stopped" if self._closing else f"control socket error: {error}"
            if not message:
                for fd in fds:
                    os.close(fd)
                return "stopped" if self._closing else "QEMU closed the TPM control channel"
            while len(message) < 4:
                more = self._client.recv(4 - len(message))
                if not more:
                    return "QEMU closed the TPM control channel mid-command"
                message += more
            command = struct.unpack(">I", message[:4])[0]
            wanted = 4 + p.REQUEST_PAYLOAD.get(command, 0)
            if len(message) < wanted:
                message += p.recv_exact(self._client, wanted - len(message))
            self.commands += 1
            try:
                reply = self._handle(command, message, fds)
            except OSError as error:
                self.log(f"TPM {p.COMMAND_NAMES.get(command, hex(command))} failed: {error}")
                reply = struct.pack(">I", p.TPM_FAIL)
            self._client.sendall(reply)

    def _handle(self, command: int, message: bytes, fds: list[int]) -> bytes:
        if command == p.CMD_SET_DATAFD:
            if not fds:
                return struct.pack(">I", p.TPM_FAIL)
            for extra in fds[1:]:
                os.close(extra)
            self._attach_data(fds[0])
            return struct.pack(">I", p.TPM_SUCCESS)
        for fd in fds:
            os.close(fd)
        if command == p.CMD_SHUTDOWN:
            self.log("QEMU sent SHUTDOWN; the helper keeps running until its VM has gone")
            return struct.pack(">I", p.TPM_SUCCESS)
        ctrl = self._ctrl_socket()
        ctrl.sendall(message)
        if command == p.CMD_GET_CAPABILITY:
            caps = struct.unpack(">Q", p.recv_exact(ctrl, p.CAPABILITY_REPLY_SIZE))[0]
            return struct.pack(">Q", caps | p.PTM_CAP_SET_DATAFD)
        reply = p.recv_exact(ctrl, 4)
        size = _REPLY_SIZE.get(command, 4)
        if struct.unpack(">I", reply)[0] == p.TPM_SUCCESS and size > 4:
            reply += p.recv_exact(ctrl, size - 4)
        elif command not in p.REQUEST_PAYLOAD:
            # State blobs and other rare commands: pass on whatever swtpm sent with the result.
            while select.select([ctrl], [], [], 0.2)[0]:
                chunk = ctrl.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply

    def _ctrl_socket(self) -> socket.socket:
        if self._ctrl is None:
            self._ctrl = socket.create_connection((self.host, self.ctrl_port), timeout=10)
            self._ctrl.settimeout(30)
            self._ctrl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._ctrl

    def _attach_data(self, fd: int) -> None:
        local = socket.socket(fileno=fd)
        try:
            remote = socket.create_connection((self.host, self.data_port), timeout=10)
        except OSError:
            local.close()
            raise
        remote.settimeout(None)
        remote.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A reset QEMU may hand over a new channel: the old one ends first.
        for sock in self._data:
            _close(sock)
        for pump in self._pumps:
            pump.join(5)
        self._data = [local, remote]
        self._pumps = [_Pump(local, remote, "tpm-data-up"), _Pump(remote, local, "tpm-data-down")]
        for pump in self._pumps:
            pump.start()
