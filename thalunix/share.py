"""A host folder shared with one guest over WebDAV, on every host OS and without admin rights.

QEMU on Windows has neither 9p nor virtiofs, so the share is plain HTTP: Thalunix serves a minimal
WebDAV server (GET, HEAD, PUT, DELETE, MKCOL, PROPFIND, OPTIONS) for the VM's ``shared_folder``, and
QEMU's user networking forwards the guest's connections to ``10.0.2.100:80`` to it (``guestfwd``).
Nothing listens on the network: on Linux and macOS the server is a UNIX socket in the VM's ``run/``
folder, on Windows a TCP port on 127.0.0.1; the guest is the only machine that can reach the address.

QEMU's ``guestfwd`` carries every guest connection over one stream to the server, one after another,
so the server reads requests back to back from that stream, answers each with a ``Content-Length``
and never closes it (HTTP/1.1 keep-alive semantics). A client without PUT (busybox wget) may send
``POST`` with ``X-HTTP-Method-Override: PUT`` (or DELETE, MKCOL). Paths are confined to the folder:
``..``, absolute paths and symlinks leading out are refused.

Example (in a Linux guest)::

    wget -O - http://10.0.2.100/notes.txt
    wget -O - --header 'X-HTTP-Method-Override: PUT' --post-file report.txt http://10.0.2.100/report.txt
    # or mount it: mount -t davfs http://10.0.2.100/ /mnt/host ; Windows: net use Z: http://10.0.2.100/

and on the host::

    share.serve_for(data, config)   # a server process, started by the runner before QEMU; its Endpoint
"""

from __future__ import annotations

import contextlib
import email.utils
import html
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from thalunix.errors import ThalunixError, ValidationError
from thalunix.model import VMConfig
from thalunix.store import DataFolder

if TYPE_CHECKING:
    from thalunix.qemu.argv import Endpoint

#: the URL the guest uses
GUEST_URL = "http://10.0.2.100/"
_MAX_HEADER = 64 * 1024
_CHUNK = 1 << 16
_OVERRIDABLE = ("PUT", "DELETE", "MKCOL")


class ShareError(ThalunixError):
    code = "share"
    http_status = 400


class _HttpError(Exception):
    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.status, self.reason = status, reason


def confine(root: Path, url_path: str) -> Path:
    """The file for ``url_path`` inside ``root``; :class:`_HttpError` 403 if it would lead outside."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path)
    if "\x00" in path or "\\" in path:
        raise _HttpError(400, "Bad Request", "bad characters in the path")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if any(part == ".." for part in parts) or any(":" in part for part in parts):
        raise _HttpError(403, "Forbidden", "the path leads out of the shared folder")
    target = root.joinpath(*parts) if parts else root
    real_root = os.path.realpath(root)
    real = os.path.realpath(target)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise _HttpError(403, "Forbidden", "the path leads out of the shared folder")
    return target


class _Connection:
    """One stream from QEMU: HTTP requests back to back, each answered with a Content-Length."""

    def __init__(self, server: "ShareServer", sock: socket.socket) -> None:
        self.server, self.sock = server, sock
        self.reader: IO[bytes] = sock.makefile("rb")

    def run(self) -> None:
        try:
            while not self.server.closed and self.handle_one():
                pass
        except (OSError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(OSError):
                self.reader.close()
                self.sock.close()

    def _read_head(self) -> tuple[str, str, dict[str, str]] | None:
        line = self.reader.readline(_MAX_HEADER)
        while line in (b"\r\n", b"\n"):
            line = self.reader.readline(_MAX_HEADER)
        if not line:
            return None
        words = line.decode("latin-1").split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            raise _HttpError(400, "Bad Request", "malformed request line")
        headers: dict[str, str] = {}
        size = len(line)
        while True:
            header = self.reader.readline(_MAX_HEADER)
            size += len(header)
            if not header or size > _MAX_HEADER:
                raise _HttpError(400, "Bad Request", "headers too long or cut off")
            if header in (b"\r\n", b"\n"):
                break
            key, _, value = header.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        return words[0].upper(), words[1], headers

    def handle_one(self) -> bool:
        try:
            head = self._read_head()
        except _HttpError as error:
            self.respond(error.status, error.reason, str(error).encode())
            return False   # the stream cannot be trusted past a malformed request
        if head is None:
            return False
        method, target, headers = head
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.respond(411, "Length Required", b"send a Content-Length")
            return False
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            self.respond(400, "Bad Request", b"bad Content-Length")
            return False
        override = headers.get("x-http-method-override", "").upper()
        if method == "POST" and override in _OVERRIDABLE:
            method = override
        try:
            self.dispatch(method, target, headers, length)
        except _HttpError as error:
            self._discard(length)
            self.respond(error.status, error.reason, (str(error) + "\n").encode())
        except OSError as error:
            self._discard(length)
            self.respond(500, "Internal Server Error", f"{error.strerror or error}\n".encode())
        return True

    def _discard(self, length: int) -> None:
        # The body may have been read already (PUT); _remaining tracks what is left of it.
        left = getattr(self, "_remaining", length)
        while left > 0:
            chunk = self.reader.read(min(_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
        self._remaining = 0

    def respond(self, status: int, reason: str, body: bytes = b"", headers: dict[str, str] | None = None,
                stream: IO[bytes] | None = None, length: int | None = None, head_only: bool = False) -> None:
        size = len(body) if stream is None else int(length or 0)
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {size}", "Server: thalunix-share",
                 f"Date: {email.utils.formatdate(usegmt=True)}", "DAV: 1"]
        for key, value in (headers or {}).items():
            lines.append(f"{key}: {value}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if head_only:
            return
        if stream is None:
            self.sock.sendall(body)
            return
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            self.sock.sendall(chunk)

    def dispatch(self, method: str, target: str, headers: dict[str, str], length: int) -> None:
        self._remaining = length
        root = self.server.root
        path = confine(root, target)
        self.server.requests += 1
        if method in ("GET", "HEAD"):
            if path.is_dir():
                self._discard(length)
                body = self._listing(root, path).encode()
                self.respond(200, "OK", body, {"Content-Type": "text/html; charset=utf-8"}, head_only=method == "HEAD")
                return
            if not path.is_file():
                raise _HttpError(404, "Not Found", f"{target} is not in the shared folder")
            self._discard(length)
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                self.respond(200, "OK", headers={"Content-Type": "application/octet-stream",
                                                 "Last-Modified": email.utils.formatdate(path.stat().st_mtime,
                                                                                         usegmt=True)},
                             stream=handle, length=size, head_only=method == "HEAD")
            return
        if method == "PUT":
            if path == root or path.is_dir():
                raise _HttpError(409, "Conflict", f"{target} is a folder")
            if not path.parent.is_dir():
                raise _HttpError(409, "Conflict", "the parent folder does not exist (MKCOL it first)")
            existed = path.exists()
            fd, temp = tempfile.mkstemp(prefix=".thalunix-put-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    left = length
                    while left > 0:
                        chunk = self.reader.read(min(_CHUNK, left))
                        if not chunk:
                            raise _HttpError(400, "Bad Request", "the body ended early")
                        out.write(chunk)
                        left -= len(chunk)
                        self._remaining = left
                os.replace(temp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            self.respond(204 if existed else 201, "No Content" if existed else "Created")
            return
        self._discard(length)
        if method == "DELETE":
            if path == root:
                raise _HttpError(403, "Forbidden", "the shared folder itself cannot be deleted")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                raise _HttpError(404, "Not Found", f"{target} is not in the shared folder")
            self.respond(204, "No Content")
        elif method == "MKCOL":
            if path.exists():
                raise _HttpError(405, "Method Not Allowed", f"{target} exists already")
            if not path.parent.is_dir():
                raise _HttpError(409, "Conflict", "the parent folder does not exist")
            path.mkdir()
            self.respond(201, "Created")
        elif method == "PROPFIND":
            if not path.exists():
                raise _HttpError(404, "Not Found", f"{target} is not in the shared folder")
            depth = headers.get("depth", "1")
            items = [path] + (sorted(path.iterdir()) if path.is_dir() and depth != "0" else [])
            body = self._multistatus(root, items).encode()
            self.respond(207, "Multi-Status", body, {"Content-Type": 'application/xml; charset="utf-8"'})
        elif method == "OPTIONS":
            self.respond(200, "OK", headers={"Allow": "OPTIONS, GET, HEAD, PUT, DELETE, MKCOL, PROPFIND"})
        else:
            raise _HttpError(405, "Method Not Allowed", f"{method} is not supported here")

    @staticmethod
    def _href(root: Path, path: Path) -> str:
        relative = path.relative_to(root).as_posix() if path != root else ""
        href = "/" + urllib.parse.quote(relative)
        return href + "/" if path.is_dir() and not href.endswith("/") else href

    def _listing(self, root: Path, folder: Path) -> str:
        rows = "".join(f'<li><a href="{html.escape(self._href(root, child))}">{html.escape(child.name)}'
                       f'{"/" if child.is_dir() else ""}</a></li>\n' for child in sorted(folder.iterdir()))
        return f"<!doctype html><title>{html.escape(self._href(root, folder))}</title><ul>\n{rows}</ul>\n"

    def _multistatus(self, root: Path, items: list[Path]) -> str:
        parts = ['<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus xmlns:D="DAV:">']
        for item in items:
            stat = item.stat()
            kind = "<D:resourcetype><D:collection/></D:resourcetype>" if item.is_dir() else "<D:resourcetype/>"
            size = "" if item.is_dir() else f"<D:getcontentlength>{stat.st_size}</D:getcontentlength>"
            parts.append(f"<D:response><D:href>{escape(self._href(root, item))}</D:href><D:propstat><D:prop>"
                         f"<D:displayname>{escape(item.name)}</D:displayname>{kind}{size}"
                         f"<D:getlastmodified>{email.utils.formatdate(stat.st_mtime, usegmt=True)}"
                         "</D:getlastmodified></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat>"
                         "</D:response>")
        parts.append("</D:multistatus>\n")
        return "".join(parts)


class ShareServer:
    """Serves one folder on a UNIX socket path or a 127.0.0.1 port, one thread per stream."""

    def __init__(self, root: Path, unix_path: str = "", port: int = 0) -> None:
        self.root = Path(root)
        self.closed = False
        self.requests = 0
        if unix_path:
            with contextlib.suppress(OSError):
                os.unlink(unix_path)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            folder_fd = -1
            address = unix_path
            if len(unix_path) >= 100:
                # A deep data folder overflows sun_path; the folder's descriptor reaches the same place.
                folder_fd = os.open(os.path.dirname(unix_path), os.O_RDONLY)
                address = f"/proc/self/fd/{folder_fd}/{os.path.basename(unix_path)}"
            try:
                self.listener.bind(address)
                os.chmod(address, 0o600)
            finally:
                if folder_fd >= 0:
                    os.close(folder_fd)
        else:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.listener.bind(("127.0.0.1", port))
            except OSError:
                self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.unix_path = unix_path
        self.port = 0 if unix_path else int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True, name="thalunix-share").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=_Connection(self, sock).run, daemon=True, name="thalunix-share-conn").start()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        if self.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)


def folder_of(data: DataFolder, config: VMConfig) -> Path:
    folder = data.resolve(config.shared_folder)
    if not folder.is_dir():
        raise ShareError(f"{config.label}: shared folder {folder} does not exist or is not a folder; create it or "
                         "choose another (`thalunix vm share NAME FOLDER`)")
    return folder


# The server runs in a process of its own (like QEMU and the network switch): a VM started from a one-shot
# `thalunix vm start` keeps its share after that command has ended. It serves until the VM's QEMU is gone.
SERVER_GRACE = 60.0
SERVER_CHECK = 2.0


def _record(data: DataFolder, config: VMConfig) -> Path:
    return data.vm_path(config.id, "run", "share.json")


def _server_running(data: DataFolder, config: VMConfig) -> bool:
    from thalunix.store import FileLock
    lock = FileLock(data.vm_path(config.id, "run", "share.lock"))
    if lock.acquire():
        lock.release()
        return False
    return True


def _helper_command(data: DataFolder, config: VMConfig) -> list[str]:
    if getattr(sys, "frozen", False):
        return [sys.executable, "--data-dir", str(data.root), "net", "serve-share", config.id]
    return [sys.executable, "-m", "thalunix", "--data-dir", str(data.root), "net", "serve-share", config.id]


def serve_for(data: DataFolder, config: VMConfig, timeout: float = 20.0) -> "Endpoint":
    """Start the VM's share server process (or keep the one serving this folder); the endpoint for guestfwd."""
    from thalunix.qemu import process
    from thalunix.qemu.argv import Endpoint
    folder_of(data, config)   # a missing folder fails here, before any server starts
    record_path = _record(data, config)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record = data.read_json(record_path, {}) or {}
    if _server_running(data, config):
        # A server left from the VM's previous run may be about to leave with it: always start afresh.
        with contextlib.suppress(Exception):
            process.kill(int(record["pid"]), str(record.get("token", "")))
        deadline = time.monotonic() + 10
        while _server_running(data, config) and time.monotonic() < deadline:
            time.sleep(0.05)
    log_path = data.vm_path(config.id, "logs", "share.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = process.spawn_own(_helper_command(data, config), log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = data.read_json(record_path, {}) or {}
        if record.get("pid") == proc.pid and record.get("ready"):
            return Endpoint.tcp(int(record["port"])) if record.get("port") else Endpoint.unix("share.sock")
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    with contextlib.suppress(OSError):
        proc.kill()
    tail = log_path.read_text(errors="replace")[-400:] if log_path.exists() else ""
    raise ShareError(f"{config.label}: the shared folder's server did not start ({tail.strip() or 'no output'}); "
                     f"see {log_path}")


def serve_share(data: DataFolder, vm_id: str) -> int:
    """The share process's body (``thalunix net serve-share VMID``): serve until the VM's QEMU is gone."""
    from thalunix.qemu import process
    from thalunix.store import FileLock, atomic_write_json
    entry = data.read_vm(vm_id)
    if entry.config is None:
        raise ShareError(f"VM {vm_id}: {entry.error}")
    config = entry.config
    lock = FileLock(data.vm_path(config.id, "run", "share.lock"))
    if not lock.acquire():
        return 0
    try:
        folder = folder_of(data, config)
        record_path = _record(data, config)
        previous = data.read_json(record_path, {}) or {}
        if hasattr(socket, "AF_UNIX") and os.name != "nt":
            server = ShareServer(folder, unix_path=str(data.vm_path(config.id, "run", "share.sock")))
        else:
            server = ShareServer(folder, port=int(previous.get("port", 0) or 0))
        token = process.start_token(os.getpid())
        written = -1

        def publish(ready: bool = True) -> None:
            atomic_write_json(record_path, {"pid": os.getpid(), "token": token, "folder": str(folder),
                                            "port": server.port, "url": GUEST_URL, "ready": ready,
                                            "requests": server.requests}, durable=False)
        publish()
        started = time.monotonic()
        seen = False
        while True:
            time.sleep(SERVER_CHECK)
            if server.requests != written:
                written = server.requests
                publish()
            state = data.read_json(data.vm_path(config.id, "run", "state.json"), {}) or {}
            alive = bool(state) and process.is_alive(int(state.get("pid", 0) or 0), str(state.get("token", "")))
            seen = seen or alive
            if not alive and (seen or time.monotonic() - started > SERVER_GRACE):
                server.close()
                return 0
    finally:
        lock.release()


def resume_for(data: DataFolder, config: VMConfig) -> None:
    """A running VM whose share server died: start it again where QEMU's guestfwd reconnects."""
    if config.shared_folder and not _server_running(data, config):
        with contextlib.suppress(ThalunixError, OSError):
            serve_for(data, config)


def set_folder(engine: Any, name: str, folder: str | None) -> dict[str, Any]:
    """Share ``folder`` with VM ``name`` (None or "" stops sharing); takes effect at the next start."""
    config = engine.get(name)
    if folder:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValidationError(f"{config.label}: {folder!r} is not a folder; give an existing folder to share",
                                  "shared_folder")
        stored = engine.data.to_stored_path(path.absolute())
    else:
        stored = ""
    if engine.supervisor.status(config)["state"] not in ("stopped", "crashed"):
        raise ValidationError(f"{config.label} is running; the shared folder can be changed while it is stopped",
                              "shared_folder")
    updated = engine.edit(name, {"shared_folder": stored})
    return info(engine, updated.name)


def info(engine: Any, name: str) -> dict[str, Any]:
    config = engine.get(name)
    active = bool(config.shared_folder) and _server_running(engine.data, config)
    record = engine.data.read_json(_record(engine.data, config), {}) or {}
    return {"vm": config.name, "folder": str(engine.data.resolve(config.shared_folder)) if config.shared_folder
            else None, "guest_url": GUEST_URL if config.shared_folder else None, "serving": active,
            "requests": int(record.get("requests", 0)) if active else 0}
