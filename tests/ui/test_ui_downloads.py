"""The ISOs page in Chromium: catalog cards, a download whose bar moves by job.progress events (no polling),
"Create a VM from this ISO" with the entry's defaults, a quarantined download with its reason, local ISOs with a
SHA-256, the fail-closed hash field, and Windows as a manual entry. A real API server, a real publisher on
127.0.0.1 (its signing key made here), Debian's Chromium; no guest is started.

Run: .venv/bin/python -m pytest tests/ui/test_ui_downloads.py -q
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from downloads.conftest import make_key, sha256
from downloads.fake_center import TESTOS_DEFAULTS, FakeCenter
from downloads.server import FileServer
from thalunix.engine import DirectEngine


@pytest.fixture(scope="module")
def key():
    return make_key("Test Publisher")


@pytest.fixture
def center(engine: DirectEngine, key) -> Iterator[FakeCenter]:
    with FileServer() as server:
        # 8 MiB at 2 MB/s: about four seconds of visible progress.
        yield FakeCenter.install(engine, server, key, size=8 << 20, rate=2_000_000)
        engine.downloads.close(timeout=10)


def _card(entry: str) -> str:
    return f'.os-card[data-entry="{entry}"]'


def _shoot(ui: Any, name: str, at: str | None = None) -> None:
    """Both themes of the page scrolled to ``at`` (a selector; the top when None), without passing toasts."""
    ui.page.evaluate("""sel => {
        document.getElementById('toasts').replaceChildren();
        const main = document.getElementById('main');
        main.scrollTop = sel ? main.scrollTop + document.querySelector(sel).getBoundingClientRect().top
                               - main.getBoundingClientRect().top - 12 : 0;
    }""", at)
    ui.shoot(name)


def _api_requests(page: Any) -> list[str]:
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.method + " " + re.sub(r"^https?://[^/]+", "", request.url))
            if "/api/" in request.url else None)
    return seen


def test_download_from_the_catalog_and_create_a_vm_from_it(ui, center: FakeCenter, engine: DirectEngine) -> None:
    page = ui.page
    ui.open("#/downloads")
    page.wait_for_selector(_card("testos"))
    card = page.locator(_card("testos"))
    assert "Signed" in card.inner_text() and "768 MiB RAM · 3 GiB disk · BIOS · no TPM" in card.inner_text()
    assert "≈ 8.4 MB" in card.inner_text()
    assert page.locator(_card("debian-netinst")).get_by_text("Signed").is_visible()
    assert page.locator(_card("freebsd")).get_by_text("Checksum only").is_visible()
    # Windows: Microsoft's page and the steps, no download button.
    windows = page.locator(_card("windows-11"))
    assert windows.locator("a.button-link").get_attribute("href").startswith("https://www.microsoft.com/")
    assert windows.locator("button.download").count() == 0
    windows.get_by_text("How to get the ISO").click()
    assert "Download Windows 11 Disk Image (ISO)" in windows.locator(".card-instructions").inner_text()
    # No published checksum: the button stays off until a SHA-256 is typed (fail closed).
    nosum = page.locator("#download-nosum")
    assert nosum.is_disabled()
    page.fill("#sha-nosum", "not a hash")
    assert nosum.is_disabled()
    page.fill("#sha-nosum", center.nosum_sha256)
    assert nosum.is_enabled()
    page.wait_for_selector("#iso-list .iso-empty")
    assert "not installed yet" in page.inner_text("#keys-note")     # shipped entries whose keys a refresh fetches
    _shoot(ui, "20-catalog-top")
    _shoot(ui, "21-catalog-cards", "#catalog-title")

    requests = _api_requests(page)
    page.click("#download-testos")
    bar = f'{_card("testos")} .progress-block[data-state="downloading"]'
    page.wait_for_selector(bar)
    # The bar moves: several distinct widths below 100 %, with bytes, rate and time left in words.
    widths: list[float] = []
    texts: set[str] = set()
    while len(widths) < 3:
        page.wait_for_function("([sel, seen]) => { const b = document.querySelector(sel + ' .progress');"
                               " const v = b && parseFloat(b.getAttribute('aria-valuenow'));"
                               " return v > 0 && v < 100 && !seen.includes(v); }",
                               arg=[bar, widths], timeout=20_000)
        widths.append(float(page.get_attribute(f"{bar} .progress", "aria-valuenow")))
        texts.add(page.inner_text(f"{bar} .progress-text"))
    assert widths == sorted(widths)
    assert any(re.search(r"[\d.]+ MB of 8\.4 MB \([\d.]+%\) · [\d.]+ [kM]B/s · \d+:\d\d left", text) for text in texts), texts
    # The ISO list shows it as downloading, with the same live bar.
    page.wait_for_selector('.iso-row[data-status="downloading"] .progress-block')
    assert page.locator("#nav-downloads .nav-count").inner_text() == "1"
    _shoot(ui, "22-downloading")
    _shoot(ui, "23-downloading-card", _card("nosum"))

    page.wait_for_selector(f'{_card("testos")} .card-ready', timeout=60_000)
    row = page.locator('.iso-row[data-status="ready"][data-name="testos-1.0-amd64.iso"]')
    row.wait_for()
    assert "Signed" in row.inner_text() and "Test OS" in row.inner_text()
    assert page.locator("#nav-downloads .nav-count").is_hidden()
    # Nothing was polled: besides the first reads, one ISO list read per state change, no job reads.
    assert not [r for r in requests if r.startswith("GET /api/downloads")], requests
    assert len([r for r in requests if r == "GET /api/isos"]) <= 7, requests

    row.get_by_role("button", name="Create a VM from this ISO").click()
    page.wait_for_selector("#vm-form #preset-note")
    assert "Test OS" in page.inner_text("#preset-note")
    ready_iso = engine.data.isos_dir / "testos-1.0-amd64.iso"
    assert page.input_value("#iso") == str(ready_iso)
    assert page.input_value("#name") == "testos-1.0-amd64"
    values = {key: page.input_value(f"#{key}") for key in ("os", "ram", "firmware", "tpm")}
    assert values == {key: TESTOS_DEFAULTS[key] for key in values}
    assert page.input_value("#disk-size") == TESTOS_DEFAULTS["disk"]
    page.fill("#name", "catalog-vm")
    _shoot(ui, "24-create-from-iso")
    page.click("#save")
    page.wait_for_selector('.vm-entry[data-name="catalog-vm"]')
    vm = engine.get("catalog-vm")
    assert (vm.ram_mib, vm.firmware, vm.tpm, vm.os) == (768, "bios", "off", "other")
    assert engine.data.resolve(vm.cdroms[0].path) == ready_iso
    (disk,) = engine.disks("catalog-vm")
    assert disk["virtual_size"] == 3 << 30

    # The plain new-VM form: picking the downloaded ISO brings its defaults, except what was set by hand.
    page.click("#new-vm")
    page.wait_for_selector("#vm-form")
    page.fill("#ram", "1G")
    page.fill("#iso", str(ready_iso))
    page.dispatch_event("#iso", "change")
    page.wait_for_selector("#preset-note")
    values = {key: page.input_value(f"#{key}") for key in ("os", "ram", "firmware", "tpm", "disk-size")}
    assert values == {"os": "other", "ram": "1G", "firmware": "bios", "tpm": "off", "disk-size": "3G"}
    assert ui.errors == []


def test_quarantine_local_add_and_windows(ui, center: FakeCenter, engine: DirectEngine, tmp_path: Path) -> None:
    page = ui.page
    ui.open("#/downloads")
    page.click("#download-badsum")
    row = page.locator('.iso-row[data-status="quarantined"]')
    row.wait_for(timeout=60_000)
    reason = row.locator(".iso-reason").inner_text()
    assert "badsum-2.0-amd64.iso is corrupt or altered" in reason and "ab" * 32 in reason
    assert row.get_by_role("button").all_inner_texts() == ["Delete"]    # nothing offered for use
    # The card follows its own job.progress event, which may land just after the ISO list's refresh.
    page.wait_for_function("sel => (document.querySelector(sel)?.innerText || '').includes('Quarantined:')",
                           arg=f'{_card("badsum")} .progress-text', timeout=30_000)
    page.wait_for_function("sel => document.querySelector(sel)?.innerText === 'Try again'",
                           arg=f'{_card("badsum")} .download', timeout=30_000)

    # A local ISO with a SHA-256: a wrong one is refused next to its field, the right one adds it.
    iso = tmp_path / "rescue.iso"
    iso.write_bytes(b"rescue" * 10000)
    page.evaluate("""url => {
        const data = new DataTransfer();
        data.setData('text/uri-list', url);
        window.dispatchEvent(new DragEvent('dragover', {dataTransfer: data, cancelable: true}));
        window.dispatchEvent(new DragEvent('drop', {dataTransfer: data, cancelable: true}));
    }""", iso.as_uri())
    assert page.input_value("#iso-add-path") == str(iso)          # dropped onto the page: into the add form
    page.fill("#iso-add-sha256", "12" * 32)
    page.click("#iso-add-submit")
    error = page.locator('#iso-add .field[data-field="sha256"] .field-error')
    error.wait_for()
    assert "does not match" in error.inner_text() and "Nothing was added" in error.inner_text()
    page.fill("#iso-add-sha256", "xyz")
    page.click("#iso-add-submit")
    assert "64 hex digits" in error.inner_text()
    page.fill("#iso-add-sha256", sha256(iso.read_bytes()))
    page.click("#iso-add-submit")
    added = page.locator('.iso-row[data-status="ready"][data-name="rescue.iso"]')
    added.wait_for()
    assert "Your SHA-256" in added.inner_text() and error.is_hidden()
    _shoot(ui, "25-isos-quarantined-and-added")
    row.get_by_role("button", name="Delete").click()
    page.click("#confirm-ok")
    row.wait_for(state="detached")
    assert not list(engine.data.quarantine_dir.iterdir())

    # Windows: fetched by hand, added as the catalog entry, then a VM form with Windows 11's needs.
    win = tmp_path / "Win11_24H2_English_x64.iso"
    win.write_bytes(b"\0" * 65536)
    page.click("#reveal-add-windows-11")
    page.fill("#add-windows-11-path", str(win))
    page.click("#add-windows-11-submit")
    win_row = page.locator(f'.iso-row[data-name="{win.name}"]')
    win_row.wait_for()
    _shoot(ui, "26-windows-card", _card("windows-10"))
    assert "Windows 11" in win_row.inner_text() and "Not checked" in win_row.inner_text()
    win_row.get_by_role("button", name="Create a VM from this ISO").click()
    page.wait_for_selector("#vm-form #preset-note")
    values = {key: page.input_value(f"#{key}") for key in ("os", "ram", "firmware", "tpm", "disk-size")}
    assert values == {"os": "windows11", "ram": "4G", "firmware": "uefi-secure", "tpm": "on", "disk-size": "64G"}
    page.click("#cancel")
    page.wait_for_selector("#downloads-page")
    assert ui.errors == []
