"""The wire formats Thalunix speaks to swtpm: its control channel (``man swtpm-ioctls``) and raw TPM 2.0 commands.

Control requests are a 4-byte big-endian command code and a payload; most replies
start with a 4-byte result (0 = success). TPM commands travel raw on the data
channel: a 10-byte header (tag, size, code) and parameters.

Example::

    with socket.create_connection(("127.0.0.1", ctrl_port)) as ctrl:
        result = ctrl_request(ctrl, CMD_SHUTDOWN)        # 0: swtpm exits
    with socket.create_connection(("127.0.0.1", data_port)) as data:
        rc = tpm_response_code(tpm_command(data, TPM2_GET_RANDOM_8))
"""

from __future__ import annotations

import socket
import struct

# swtpm control commands (tpm_ioctl.h)
CMD_GET_CAPABILITY = 0x01
CMD_INIT = 0x02
CMD_SHUTDOWN = 0x03
CMD_GET_TPMESTABLISHED = 0x04
CMD_SET_LOCALITY = 0x05
CMD_CANCEL_TPM_CMD = 0x09
CMD_STORE_VOLATILE = 0x0A
CMD_RESET_TPMESTABLISHED = 0x0B
CMD_GET_STATEBLOB = 0x0C
CMD_SET_STATEBLOB = 0x0D
CMD_STOP = 0x0E
CMD_GET_CONFIG = 0x0F
CMD_SET_DATAFD = 0x10
CMD_SET_BUFFERSIZE = 0x11
CMD_GET_INFO = 0x12

#: Capability bit QEMU insists on and that swtpm only sets for a UNIX control socket.
PTM_CAP_SET_DATAFD = 1 << 12
#: Reply size of CMD_GET_CAPABILITY: a bare 8-byte mask, without a result code.
CAPABILITY_REPLY_SIZE = 8

TPM_SUCCESS = 0
TPM_FAIL = 0x09
TPM_RC_INITIALIZE = 0x100

#: Payload sizes of the requests QEMU sends (what follows the 4-byte command code).
REQUEST_PAYLOAD = {
    CMD_GET_CAPABILITY: 0, CMD_INIT: 4, CMD_SHUTDOWN: 0, CMD_GET_TPMESTABLISHED: 0, CMD_SET_LOCALITY: 4,
    CMD_CANCEL_TPM_CMD: 0, CMD_STORE_VOLATILE: 0, CMD_RESET_TPMESTABLISHED: 4, CMD_STOP: 0, CMD_GET_CONFIG: 0,
    CMD_SET_DATAFD: 0, CMD_SET_BUFFERSIZE: 4,
}

COMMAND_NAMES = {value: name for name, value in globals().items() if name.startswith("CMD_")}

# TPM2_GetRandom(8): tag NO_SESSIONS, size 12, code 0x17B, bytesRequested 8.
TPM2_GET_RANDOM_8 = bytes.fromhex("80010000000c0000017b0008")
# TPM2_Startup(CLEAR)
TPM2_STARTUP_CLEAR = bytes.fromhex("80010000000c000001440000")


class ProtocolError(OSError):
    """The peer closed the connection or sent something that is not a reply."""


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ProtocolError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def ctrl_request(sock: socket.socket, command: int, payload: bytes = b"", reply_size: int = 4) -> int:
    """Send one control command and return the 4-byte result of its reply."""
    sock.sendall(struct.pack(">I", command) + payload)
    reply = recv_exact(sock, reply_size)
    return int(struct.unpack(">I", reply[:4])[0])


def tpm_command(sock: socket.socket, command: bytes) -> bytes:
    """Send one raw TPM command on a data channel and return the whole response."""
    sock.sendall(command)
    header = recv_exact(sock, 10)
    size = struct.unpack(">I", header[2:6])[0]
    if size < 10 or size > 65536:
        raise ProtocolError(f"a TPM response of {size} bytes is not plausible")
    return header + recv_exact(sock, size - 10)


def tpm_response_code(response: bytes) -> int:
    return int(struct.unpack(">I", response[6:10])[0])
