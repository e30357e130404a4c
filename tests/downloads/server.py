"""A small threaded HTTP server on 127.0.0.1 for download tests: files, folder listings, and misbehaviour.

Per path it can cut the connection after N bytes (a number of times), ignore ``Range``, trickle slowly,
answer an error status a number of times, or be missing (404). It logs every request (path, Range,
status) and the highest number of concurrent transfers, so tests can prove what happened on the wire.

Example::

    with FileServer() as server:
        server.add("/iso/a.iso", data, cut_after=1 << 20, cuts=1)
        url = server.url("/iso/a.iso")
"""

from __future__ import annotations

import hashlib
import html
import os
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Resource:
    data: bytes | None = None
    path: Path | None = None            # served from disk (large files) with sendfile
    ranges: bool = True
    cut_after: int | None = None        # close the socket after this many body bytes ...
    cuts: int = 0                       # ... this many times
    rate: float | None = None           # bytes per second (trickle)
    fail_status: int | None = None      # answer this status ...
    fails: int = 0                      # ... this many times
    chunked: bool = False               # no Content-Length
    etag: str = ""
    next_etag: str = ""                 # the file "changes" (new ETag) after the first body was sent

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size  # type: ignore[union-attr]


@dataclass
class LogEntry:
    path: str
    range: str | None
    status: int
    sent: int = 0


class FileServer:
    def __init__(self) -> None:
        self.resources: dict[str, Resource] = {}
        self.log: list[LogEntry] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET(head=True)

            def do_GET(self, head: bool = False) -> None:  # noqa: C901 - a test double with many knobs
                path = self.path.split("?")[0]
                entry = LogEntry(path, self.headers.get("Range"), 0)
                with server._lock:
                    server.log.append(entry)
                if path.endswith("/") and path not in server.resources:
                    names = sorted({p[len(path):].split("/")[0] for p in server.resources if p.startswith(path)
                                    and len(p) > len(path)})
                    if not names:
                        return self._status(entry, 404)
                    body = "".join(f'<a href="{html.escape(n)}">{html.escape(n)}</a>\n' for n in names).encode()
                    body = b"<html><body>\n<a href=\"../\">../</a>\n" + body + b"</body></html>\n"
                    entry.status = 200
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                resource = server.resources.get(path)
                if resource is None:
                    return self._status(entry, 404)
                with server._lock:
                    failing = resource.fails > 0
                    if failing:
                        resource.fails -= 1
                if failing:
                    return self._status(entry, resource.fail_status or 503)
                size = resource.size
                start = 0
                status = 200
                wanted = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if wanted and resource.ranges and (not if_range or if_range == resource.etag):
                    try:
                        start = int(wanted.split("=")[1].split("-")[0])
                    except ValueError:
                        start = 0
                    if start >= size:
                        entry.status = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                entry.status = status
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                if resource.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                if resource.etag:
                    self.send_header("ETag", resource.etag)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                if resource.chunked:
                    self.send_header("Connection", "close")
                else:
                    self.send_header("Content-Length", str(size - start))
                self.end_headers()
                if head:
                    return
                with server._lock:
                    cut = resource.cut_after if resource.cuts > 0 else None
                    if cut is not None:
                        resource.cuts -= 1
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    self._send_body(resource, start, size, cut, entry)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass
                finally:
                    with server._lock:
                        server.active -= 1
                        if resource.next_etag:
                            resource.etag, resource.next_etag = resource.next_etag, ""
                    if resource.chunked or cut is not None:
                        self.close_connection = True

            def _send_body(self, resource: Resource, start: int, size: int, cut: int | None,
                           entry: LogEntry) -> None:
                end = size if cut is None else min(size, start + cut)
                if resource.rate is None and resource.path is not None and cut is None:
                    with open(resource.path, "rb") as handle:
                        self.wfile.flush()
                        entry.sent = self.connection.sendfile(handle, start, end - start)
                    return
                position = start
                step = 64 * 1024 if resource.rate is None else max(1, int(resource.rate / 20))
                with open(resource.path, "rb") if resource.path is not None else _null() as handle:
                    while position < end:
                        if server.closing.is_set():
                            break
                        count = min(step, end - position)
                        if resource.data is not None:
                            block = resource.data[position:position + count]
                        else:
                            handle.seek(position)
                            block = handle.read(count)
                        self.wfile.write(block)
                        self.wfile.flush()
                        position += len(block)
                        entry.sent += len(block)
                        if resource.rate is not None:
                            time.sleep(len(block) / resource.rate)
                if cut is not None and position < size:
                    # A hard cut: reset, as a dropped link or a killed proxy would look.
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _status(self, entry: LogEntry, code: int) -> None:
                entry.status = code
                body = f"{code}\n".encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, data: bytes | None = None, file: Path | None = None, **options: Any) -> Resource:
        resource = Resource(data=data, path=file, **options)
        if not resource.etag:
            resource.etag = '"' + hashlib.sha1(str((path, resource.size)).encode()).hexdigest()[:16] + '"'
        self.resources[path] = resource
        return resource

    def requests_for(self, path: str) -> list[LogEntry]:
        with self._lock:
            return [entry for entry in self.log if entry.path == path]


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def random_bytes(size: int, seed: int = 1) -> bytes:
    """Deterministic incompressible-enough bytes, fast (os.urandom for big sizes is fine too)."""
    if size > (1 << 20):
        return os.urandom(size)
    import random
    return random.Random(seed).randbytes(size)
