"""TPM test fixtures: the helper VM image (built from Debian packages once, cached) and tpm2-tools."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="session")
def helper_image() -> Path:
    """A complete helper image folder: the checkout's cached build, built now if missing."""
    spec = importlib.util.spec_from_file_location("helper_vm_build", REPO / "helper-vm" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.ensure_helper_image())


@pytest.fixture(scope="session")
def tpm2_tools() -> dict[str, str]:
    missing = [tool for tool in ("tpm2_startup", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"tpm2-tools is not installed ({', '.join(missing)}); run `python3 build.py setup`")
    return {}


# The UI tests' fixtures (the real API server and Debian's Chromium through Playwright), for test_ui_tpm.py.
from ui.conftest import browser, ui, ui_server  # noqa: E402,F401
