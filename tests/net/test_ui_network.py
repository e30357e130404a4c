"""The Networks page and a VM's Network tab in headless Chromium over the real API: create a network (and a
refused name), add a forward and a private card, share a folder, plug an emulated USB keyboard into the
running VM, and see the guest agent's absence reported."""

from __future__ import annotations

from pathlib import Path

from ui.conftest import Ui, browser, ui, ui_server  # noqa: F401 - the real server and Chromium fixtures

from thalunix.engine import DirectEngine


def test_networks_page_and_network_tab(ui: Ui, engine: DirectEngine, make_vm, tmp_path: Path) -> None:  # noqa: F811
    vm = make_vm("webui")
    ui.open("#/networks")
    page = ui.page
    page.fill("#network-name", "bad name")
    page.click("#network-create")
    page.wait_for_selector("#network-error:has-text('not allowed')")
    page.fill("#network-name", "lab")
    page.fill("#network-description", "web + db")
    page.click("#network-create")
    page.wait_for_selector("tr[data-network='lab']")
    assert [n["name"] for n in engine.networks()] == ["lab"]
    ui.shoot("networks-page")

    page.goto(ui.server.launch_url + f"#/vm/{vm.id}/network")
    page.wait_for_selector("tr[data-card='1']")
    row = page.locator("tr[data-card='1']")
    row.locator(".fwd-protocol").select_option("both")
    row.locator(".fwd-host").fill("18080")
    row.locator(".fwd-guest").fill("80")
    row.locator(".fwd-form button[type=submit]").click()
    page.wait_for_selector("li[data-forward='udp:127.0.0.1:18080:80']")
    forwards = {(f.protocol, f.host_port) for f in engine.get("webui").nics[0].forwards}
    assert forwards == {("tcp", 18080), ("udp", 18080)}
    page.select_option("#nic-mode", "private")
    page.select_option("#nic-network", "lab")
    page.click("#nic-add")
    page.wait_for_selector("tr[data-card='2']")
    assert engine.get("webui").nics[1].network == "lab"
    folder = tmp_path / "shared"
    folder.mkdir()
    page.fill("#share-folder", str(folder))
    page.click("#share-set")
    page.wait_for_selector(".toast:has-text('10.0.2.100')")
    assert engine.get("webui").shared_folder == str(folder)
    page.locator("li[data-forward='udp:127.0.0.1:18080:80'] button").click()
    page.wait_for_function("() => !document.querySelector(\"li[data-forward='udp:127.0.0.1:18080:80']\")")
    assert [f.protocol for f in engine.get("webui").nics[0].forwards] == ["tcp"]
    ui.shoot("network-tab-stopped")

    engine.start("webui")
    ui.wait_state("webui", "running")
    page.wait_for_selector("#agent-facts:has-text('did not answer')", timeout=60_000)
    page.locator("li[data-usb='usb-kbd'] button").click()
    page.wait_for_selector("li[data-usb='usb-kbd'] button:has-text('Unplug')", timeout=60_000)
    assert any(row.get("qemu_id") == "usb-kbd" for row in engine.usb_devices("webui"))
    ui.shoot("network-tab-running")
    page.locator("li[data-usb='usb-kbd'] button").click()
    page.wait_for_selector("li[data-usb='usb-kbd'] button:has-text('Plug in')", timeout=60_000)
    assert not any(row.get("qemu_id") == "usb-kbd" for row in engine.usb_devices("webui"))
    engine.stop("webui", force=True)
    assert not ui.errors, ui.errors
