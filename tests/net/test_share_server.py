"""The WebDAV server on its own (no guest): methods over one kept-open stream, as QEMU's guestfwd delivers
them, path confinement, malformed requests."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from thalunix.share import ShareServer


class Stream:
    """One connection carrying requests back to back, like guestfwd's chardev."""

    def __init__(self, server: ShareServer) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(server.unix_path)
        self.reader = self.sock.makefile("rb")

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        lines = [f"{method} {path} HTTP/1.1", "Host: 10.0.2.100", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return self.response(method)

    def response(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        status = int(self.reader.readline().split()[1])
        headers = {}
        while True:
            line = self.reader.readline().decode().strip()
            if not line:
                break
            key, _, value = line.partition(":")
            headers[key.lower()] = value.strip()
        length = int(headers.get("content-length", 0))
        return status, headers, self.reader.read(length) if method != "HEAD" else b""


@pytest.fixture
def served(tmp_path: Path):
    root = tmp_path / "shared"
    root.mkdir()
    server = ShareServer(root, unix_path=str(tmp_path / "share.sock"))
    yield root, server
    server.close()


def test_methods_back_to_back_on_one_stream(served) -> None:
    root, server = served
    stream = Stream(server)
    data = bytes(range(256)) * 4000   # NUL bytes and all
    assert stream.request("PUT", "/a.bin", data)[0] == 201
    assert stream.request("PUT", "/a.bin", data[::-1])[0] == 204
    assert stream.request("GET", "/a.bin")[2] == data[::-1]
    status, headers, _ = stream.request("HEAD", "/a.bin")
    assert status == 200 and headers["content-length"] == str(len(data))
    assert stream.request("MKCOL", "/docs")[0] == 201
    assert stream.request("MKCOL", "/docs")[0] == 405
    assert stream.request("PUT", "/missing/x.txt", b"x")[0] == 409
    assert stream.request("POST", "/docs/n%20ote.txt", b"hi", {"X-HTTP-Method-Override": "PUT"})[0] == 201
    assert (root / "docs" / "n ote.txt").read_bytes() == b"hi"
    status, _, body = stream.request("PROPFIND", "/", headers={"Depth": "1"})
    assert status == 207 and b"<D:href>/docs/</D:href>" in body and b"<D:getcontentlength>1024000<" in body
    assert stream.request("DELETE", "/docs")[0] == 204 and not (root / "docs").exists()
    assert stream.request("DELETE", "/docs")[0] == 404
    assert stream.request("DELETE", "/")[0] == 403
    assert stream.request("OPTIONS", "/")[1]["allow"].startswith("OPTIONS")
    assert stream.request("PATCH", "/a.bin", b"zz")[0] == 405
    assert stream.request("GET", "/a.bin")[2] == data[::-1]   # the stream stayed in step after errors with bodies
    assert server.requests >= 12


def test_paths_stay_inside_the_folder(served, tmp_path: Path) -> None:
    root, server = served
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    os.symlink(tmp_path, root / "escape")
    stream = Stream(server)
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/a/../../secret.txt", "/link.txt", "/escape/secret.txt",
                 "/C:/secret.txt"):
        status, _, body = stream.request("GET", path)
        assert status == 403 and b"outside" not in body, path
    assert stream.request("PUT", "/escape/new.txt", b"no")[0] == 403
    assert not (tmp_path / "new.txt").exists()


def test_malformed_requests_are_answered_and_end_the_stream(served) -> None:
    _, server = served
    stream = Stream(server)
    stream.sock.sendall(b"NONSENSE\r\n\r\n")
    assert stream.response()[0] == 400
    assert stream.reader.read() == b""   # closed: past garbage the stream cannot be trusted
    stream = Stream(server)
    stream.sock.sendall(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert stream.response()[0] == 411
    stream = Stream(server)
    stream.sock.sendall(b"PUT /x HTTP/1.1\r\nContent-Length: ten\r\n\r\n")
    assert stream.response()[0] == 400
