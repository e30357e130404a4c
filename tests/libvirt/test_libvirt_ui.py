"""The UI's hosts panel in the real page (Debian's Chromium through Playwright): VMs grouped by host below the
portable folder's VMs, a host's connection error with its cause beside a working host, a VM started and shut
down from its host group, a host added and removed from the panel. Screenshot: tests/artifacts/ui/hosts-*.png.
No guest boots (the VM on the host has no boot medium; starting it is enough)."""

from __future__ import annotations

import contextlib

from pathlib import Path

import pytest

from thalunix.api import ApiServer
from thalunix.engine import CreateOptions
from thalunix.libvirt.hosts import HostManager

SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"

pytestmark = pytest.mark.timeout(300)


def test_hosts_panel_groups_vms_and_shows_errors(local_daemon, engine, make_vm, browser) -> None:
    make_vm("portable-vm")
    manager = HostManager(engine.data, engine.bus)
    manager.hosts.add("lab", local_daemon.uri)
    manager.hosts.add("gone", "qemu:///system?socket=/nonexistent/libvirt-sock")
    lab = manager.engine("lab")
    lab.create(CreateOptions(name="on-lab", ram="64M", cpus=1, firmware="bios", tpm="off", accel="tcg",
                             display="none"))
    server = ApiServer(engine, heartbeat=5.0).start()
    errors: list[str] = []
    try:
        # The session's one Chromium (tests/conftest.py); a page of its own, closed at the end.
        with contextlib.closing(browser.new_page(viewport={"width": 1280, "height": 800})) as page:
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.launch_url)
            page.wait_for_selector('.vm-entry[data-name="portable-vm"]')
            page.wait_for_selector('.host-vm[data-host="lab"][data-name="on-lab"] .badge[data-state="stopped"]')
            failure = page.wait_for_selector('.host-group[data-host="gone"] .host-error[data-cause="unreachable"]')
            assert "Unreachable" in failure.inner_text() and "'gone'" in failure.inner_text()
            # The portable VM is not listed under the host, nor the host's VM among the portable ones.
            assert page.locator('.vm-entry[data-name="on-lab"]').count() == 0
            assert page.locator('.host-vm[data-name="portable-vm"]').count() == 0

            page.click('.host-vm[data-name="on-lab"] button:has-text("Start")')
            page.wait_for_selector('.host-vm[data-name="on-lab"] .badge[data-state="running"]')
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "hosts-light.png"))
            page.click('.host-vm[data-name="on-lab"] button:has-text("Force off")')
            page.wait_for_selector('.host-vm[data-name="on-lab"] .badge[data-state="stopped"]')

            page.fill('input[name="host-name"]', "bad uri")
            page.fill('input[name="host-uri"]', "qemu:///session")
            page.click('button:has-text("Add host")')
            page.wait_for_selector('.toast.error')
            page.fill('input[name="host-name"]', "second")
            page.fill('input[name="host-uri"]', local_daemon.uri)
            page.click('button:has-text("Add host")')
            page.wait_for_selector('.host-vm[data-host="second"][data-name="on-lab"]')
            page.click('.host-group[data-host="gone"] .host-remove')
            page.click('#confirm-ok')
            page.wait_for_selector('.host-group[data-host="gone"]', state="detached")
        assert errors == []
        assert [h.name for h in manager.hosts.list()] == ["lab", "second"]
    finally:
        server.stop()
        for domain in lab.conn.listAllDomains(0):
            if domain.isActive():
                domain.destroy()
            domain.undefineFlags(0)
        manager.close()
