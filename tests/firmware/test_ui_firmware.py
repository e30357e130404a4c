"""The UI's side of issue 4's firmware half, in headless Chromium over the real API:

* the new-VM form shows the "Windows 11 setup" option for OS Windows 11 only, on by default on a host
  without TPM emulation with the reason shown, and the VM it creates carries the answer drive;
* a stopped UEFI VM's settings have "Reset firmware settings" (a running VM's settings cannot be opened,
  and the API refuses a reset while it runs: test_secureboot.py): it asks first, then the variable
  store is gone (kept as .prev); a BIOS VM has no such button.
Screenshots: tests/artifacts/ui/fw-*.png.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from thalunix import win11
from thalunix.engine import CreateOptions, DirectEngine
from thalunix.firmware import prepare_firmware


def test_windows11_setup_option_in_the_new_vm_form(ui, engine: DirectEngine, tmp_path: Path) -> None:
    real = engine.runtime()
    engine._runtime = dataclasses.replace(real, caps=dataclasses.replace(
        real.caps, tpm_backends=[], notes={"tpm": "-tpmdev is not an option of this QEMU"}))
    iso = tmp_path / "Win11_24H2_English_x64.iso"
    iso.write_bytes(b"\0" * 4096)
    ui.open("#/new")
    page = ui.page
    assert page.is_hidden("#win11_setup")                    # OS Linux: not offered
    page.fill("#iso", str(iso))
    page.dispatch_event("#iso", "change")
    page.select_option("#os", "windows11")
    page.wait_for_selector("#win11_setup", state="visible")
    page.wait_for_function("() => document.querySelector('#win11-why')?.textContent.length > 0")
    assert page.is_checked("#win11_setup")                   # on by default: this "host" has no TPM emulation
    why = page.text_content("#win11-why")
    assert "cannot emulate a TPM (-tpmdev is not an option of this QEMU)" in why and "stays yours" in why
    ui.shoot("fw-win11-option")
    page.select_option("#os", "linux")
    assert page.is_hidden("#win11_setup")
    page.select_option("#os", "windows11")
    page.fill("#name", "win11")
    page.check("input[name='disk-mode'][value='none']")
    page.click("#save")
    page.wait_for_selector("table.details")
    config = engine.get("win11")
    assert [Path(c.path).name for c in config.cdroms] == [iso.name, win11.IMAGE_NAME]
    assert win11.read_answer_file(engine.data.vm_path(config.id, win11.IMAGE_NAME)).startswith(b"<?xml")
    assert ui.errors == []


def test_reset_firmware_settings_button(ui, engine: DirectEngine, make_vm) -> None:
    config = make_vm("uefi", firmware="uefi")
    engine.create(CreateOptions(name="legacy", firmware="bios", tpm="off"))
    prepare_firmware(config, engine.runtime(), engine.data)
    store = engine.data.vm_path(config.id, "firmware", "vars.qcow2")
    page = ui.page

    ui.open(f"#/vm/{config.id}/details")
    page.click("#action-edit")
    page.wait_for_selector("#reset-firmware:not([disabled])")
    page.click("#reset-firmware")
    page.wait_for_selector("#confirm[open]")
    assert "vars.qcow2.prev" in page.text_content("#confirm-text")
    ui.shoot("fw-reset-confirm")
    page.click("#confirm-cancel")
    assert store.is_file()                                   # cancelled: nothing happened
    page.click("#reset-firmware")
    page.click("#confirm-ok")
    page.wait_for_function("() => document.querySelector('#reset-firmware-note')?.textContent.includes('are forgotten')")
    assert not store.exists() and store.with_name("vars.qcow2.prev").is_file()
    ui.shoot("fw-reset-done")
    page.click("#cancel")

    legacy = engine.get("legacy")                            # BIOS keeps no settings: no button
    ui.open(f"#/vm/{legacy.id}/details")
    page.click("#action-edit")
    page.wait_for_selector("#vm-form")
    assert page.query_selector("#reset-firmware") is None
    assert ui.errors == []
