"""Firmware test fixtures: the Secure Boot test ISO (Debian's signed shim, grub and kernel), built once and cached."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def secureboot_iso(guest):
    from guest.secureboot import ensure_secureboot_iso
    return ensure_secureboot_iso().iso


# The UI tests' fixtures (the real API server and Debian's Chromium through Playwright), for test_ui_firmware.py.
from ui.conftest import browser, ui, ui_server  # noqa: E402,F401
