"""Fixtures for the API tests: the real server (waitress on 127.0.0.1, a free port) over the test engine."""

from __future__ import annotations

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
