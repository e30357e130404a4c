"""The TPM in the interface, in headless Chromium over the real API: a UEFI VM whose TPM comes from the helper
micro-VM shows the helper's console in its log panel while it starts (the issue's "its log shows in the VM's
console panel"), the details name the backend in use and its port, and stopping the VM ends the helper.
Screenshots: tests/artifacts/ui/tpm-helper-log-*.png.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tpm.support import wait_no_processes
from thalunix.engine import DirectEngine

pytestmark = pytest.mark.qemu

LOG_TEXT = "() => document.querySelector('#log-text')?.textContent ?? ''"


def test_helper_console_in_the_log_panel(ui, engine: DirectEngine, make_vm, data_dir: Path,
                                         helper_image: Path) -> None:
    config = make_vm("helped", firmware="uefi", tpm="helper")
    page = ui.page
    ui.open(f"#/vm/{config.id}/details")
    page.click("#tab-logs")
    page.wait_for_selector("#log-text")
    page.click("#action-start")
    # Lines arrive through the event stream as the helper prints them, before QEMU of the VM itself starts.
    page.wait_for_function(f"() => ({LOG_TEXT})().includes('THALUNIX-HELPER: starting swtpm')", timeout=120_000)
    ui.wait_state("helped", "running", timeout=120)
    page.wait_for_function(f"() => /TPM: helper VM on 127\\.0\\.0\\.1:\\d+/.test(({LOG_TEXT})())")
    text = page.evaluate(LOG_TEXT)
    assert text.index("THALUNIX-HELPER: starting swtpm") < text.index("TPM: helper VM on 127.0.0.1")
    ui.shoot("tpm-helper-log")

    # The details say which backend "helper" (or "auto") is using, and where.
    assert engine.status("helped")["tpm"]["backend"] == "helper"
    page.click("#tab-details")
    page.wait_for_function("() => [...document.querySelectorAll('table.details tr')].some(row => "
                           "row.textContent.includes('in use: swtpm in the helper VM, on 127.0.0.1:'))")
    ui.shoot("tpm-helper-details", themes=("light",))

    page.click("#action-force")                  # the guest is not waited for: the helper's end is the point
    page.wait_for_selector("dialog#confirm[open]")
    page.click("#confirm-ok")
    ui.wait_state("helped", "stopped", timeout=120)
    assert engine.supervisor.tpm.wait_released(config)
    assert wait_no_processes(data_dir) == []
    assert ui.errors == []
