"""A VM's disks and snapshots in Chromium, with clone, export and import: on a VM with a qcow2 disk, take a snapshot
from the UI and see it in the tree, revert to it (the data written after it is gone from the real image), make a
linked clone and see it in the VM list, export the clone and watch its progress bar go to 100 % (moved by
job.progress events, nothing polled), import the file back under a new name; a raw disk's refusal with its
"Convert to qcow2" button and bar; add, grow (a shrink is refused in words), check; cancel an export half-way.
Real API server, real qemu-img and py7zr, Debian's Chromium; no guest boots. Screenshots in both themes.

Run: .venv/bin/python -m pytest tests/ui/test_ui_disks.py -q
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import py7zr
import pytest

from thalunix.engine import CreateOptions, DirectEngine

from .conftest import SHOTS

#: Records every value a progress bar takes, from the page's own DOM (a MutationObserver), so the test sees
#: the bar move without asking the API anything.
WATCH_BARS = """() => {
    window.__bars = {};
    const seen = (bar) => {
        const block = bar.closest('.job-progress');
        if (!block) return;
        const id = block.dataset.job;
        (window.__bars[id] = window.__bars[id] || []).push([parseFloat(bar.getAttribute('aria-valuenow')), block.dataset.state]);
    };
    new MutationObserver((changes) => {
        for (const change of changes) {
            if (change.type === 'attributes') seen(change.target);
            for (const node of change.addedNodes || []) {
                if (node.querySelectorAll) node.querySelectorAll('.job-progress .progress').forEach(seen);
            }
        }
    }).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ['aria-valuenow'] });
}"""


def _make(engine: DirectEngine, tmp_path: Path, name: str, disk: str = "64M", fmt: str = "qcow2") -> Path:
    iso = tmp_path / "install.iso"
    if not iso.exists():
        iso.write_bytes(b"\0" * 4096)
    config = engine.create(CreateOptions(name=name, iso=str(iso), ram="64M", cpus=1, firmware="bios", tpm="off",
                                         disk=disk, disk_format=fmt))
    return engine.data.resolve(config.disks[0].path)


def _fill_random(disk: Path, tmp_path: Path, mib: int) -> None:
    """Incompressible data at the start of a qcow2 disk, so exports have real work to show."""
    noise = tmp_path / f"noise-{mib}"
    with open(noise, "wb") as handle, open("/dev/urandom", "rb") as source:
        handle.write(source.read(mib << 20))
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(noise), str(disk)], check=True)
    noise.unlink()


def _pattern(disk: Path, byte: int) -> bool:
    """Whether the disk's first MiB holds ``byte`` everywhere (qemu-io reads the real image)."""
    answer = subprocess.run(["qemu-io", "-r", "-c", f"read -P {byte:#x} 0 1M", str(disk)], capture_output=True, text=True)
    return "Pattern verification failed" not in answer.stdout


def _shoot(ui: Any, name: str) -> None:
    """Both themes, set on the page itself (a modal dialog makes the theme menu inert)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = ui.page
    page.evaluate("document.getElementById('toasts').replaceChildren()")
    # Bars ease to their value (a CSS transition): shoot once every one has caught up.
    page.wait_for_function("""() => [...document.querySelectorAll('.job-progress .progress')].every((bar) =>
        Math.abs(100 * bar.querySelector('.progress-fill').offsetWidth / bar.clientWidth
                 - parseFloat(bar.getAttribute('aria-valuenow'))) < 2)""")
    for theme in ("light", "dark"):
        page.evaluate("t => { document.documentElement.dataset.theme = t; }", theme)
        page.screenshot(path=str(SHOTS / f"{name}-{theme}.png"))
    page.evaluate("() => { document.documentElement.dataset.theme = 'light'; }")


def _api_requests(page: Any) -> list[str]:
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.method + " " + re.sub(r"^https?://[^/]+", "", request.url))
            if "/api/" in request.url else None)
    return seen


def _bar_values(page: Any, job_id: str) -> list[tuple[float, str]]:
    return [tuple(item) for item in page.evaluate("id => window.__bars[id] || []", job_id)]


def _open_tab(ui: Any, engine: DirectEngine, name: str, tab: str) -> None:
    vm_id = engine.get(name).id
    ui.page.click(f'.vm-entry[data-name="{name}"]')
    ui.page.click(f"#tab-{tab}")
    ui.page.wait_for_selector(f"#{tab}-panel")
    assert vm_id in ui.page.url


def test_snapshot_revert_clone_export_import(ui, engine: DirectEngine, tmp_path: Path) -> None:
    page = ui.page
    disk = _make(engine, tmp_path, "vault")
    _fill_random(disk, tmp_path, 40)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 1M", str(disk)], check=True, capture_output=True)
    exports = tmp_path / "exports"
    exports.mkdir()
    requests = _api_requests(page)
    ui.open()
    page.evaluate(WATCH_BARS)

    # -- take a snapshot from the UI; it shows in the tree ---------------------------------------------
    _open_tab(ui, engine, "vault", "snapshots")
    page.wait_for_selector("#snapshot-empty")
    page.click("#snapshot-take")
    page.wait_for_selector("#snapshot-dialog[open]")
    assert page.input_value("#snapshot-name").startswith("snap-")
    page.fill("#snapshot-name", "../escape")
    page.click("#snapshot-dialog-ok")
    page.wait_for_selector('#snapshot-dialog .field[data-field="name"] .field-error:not([hidden])')
    page.fill("#snapshot-name", "before-upgrade")
    page.fill("#snapshot-description", "clean system, 0x11 on disk")
    _shoot(ui, "40-snapshot-dialog")
    page.click("#snapshot-dialog-ok")
    page.wait_for_selector('.snap-node[data-snapshot="before-upgrade"][data-current="true"]')
    row = page.locator('.snap-node[data-snapshot="before-upgrade"] .snap-row').first
    assert "clean system, 0x11 on disk" in row.inner_text() and "disks only" in row.inner_text()
    # The guest "writes" after the snapshot; a second snapshot nests under the first.
    subprocess.run(["qemu-io", "-c", "write -P 0x22 0 1M", str(disk)], check=True, capture_output=True)
    page.click("#snapshot-take")
    page.fill("#snapshot-name", "after-upgrade")
    page.click("#snapshot-dialog-ok")
    page.wait_for_selector('.snap-node[data-snapshot="before-upgrade"] ul .snap-node[data-snapshot="after-upgrade"]'
                           '[data-current="true"]')
    assert _pattern(disk, 0x22)
    _shoot(ui, "41-snapshot-tree")

    # -- revert (with a confirmation): the data written after the snapshot is gone -----------------------
    page.locator('.snap-node[data-snapshot="before-upgrade"] .snap-revert').first.click()
    page.wait_for_selector("#confirm[open]")
    assert "Revert vault to “before-upgrade”?" == page.inner_text("#confirm-title")
    page.click("#confirm-cancel")
    assert _pattern(disk, 0x22)                       # cancelled: nothing changed
    page.locator('.snap-node[data-snapshot="before-upgrade"] .snap-revert').first.click()
    page.click("#confirm-ok")
    page.wait_for_selector('.snap-node[data-snapshot="before-upgrade"][data-current="true"]')
    assert _pattern(disk, 0x11) and not _pattern(disk, 0x22)
    assert engine.snapshots("vault")["current"] == "before-upgrade"

    # -- linked clone: the dialog's bar ends, the clone is in the VM list ---------------------------------
    page.click("#action-clone")
    page.wait_for_selector("#clone-dialog[open]")
    assert page.input_value("#clone-name") == "vault-clone"
    page.fill("#clone-name", "vault-linked")
    page.check("#clone-kind-linked")
    page.check("#clone-tpm-fresh")
    _shoot(ui, "42-clone-dialog")
    page.click("#clone-dialog-ok")
    page.wait_for_selector('#clone-dialog .job-progress[data-state="done"]', timeout=120_000)
    page.wait_for_selector('.vm-entry[data-name="vault-linked"]')        # from the vm.config event
    assert "vault-linked is ready (linked to vault)" in page.inner_text("#clone-dialog .sheet-outcome")
    _shoot(ui, "43-clone-done")
    clone = engine.get("vault-linked")
    clone_disk = engine.disks("vault-linked")[0]
    assert clone_disk["backing_file"] and clone.id != engine.get("vault").id
    page.click("#clone-open")
    page.wait_for_selector(f'.vm-entry.selected[data-name="vault-linked"]')

    # -- export the clone: the bar moves from its first step to 100 % -------------------------------------
    page.click("#action-export")
    page.wait_for_selector("#export-dialog[open]")
    assert page.input_value("#export-name") == "vault-linked.7z"
    page.fill("#export-folder", str(engine.data.vms_dir))
    page.click("#export-dialog-ok")
    page.wait_for_selector("#export-dialog .sheet-error:not([hidden])")        # the data folder's own area
    assert "folders Thalunix manages" in page.inner_text("#export-dialog .sheet-error")
    page.fill("#export-folder", str(exports))
    assert page.inner_text("#export-target") == str(exports / "vault-linked.7z")
    page.click("#export-dialog-ok")
    page.wait_for_selector("#export-dialog .job-progress")
    export_job = page.get_attribute("#export-dialog .job-progress", "data-job")
    page.wait_for_function("id => (window.__bars[id] || []).some(([v, s]) => s === 'running' && v > 0 && v < 100)",
                           arg=export_job, timeout=120_000)
    page.wait_for_selector('#export-dialog .job-progress[data-state="done"]', timeout=180_000)
    values = _bar_values(page, export_job)
    running = [value for value, state in values if state == "running"]
    assert len(set(running)) >= 4 and running == sorted(running), values
    assert values[-1] == (100.0, "done"), values
    target = exports / "vault-linked.7z"
    assert page.inner_text("#export-result") == str(target)
    assert page.get_attribute("#export-dialog .progress", "aria-valuenow") == "100.0"
    _shoot(ui, "45-export-done")
    with py7zr.SevenZipFile(target) as archive:
        assert "manifest.json" in archive.getnames()
    page.click("#export-dialog-close")

    # -- import it back under a new name ------------------------------------------------------------------
    page.click("#import-vm")
    page.wait_for_selector("#import-dialog[open]")
    not_7z = tmp_path / "notes.7z"
    not_7z.write_text("plain text\n")
    page.fill("#import-file", str(not_7z))
    page.click("#import-dialog-ok")
    page.wait_for_selector("#import-dialog .sheet-error:not([hidden])")
    assert "not a 7z archive" in page.inner_text("#import-dialog .sheet-error")
    page.fill("#import-file", str(target))
    page.fill("#import-name", "vault-returned")
    page.click("#import-dialog-ok")
    page.wait_for_selector('#import-dialog .job-progress[data-state="done"]', timeout=180_000)
    assert "Imported as vault-returned" in page.inner_text("#import-dialog .sheet-outcome")
    _shoot(ui, "46-import-done")
    page.click("#import-open")
    page.wait_for_selector('.vm-entry.selected[data-name="vault-returned"]')
    imported = engine.disks("vault-returned")[0]
    assert imported["backing_file"] is None and imported["virtual_size"] == 64 << 20   # flattened on export
    assert _pattern(Path(imported["file"]), 0x11)

    # Nothing was polled: no job read but one per job at its end, no list of jobs but one per (re)connection.
    job_reads = [r for r in requests if r.startswith("GET /api/jobs/")]
    assert len(job_reads) <= 3, job_reads
    assert len([r for r in requests if r == "GET /api/jobs"]) <= 2, requests
    assert ui.errors == []


def test_disks_tab_raw_refusal_convert_grow_check_and_cancel(ui, engine: DirectEngine, tmp_path: Path) -> None:
    page = ui.page
    raw_disk = _make(engine, tmp_path, "rawbox", disk="48M", fmt="raw")
    ui.open()
    page.evaluate(WATCH_BARS)

    # -- a raw disk cannot hold snapshots: the tab says so and offers the convert, whose bar runs there ------
    _open_tab(ui, engine, "rawbox", "snapshots")
    page.wait_for_selector("#snapshot-unsupported")
    assert page.is_disabled("#snapshot-take")
    assert "disk0 (disk0.img) is raw" in page.inner_text("#snapshot-unsupported")
    _shoot(ui, "47-snapshots-raw")
    page.click('.convert-qcow2[data-disk="disk0"]')
    page.wait_for_selector("#snapshot-take:enabled", timeout=120_000)
    assert page.locator("#snapshot-unsupported").count() == 0
    assert engine.get("rawbox").disks[0].format == "qcow2" and not raw_disk.exists()
    convert_bars = [values for values in page.evaluate("Object.values(window.__bars)") if values]
    assert convert_bars and convert_bars[0][-1] == [100, "done"], convert_bars

    # -- the Disks tab: list, add, grow, refuse a shrink in words, check ------------------------------------
    page.click("#tab-disks")
    page.wait_for_selector('#disk-table .disk-row[data-disk="disk0"][data-format="qcow2"]')
    page.click("#disk-add")
    page.wait_for_selector("#add-disk-dialog[open]")
    page.fill("#add-size", "16M")
    page.select_option("#add-bus", "scsi")
    _shoot(ui, "48-add-disk")
    page.click("#add-disk-dialog-ok")
    page.wait_for_selector('.disk-row[data-disk="disk1"]')
    assert "16 MiB" in page.inner_text('.disk-row[data-disk="disk1"]') and "scsi" in page.inner_text('.disk-row[data-disk="disk1"]')

    page.click('.disk-row[data-disk="disk0"] .disk-grow')
    assert page.input_value("#grow-size") == "48M"
    page.fill("#grow-size", "32M")
    page.click("#grow-dialog-ok")
    error = page.locator('#grow-dialog .field[data-field="size"] .field-error')
    error.wait_for()
    assert "shrinking it to 32 MiB cuts off the last 16 MiB" in error.inner_text()
    _shoot(ui, "49-shrink-refused")
    page.fill("#grow-size", "96M")
    page.click("#grow-dialog-ok")
    page.wait_for_selector("#grow-dialog", state="detached")
    page.wait_for_function("() => document.querySelector('.disk-row[data-disk=\"disk0\"] .disk-size')?.textContent === '96 MiB'")
    page.click('.disk-row[data-disk="disk0"] .disk-check')
    page.wait_for_selector('.check-result[data-clean="true"]')
    _shoot(ui, "50-disks-tab")

    # -- cancel an export half-way: the bar says so, no file is left ------------------------------------------
    page.click("#disk-add")
    page.fill("#add-size", "160M")
    page.click("#add-disk-dialog-ok")
    page.wait_for_selector('.disk-row[data-disk="disk2"]')
    _fill_random(engine.data.resolve(engine.get("rawbox").disks[2].path), tmp_path, 150)
    target = tmp_path / "rawbox.7z"
    page.click("#action-export")
    page.fill("#export-folder", str(tmp_path))
    page.click("#export-dialog-ok")
    page.wait_for_selector("#export-dialog .job-progress")
    job = page.get_attribute("#export-dialog .job-progress", "data-job")
    page.wait_for_function("id => (window.__bars[id] || []).some(([v, s]) => s === 'running' && v > 0)", arg=job)
    _shoot(ui, "44-export-running")
    page.click("#export-dialog .job-cancel")
    page.wait_for_selector("#confirm[open]")
    page.click("#confirm-ok")
    page.wait_for_selector('#export-dialog .job-progress[data-state="cancelled"]', timeout=120_000)
    assert "Cancelled" in page.inner_text("#export-dialog .progress-text")
    assert not target.exists() and not list(tmp_path.glob(".rawbox.7z*"))
    page.click("#export-dialog-close")
    assert ui.errors == []


@pytest.mark.qemu
def test_running_vm_live_snapshot_and_hotplug(ui, engine: DirectEngine, make_vm) -> None:
    from disks.conftest import boot
    from disks.test_hotplug import wait_for

    page = ui.page
    make_vm("runner")
    engine.disk_add("runner", size="32M", bus="virtio")
    boot(engine, "runner")
    ui.open()
    _open_tab(ui, engine, "runner", "disks")
    assert "The VM is running" in page.inner_text("#disks-panel .storage-head")
    assert page.is_disabled('.disk-row[data-disk="disk0"] .disk-convert')   # waits until it is stopped
    assert page.is_enabled('.disk-row[data-disk="disk0"] .disk-grow')

    # Plug a disk in while it runs: only the buses that can be hot-plugged are offered; the guest sees it.
    page.click("#disk-add")
    assert page.eval_on_selector_all("#add-bus option", "options => options.map(o => o.value)") == \
        ["virtio", "scsi", "nvme"]
    page.fill("#add-size", "16M")
    page.click("#add-disk-dialog-ok")
    page.wait_for_selector('.disk-row[data-disk="disk1"]')
    assert wait_for(engine, "runner", "cat /sys/block/vdb/size 2>/dev/null", str((16 << 20) // 512)) == \
        str((16 << 20) // 512)
    _shoot(ui, "51-disks-running")
    page.click('.disk-row[data-disk="disk1"] .disk-remove')
    page.check("#confirm-check")
    page.click("#confirm-ok")
    page.wait_for_selector('.disk-row[data-disk="disk1"]', state="detached")
    assert wait_for(engine, "runner", "ls /sys/block/vdb >/dev/null 2>&1 && echo present || echo gone", "gone") == "gone"

    # A snapshot taken while running keeps the memory; the tree says so.
    page.click("#tab-snapshots")
    page.wait_for_selector("#snapshots-panel")
    page.click("#snapshot-take")
    assert "its memory is saved too" in page.inner_text("#snapshot-dialog")
    page.fill("#snapshot-name", "running-state")
    page.click("#snapshot-dialog-ok")
    node = '.snap-node[data-snapshot="running-state"]'
    page.wait_for_selector(node, timeout=120_000)
    assert "with memory" in page.inner_text(node) and "memory " in page.inner_text(f"{node} .snap-meta")
    assert page.is_enabled(f"{node} .snap-revert")
    _shoot(ui, "52-snapshots-running")
    engine.stop("runner", force=True)
    page.wait_for_selector('#snapshots-panel .hint:text("A snapshot keeps the disks")')   # redrawn on the state change
    assert ui.errors == []
