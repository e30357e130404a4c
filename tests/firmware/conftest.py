"""Firmware test fixtures: the Secure Boot test ISO (Debian's signed shim, grub and kernel), built once and cached."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def secureboot_iso(guest):
    from guest.secureboot import ensure_secureboot_iso
    return ensure_secureboot_iso().iso
