"""Shared fixtures: a fresh data folder per test, the real test guest, and an engine that leaves no VM behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from thalunix.engine import CreateOptions, DirectEngine
from thalunix.qemu import process

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def pytest_configure(config: pytest.Config) -> None:
    # Tests never use the developer's own data folder.
    os.environ.pop("THALUNIX_DATA", None)
    os.environ.pop("THALUNIX_RUNTIME", None)


@pytest.fixture(scope="session")
def guest():
    """The real test guest (kernel + busybox, BIOS/UEFI ISO), built from Debian packages once and cached."""
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed; run `python3 build.py test`")
    from guest.build import ensure_guest
    return ensure_guest()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def _kill_leftovers(data_dir: Path) -> None:
    """Whatever a failing test left running dies here, so one failure cannot cascade."""
    import json
    for state in data_dir.glob("vms/*/run/state.json"):
        try:
            record = json.loads(state.read_text())
            process.kill(int(record["pid"]), str(record.get("token", "")))
        except (OSError, ValueError, KeyError):
            pass


@pytest.fixture
def engine(data_dir: Path) -> Iterator[DirectEngine]:
    engine = DirectEngine.open(data_dir)
    yield engine
    try:
        engine.close(stop_vms=False)
    finally:
        _kill_leftovers(data_dir)


@pytest.fixture
def make_vm(engine: DirectEngine, guest):
    """Create a small VM booting the test guest ISO; keyword arguments override CreateOptions."""
    def make(name: str = "guest", **overrides):
        options = dict(name=name, iso=str(guest.iso), ram="256M", cpus=1, firmware="bios", tpm="off")
        options.update(overrides)
        return engine.create(CreateOptions(**options))
    return make


from chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright, one for the whole session.

    One instance only: Playwright's sync API runs its loop on the main thread, so a second
    ``sync_playwright()`` while this one is open fails ("Sync API inside the asyncio loop").
    """
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing; run `python3 build.py setup` (it installs the chromium package)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()

