"""Runs the local API: waitress on 127.0.0.1, a free port, the guard in front, threads for event streams.

Example::

    server = ApiServer(engine).start()      # port 0: the OS picks a free one
    server.url                               # http://127.0.0.1:43117
    server.launch_url                        # …/?token=…  (the one link that opens the UI)
    server.stop()                            # ends event streams, closes connections; VMs keep running
"""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path
from typing import Any

from waitress.server import create_server

from thalunix.api.app import HEARTBEAT_SECONDS, create_app
from thalunix.api.security import Guard, new_token
from thalunix.engine import DirectEngine
from thalunix.errors import ConflictError, ThalunixError

HOST = "127.0.0.1"
#: Each open event stream holds a thread; the UI keeps one or two open, tests a few more.
THREADS = 24


class ApiServer:
    """The API of one engine, served from a background thread until :meth:`stop`."""

    def __init__(self, engine: DirectEngine, port: int = 0, web_root: Path | None = None,
                 token: str | None = None, heartbeat: float = HEARTBEAT_SECONDS, threads: int = THREADS) -> None:
        self.engine = engine
        self.token = token or new_token()
        self.requested_port = port
        self.closing = threading.Event()
        self.port = 0
        self.app = create_app(engine, self.closing, web_root=web_root, heartbeat=heartbeat)
        self.guard = Guard(self.app, self.token, port=lambda: self.port)
        self.threads = threads
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def launch_url(self) -> str:
        """The link that opens the UI: it carries the token once, then a cookie does."""
        return f"{self.url}/?token={self.token}"

    def start(self) -> "ApiServer":
        try:
            # Bound to 127.0.0.1 only: no other machine, and no other address of this one, reaches it.
            self._server = create_server(self.guard, host=HOST, port=self.requested_port, threads=self.threads,
                                         ident="thalunix", expose_tracebacks=False, clear_untrusted_proxy_headers=True)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConflictError(f"port {self.requested_port} on {HOST} is in use; pick another with --port, "
                                    "or leave it out to take a free one") from None
            raise ThalunixError(f"cannot listen on {HOST}:{self.requested_port}: {error}") from None
        self.port = int(self._server.effective_port)
        self._thread = threading.Thread(target=self._server.run, name="thalunix-api", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End every event stream, close every connection, stop serving."""
        server = self._server
        if server is None:
            return
        self._server = None
        self.closing.set()
        self.engine.bus.publish("api.closing")
        # waitress logs each connection it drops while shutting down; nobody needs those lines.
        logging.getLogger("waitress").setLevel(logging.ERROR)
        server.task_dispatcher.shutdown(timeout=timeout)
        def close_all() -> None:
            # Runs in the server's own loop thread; the loop ends once its socket map is empty.
            for channel in list(server._map.values()):
                try:
                    channel.handle_close()
                except Exception:  # noqa: BLE001 - a channel already gone is what we want
                    pass

        try:
            server.trigger.pull_trigger(close_all)
        except OSError:
            close_all()   # the loop's wake-up pipe is already gone: close from here, the loop ends by its timeout
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "ApiServer":
        return self.start() if self._server is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
