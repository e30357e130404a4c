"""The UI's files are served with the types browsers insist on, whatever the host's MIME registry says.

On Windows, Python's ``mimetypes`` reads ``.js`` from the registry, where other software may have put
``text/plain``; Chromium/WebView2 then refuse to run the page's ES modules and the window stays blank.
The test plays that registry by changing ``mimetypes``' table in this process.

Run: .venv/bin/python -m pytest tests/ui/test_static_types.py -q
"""

from __future__ import annotations

import mimetypes

import pytest
import requests

from thalunix.api import ApiServer

FILES = {
    "/js/app.js": "text/javascript",
    "/vendor/@novnc/novnc/core/rfb.js": "text/javascript",
    "/vendor/@xterm/xterm/lib/xterm.mjs": "text/javascript",
    "/vendor/@xterm/xterm/css/xterm.css": "text/css",
    "/css/app.css": "text/css",
    "/": "text/html",
}


@pytest.fixture
def windows_like_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    mimetypes.init()
    for table in (mimetypes.types_map, mimetypes._db.types_map[True]):  # type: ignore[attr-defined]
        monkeypatch.setitem(table, ".js", "text/plain")
        monkeypatch.setitem(table, ".mjs", "text/plain")
        monkeypatch.setitem(table, ".css", "text/plain")
    assert mimetypes.guess_type("x.js")[0] == "text/plain"


def test_ui_files_keep_their_types(ui_server: ApiServer, windows_like_registry: None) -> None:
    headers = {"Authorization": f"Bearer {ui_server.token}"}
    for path, wanted in FILES.items():
        answer = requests.get(ui_server.url + path, headers=headers, timeout=30)
        assert answer.status_code == 200, path
        assert answer.headers["Content-Type"].split(";")[0] == wanted, path
