"""Fixtures for the UI tests: the real API server over the test engine, and Debian's Chromium driven by Playwright.

The browser is the system's ``/usr/bin/chromium`` (apt package ``chromium``); Playwright's own browser
download is never used. Screenshots go to ``tests/artifacts/ui/``.

Example::

    def test_empty(ui):
        ui.open()
        ui.page.get_by_text("No VMs yet").wait_for()
        ui.shoot("empty")            # empty-light.png and empty-dark.png
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from thalunix.api import ApiServer
from thalunix.engine import DirectEngine

from chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: E402,F401 - one Chromium for every test folder
WEB = Path(__file__).resolve().parents[2] / "web"
SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"


def _require_web() -> None:
    if not (WEB / "node_modules" / "@novnc" / "novnc" / "core" / "rfb.js").is_file():
        pytest.fail("web/node_modules is missing; run `python3 build.py setup` (it runs `npm ci` in web/)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing; run `python3 build.py setup` (it installs the chromium package)")


@pytest.fixture(scope="session")
def browser(browser: Any) -> Any:
    """The session's Chromium (tests/conftest.py), once the UI's npm packages are known to be there."""
    _require_web()
    return browser


@dataclass
class Ui:
    server: ApiServer
    page: Any
    #: Uncaught exceptions and console errors of the page: a test ends by checking there are none.
    errors: list[str] = field(default_factory=list)

    def open(self, hash_: str = "") -> None:
        self.page.goto(self.server.launch_url + hash_)
        # The stream's ready event marks the page live: from then on every state change reaches it.
        self.page.wait_for_selector('#connection[data-state="live"]')

    def shoot(self, name: str, themes: tuple[str, ...] = ("light", "dark")) -> list[Path]:
        """Screenshots of the page as it is, in each theme, switched with the page's own theme menu."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        before = self.page.eval_on_selector("#theme", "select => select.value")
        paths = []
        for theme in themes:
            self.page.select_option("#theme", theme)
            self.page.wait_for_function("t => document.documentElement.dataset.theme === t", arg=theme)
            path = SHOTS / f"{name}-{theme}.png"
            self.page.screenshot(path=str(path))
            paths.append(path)
        self.page.select_option("#theme", before)
        return paths

    def state_of(self, name: str) -> str:
        return self.page.get_attribute(f'.vm-entry[data-name="{name}"] .badge', "data-state") or ""

    def wait_state(self, name: str, state: str, timeout: float = 120) -> None:
        self.page.wait_for_selector(f'.vm-entry[data-name="{name}"] .badge[data-state="{state}"]',
                                    timeout=timeout * 1000)


@pytest.fixture
def ui_server(engine: DirectEngine) -> Iterator[ApiServer]:
    server = ApiServer(engine, heartbeat=5.0).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ui(browser: Any, ui_server: ApiServer) -> Iterator[Ui]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(30_000)
    harness = Ui(ui_server, page)
    page.on("pageerror", lambda error: harness.errors.append(f"uncaught: {error}"))
    page.on("console", lambda message: harness.errors.append(f"console: {message.text}")
            if message.type == "error" and not _expected_console_error(message.text) else None)
    try:
        yield harness
    finally:
        context.close()


def _expected_console_error(text: str) -> bool:
    # The browser logs every failed request by itself; the tests make some on purpose (a 4xx the page shows).
    return "Failed to load resource" in text
