"""The interface without a running guest: empty state, theme choice, the form's errors, dropped files, editing,
and a list that follows other fronts through the event stream. Real server, real Chromium; no QEMU is started.

Run: .venv/bin/python -m pytest tests/ui/test_ui_forms.py -q
"""

from __future__ import annotations

from pathlib import Path

from thalunix.engine import CreateOptions, DirectEngine


def _luminance(page, selector: str) -> float:
    """Relative brightness (0 black … 1 white) of an element's computed background."""
    rgb = page.eval_on_selector(selector, "e => getComputedStyle(e).backgroundColor.match(/\\d+/g).slice(0, 3)")
    red, green, blue = (int(value) / 255 for value in rgb)
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def _field_error(page, key: str) -> str:
    """The error shown under a field, once the API has answered."""
    return page.inner_text(f'.field[data-field="{key}"] .field-error:not([hidden])')


def test_empty_state_and_theme_is_remembered(ui) -> None:
    ui.open()
    page = ui.page
    page.get_by_role("heading", name="No VMs yet — create one").wait_for()
    assert page.inner_text("#vm-list") == "No VMs yet"
    ui.shoot("01-empty")

    assert page.eval_on_selector("#theme", "s => s.value") == "system"
    assert _luminance(page, "body") > 0.8            # the context prefers light: system → light
    page.select_option("#theme", "dark")
    assert _luminance(page, "body") < 0.2
    page.reload()
    page.wait_for_selector('#connection[data-state="live"]')
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert page.eval_on_selector("#theme", "s => s.value") == "dark"
    assert _luminance(page, "body") < 0.2
    page.emulate_media(color_scheme="dark")
    page.select_option("#theme", "system")           # following the system, which now prefers dark
    assert _luminance(page, "body") < 0.2
    page.select_option("#theme", "light")
    assert _luminance(page, "body") > 0.8
    assert ui.errors == []


def test_form_shows_each_api_error_next_to_its_field(ui, engine: DirectEngine, tmp_path: Path) -> None:
    iso = tmp_path / "installer.iso"
    iso.write_bytes(b"\0" * 4096)
    ui.open("#/new")
    page = ui.page
    page.wait_for_selector("#vm-form")
    assert page.evaluate("document.activeElement.id") == "iso"

    page.fill("#iso", str(iso))
    assert page.input_value("#name") == ""
    page.fill("#name", "bad/name")
    page.click("#save")
    assert "path separator" in _field_error(page, "name")

    page.fill("#name", "web")
    page.fill("#iso", str(tmp_path / "missing.iso"))
    page.click("#save")
    error = _field_error(page, "iso")
    assert "missing.iso" in error and "does not exist" in error
    assert page.is_hidden('.field[data-field="name"] .field-error')

    page.fill("#iso", str(iso))
    page.fill("#ram", "lots")
    page.click("#save")
    assert "lots" in _field_error(page, "ram")

    page.fill("#ram", "256M")
    page.click("#add-forward")
    page.fill(".forward-row .host-port", "70000")
    page.fill(".forward-row .guest-port", "22")
    page.click("#save")
    assert "70000" in _field_error(page, "forwards")
    ui.shoot("02-form-errors")

    page.fill(".forward-row .host-port", "2222")
    page.fill("#cpus", "1")
    page.click('input[name="disk-mode"][value="none"]')
    page.select_option("#network", "restricted")
    page.click("#save")
    page.wait_for_selector("table.details")
    config = engine.get("web")
    assert (config.ram_mib, config.cpus, config.disks) == (256, 1, [])
    assert engine.data.resolve(config.cdroms[0].path) == iso
    assert config.nics[0].mode == "restricted"
    assert [(f.host_port, f.guest_port) for f in config.nics[0].forwards] == [(2222, 22)]
    assert ui.errors == []


def test_buttons_follow_state_and_edit_saves_only_changes(ui, engine: DirectEngine, tmp_path: Path) -> None:
    iso = tmp_path / "debian-12-netinst.iso"
    iso.write_bytes(b"\0" * 4096)
    vm = engine.create(CreateOptions(name="box", iso=str(iso), ram="512M", cpus=1, firmware="bios", tpm="off"))
    ui.open()
    page = ui.page
    page.wait_for_selector(f"#tab-details.active")
    assert page.url.endswith(f"#/vm/{vm.id}/details")
    enabled = {verb: page.is_enabled(f"#action-{verb}")
               for verb in ("start", "pause", "resume", "stop", "force", "reset", "edit", "delete")}
    assert enabled == {"start": True, "pause": False, "resume": False, "stop": False, "force": False,
                       "reset": False, "edit": True, "delete": True}
    ui.shoot("03-stopped-details")

    page.click("#tab-screen")
    page.get_by_text("Start it to see its screen here.").wait_for()
    page.click("#tab-logs")
    page.wait_for_selector("#log-text")
    page.click("#action-edit")
    page.wait_for_selector("#vm-form")
    assert page.input_value("#name") == "box"
    assert page.input_value("#ram") == "512M"
    page.fill("#ram", "1G")
    page.select_option("#display", "native")
    page.click("#add-forward")
    page.fill(".forward-row .host-port", "8080")
    page.fill(".forward-row .guest-port", "80")
    ui.shoot("04-edit-form")
    page.click("#save")
    page.wait_for_selector("table.details")
    config = engine.get("box")
    assert config.ram_mib == 1024
    assert config.display.kind == "native"
    assert [(f.protocol, f.host_port, f.guest_port) for f in config.nics[0].forwards] == [("tcp", 8080, 80)]
    assert config.firmware == "bios" and config.cdroms[0].path == vm.cdroms[0].path   # untouched fields kept
    page.click("#tab-screen")
    page.get_by_text("This VM uses QEMU's own window").wait_for()
    page.click("#display-vnc")                       # and back, from the screen tab itself
    page.wait_for_selector("#display-native")
    assert engine.get("box").display.kind == "vnc"
    ui.shoot("05-screen-stopped")

    # A rename conflicting with nothing, then one the model refuses: the error sits under the name.
    page.click("#action-edit")
    page.fill("#name", "con")
    page.click("#save")
    assert "reserved" in _field_error(page, "name")
    page.click("#cancel")
    page.wait_for_selector("table.details")
    assert ui.errors == []


def test_list_follows_other_fronts_by_events(ui, engine: DirectEngine, tmp_path: Path) -> None:
    """VMs made, renamed and deleted by the CLI or another window show up without a reload."""
    ui.open()
    page = ui.page
    page.get_by_role("heading", name="No VMs yet — create one").wait_for()
    engine.create(CreateOptions(name="from-cli", ram="128M", cpus=1, firmware="bios", tpm="off"))
    page.wait_for_selector('.vm-entry[data-name="from-cli"]')
    engine.edit("from-cli", {"name": "renamed"})
    page.wait_for_selector('.vm-entry[data-name="renamed"]')
    engine.delete("renamed")
    page.get_by_role("heading", name="No VMs yet — create one").wait_for()
    assert ui.errors == []


def test_dropped_files_fill_the_form(ui, tmp_path: Path) -> None:
    iso = tmp_path / "Win11_23H2 English.iso"
    disk = tmp_path / "old system.qcow2"
    ui.open()
    page = ui.page
    page.get_by_role("heading", name="No VMs yet — create one").wait_for()
    # A file manager drags a file:// URL; a plain browser page gets the path from it.
    page.evaluate("""url => {
        const data = new DataTransfer();
        data.setData('text/uri-list', url);
        window.dispatchEvent(new DragEvent('dragover', {dataTransfer: data, cancelable: true}));
        window.dispatchEvent(new DragEvent('drop', {dataTransfer: data, cancelable: true}));
    }""", iso.as_uri())
    page.wait_for_selector("#vm-form")
    assert page.input_value("#iso") == str(iso)
    assert page.input_value("#name") == "Win11_23H2 English"
    assert page.input_value("#os") == "windows11"
    assert page.input_value("#firmware") == "uefi-secure"
    assert page.is_hidden("#drop-overlay")
    # The Thalunix window sends the full paths of dropped files as a thalunix-drop event.
    page.evaluate("p => window.dispatchEvent(new CustomEvent('thalunix-drop', {detail: {paths: [p]}}))", str(disk))
    page.wait_for_selector("#disk-existing:not([hidden])")
    assert page.input_value("#disk-path") == str(disk)
    assert page.is_checked('input[name="disk-mode"][value="existing"]')
    assert ui.errors == []
