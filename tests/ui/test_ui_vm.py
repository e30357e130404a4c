"""A beginner's whole path through the interface with the real test guest: create it from its ISO with the form,
start it, read its serial console and type into it, see its screen through noVNC, pause and resume it, stop it,
delete it. Real server, real QEMU, real Chromium; screenshots of every step in both themes.

Run: .venv/bin/python -m pytest tests/ui/test_ui_vm.py -q
"""

from __future__ import annotations

import time

import pytest

from thalunix.engine import DirectEngine

pytestmark = pytest.mark.qemu

READY = "THALUNIX-GUEST-READY"
PROMPT = "thalunix-guest:/# "
BOOT_TIMEOUT = 240   # TCG on a shared 2-core machine

# The terminal's text as xterm.js draws it (its DOM renderer: one div per row).
TERMINAL_ROWS = "() => [...document.querySelectorAll('#terminal .xterm-rows > div')].map(row => row.textContent)"
CANVAS_COLOURS = """() => {
    const canvas = document.querySelector('#screen canvas');
    if (!canvas || !canvas.width || !canvas.height) return 0;
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const colours = new Set();
    const step = 4 * 97;   // a sample of pixels spread over the whole screen is enough
    for (let i = 0; i < pixels.length && colours.size < 50; i += step) {
        colours.add((pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2]);
    }
    return colours.size;
}"""


def _wait_terminal(page, predicate: str, timeout: float) -> None:
    page.wait_for_function(f"() => ({TERMINAL_ROWS})().some(row => {predicate})", timeout=timeout * 1000)


def test_beginner_runs_a_vm_from_the_window(ui, guest, engine: DirectEngine) -> None:
    page = ui.page
    ui.open()
    page.get_by_role("heading", name="No VMs yet — create one").wait_for()

    # -- create it through the form ------------------------------------------------------------------
    page.click("#empty-create")
    page.wait_for_selector("#vm-form")
    page.fill("#iso", str(guest.iso))
    page.fill("#name", "ui-guest")
    page.fill("#disk-size", "64M")
    page.fill("#ram", "256M")
    page.fill("#cpus", "1")
    page.select_option("#firmware", "bios")
    page.select_option("#tpm", "off")
    page.click("#add-forward")        # left empty: an empty row is no forward
    ui.shoot("10-create-form")
    page.click("#save")
    page.wait_for_selector("table.details")
    config = engine.get("ui-guest")
    assert (config.ram_mib, config.cpus, config.firmware, config.tpm) == (256, 1, "bios", "off")
    assert engine.data.resolve(config.cdroms[0].path) == guest.iso
    assert len(config.disks) == 1 and engine.data.resolve(config.disks[0].path).is_file()
    assert config.nics[0].forwards == []
    assert ui.state_of("ui-guest") == "stopped"
    ui.shoot("11-created")

    # -- start it; watch the serial console ---------------------------------------------------------
    page.click("#tab-console")
    page.wait_for_selector("#terminal .xterm-rows")
    page.click("#action-start")
    ui.wait_state("ui-guest", "running", timeout=120)
    page.wait_for_selector("#action-stop:enabled")   # once the start request has returned too
    assert page.is_disabled("#action-start")
    _wait_terminal(page, f"row.includes('{READY}')", BOOT_TIMEOUT)
    page.click("#terminal")
    page.keyboard.press("Enter")
    _wait_terminal(page, f"row.startsWith('{PROMPT.strip()}')", 60)
    page.keyboard.type("echo $((6*7))")
    page.keyboard.press("Enter")
    _wait_terminal(page, "row.trim() === '42'", 60)
    rows = page.evaluate(TERMINAL_ROWS)
    assert any("echo $((6*7))" in row for row in rows)   # the guest echoed what was typed
    ui.shoot("12-console")

    # -- its screen through noVNC, and its thumbnail in the list ---------------------------------------
    page.click("#tab-screen")
    page.wait_for_selector('#screen-status[data-state="connected"]', timeout=60_000)
    page.wait_for_function(f"() => ({CANVAS_COLOURS})() > 1", timeout=60_000)
    colours = page.evaluate(CANVAS_COLOURS)
    page.wait_for_function(
        "() => { const img = document.querySelector('.vm-entry[data-name=\"ui-guest\"] img.thumb');"
        " return img && img.complete && img.naturalWidth > 0; }", timeout=60_000)
    ui.shoot("13-screen")

    # -- pause and resume, from the window and from another front ------------------------------------
    page.click("#action-pause")
    ui.wait_state("ui-guest", "paused", timeout=30)
    assert page.is_enabled("#action-resume") and page.is_disabled("#action-pause")
    assert page.is_disabled("#action-stop") and page.is_enabled("#action-force")
    ui.shoot("14-paused")
    page.click("#action-resume")
    ui.wait_state("ui-guest", "running", timeout=30)

    # -- the logs, appended live; another front pausing the VM shows up in its state and its log --------
    page.click("#tab-logs")
    page.wait_for_function("() => document.querySelector('#log-text')?.textContent.includes('QMP event STOP')")
    stops = "() => document.querySelector('#log-text').textContent.split('QMP event STOP').length - 1"
    before = page.evaluate(stops)
    engine.pause("ui-guest")          # as the CLI would: the page hears it from the event stream
    ui.wait_state("ui-guest", "paused", timeout=30)
    engine.resume("ui-guest")
    ui.wait_state("ui-guest", "running", timeout=30)
    page.wait_for_function(f"() => ({stops})() > {before}")
    ui.shoot("15-logs")

    # -- force stop asks first; cancelled, the VM keeps running --------------------------------------
    page.click("#action-force")
    page.wait_for_selector("dialog#confirm[open]")
    ui.shoot("16-force-stop-confirm")
    page.click("#confirm-cancel")
    page.wait_for_selector("dialog#confirm", state="hidden")
    assert ui.state_of("ui-guest") == "running"

    # -- shut it down: the guest powers off on the ACPI button ---------------------------------------
    started = time.monotonic()
    page.click("#action-stop")
    ui.wait_state("ui-guest", "stopped", timeout=120)
    stop_seconds = time.monotonic() - started
    assert "POWEROFF" in engine.serial_output("ui-guest").decode(errors="replace")
    page.click("#tab-screen")
    page.get_by_text("Start it to see its screen here.").wait_for()
    ui.shoot("17-stopped")

    # -- a guest that ignores the power button: Force stop stays usable while Shut down waits --------
    page.click("#tab-console")
    page.click("#console-clear")
    assert not any(row.strip() for row in page.evaluate(TERMINAL_ROWS))
    page.click("#action-start")
    _wait_terminal(page, f"row.includes('{READY}')", BOOT_TIMEOUT)
    page.click("#terminal")
    page.keyboard.type("killall acpid; echo acpid-gone")
    page.keyboard.press("Enter")
    _wait_terminal(page, "row.trim() === 'acpid-gone'", 60)
    page.click("#action-stop")
    ui.wait_state("ui-guest", "stopping", timeout=30)
    assert page.is_disabled("#action-start") and page.is_enabled("#action-force")
    page.click("#action-force")
    page.click("#confirm-ok")
    ui.wait_state("ui-guest", "stopped", timeout=60)

    # -- delete it, after confirming -----------------------------------------------------------------
    page.click("#action-delete")
    page.wait_for_selector("dialog#confirm[open]")
    assert "cannot be undone" in page.inner_text("#confirm-text")
    ui.shoot("18-delete-confirm")
    page.click("#confirm-ok")
    page.get_by_role("heading", name="No VMs yet — create one").wait_for()
    assert engine.list() == []
    assert ui.errors == []
    print(f"\nscreen colours sampled: {colours}; shutdown took {stop_seconds:.1f} s")
