"""Fixtures for the API tests: the real server (waitress on 127.0.0.1, a free port) over the test engine."""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import requests

from thalunix.api import ApiServer
from thalunix.engine import DirectEngine


@dataclass
class Api:
    server: ApiServer
    session: requests.Session

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token(self) -> str:
        return self.server.token

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.post(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.patch(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.delete(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)


class EventReader:
    """Reads an SSE stream in a thread; events land in a queue as (event, data)."""

    def __init__(self, api: Api, query: str = "") -> None:
        self.response = api.session.get(api.url + "/api/events" + query, stream=True, timeout=60)
        assert self.response.status_code == 200, self.response.text
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        kind, data = "message", ""
        try:
            for line in self.response.iter_lines(decode_unicode=True):
                if line.startswith(":"):
                    self.events.put(("comment", line))
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                elif line == "" and data:
                    self.events.put((kind, json.loads(data)))
                    kind, data = "message", ""
        except (requests.RequestException, AttributeError):
            pass
        self.events.put(("end", None))

    def next(self, kinds: set[str], timeout: float = 30) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            kind, data = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if kind in kinds or kind == "end":
                return kind, data

    def close(self) -> None:
        self.response.close()


@pytest.fixture
def api(engine: DirectEngine) -> Iterator[Api]:
    """The API over the test's engine, with a session that sends the token as a bearer header."""
    server = ApiServer(engine, heartbeat=1.0).start()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {server.token}"
    try:
        yield Api(server, session)
    finally:
        session.close()
        server.stop()
