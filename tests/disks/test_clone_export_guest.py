"""Clones and export/import with the real guest: a linked clone boots and writes without touching the source's
image, the source is protected while it exists; a full clone has its own identity; an exported VM imported into
another data folder boots with its marker; damaged archives are refused before anything is written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from disks.conftest import boot, run, sha256, shell
from thalunix.engine import DirectEngine
from thalunix.errors import ConflictError, ThalunixError

pytestmark = pytest.mark.qemu


def data_image(engine: DirectEngine, name: str, disk_id: str) -> Path:
    return engine.data.resolve(next(d.path for d in engine.get(name).disks if d.id == disk_id))


def test_linked_clone_writes_without_touching_the_source(engine: DirectEngine, vm_with_marker) -> None:
    source, disk_id = vm_with_marker("origin", marker="original")
    base = data_image(engine, "origin", disk_id)
    base_hash = sha256(base)
    job = engine.clone("origin", "linked", linked=True, wait=True)
    assert job["state"] == "done", job
    clone = engine.get("linked")
    assert clone.id != source.id and clone.nics[0].mac != source.nics[0].mac
    overlay = data_image(engine, "linked", disk_id)
    assert overlay.stat().st_size < 1 << 20                  # an overlay, not a copy
    backing = next(d for d in engine.disks("linked") if d["id"] == disk_id)["backing_file"]
    assert backing and not os.path.isabs(backing) and backing.startswith("../../")

    boot(engine, "linked")
    assert run(engine, "linked", "cat /mnt/data/marker.txt") == "original"
    shell(engine, "linked", "echo changed-in-clone > /mnt/data/marker.txt && sync")
    assert run(engine, "linked", "cat /mnt/data/marker.txt") == "changed-in-clone"
    engine.stop("linked", force=True)
    assert sha256(base) == base_hash, "the linked clone wrote into the source's image"

    # The source runs on its own overlay now: it still sees its marker, and its writes spare the clone too.
    boot(engine, "origin")
    assert run(engine, "origin", "cat /mnt/data/marker.txt") == "original"
    shell(engine, "origin", "echo changed-in-origin > /mnt/data/marker.txt && sync")
    engine.stop("origin", force=True)
    assert sha256(base) == base_hash

    with pytest.raises(ConflictError, match="linked clone 'linked'"):
        engine.delete("origin")
    assert engine.get("origin")
    engine.delete("linked")
    engine.delete("origin")   # allowed once no clone needs it
    assert engine.list() == []


def test_full_clone_and_export_import_boot_elsewhere(engine: DirectEngine, vm_with_marker, tmp_path: Path) -> None:
    source, disk_id = vm_with_marker("travel", marker="passport")
    source_hash = sha256(data_image(engine, "travel", disk_id))
    job = engine.clone("travel", "twin", wait=True)
    assert job["state"] == "done", job
    twin = engine.get("twin")
    assert twin.id != source.id and twin.nics[0].mac != source.nics[0].mac
    assert next(d for d in engine.disks("twin") if d["id"] == disk_id)["backing_file"] is None

    archive = tmp_path / "travel.7z"
    job = engine.export("travel", str(archive), wait=True)
    assert job["state"] == "done", job
    assert sha256(data_image(engine, "travel", disk_id)) == source_hash
    members = {m["path"] for m in job["result"]["members"]}
    assert "vm.json" in members and any(m.startswith("disks/") for m in members)

    # Damaged copies are refused before anything is registered.
    other = DirectEngine.open(tmp_path / "elsewhere")
    try:
        raw = archive.read_bytes()
        truncated = tmp_path / "truncated.7z"
        truncated.write_bytes(raw[: len(raw) * 2 // 3])
        corrupted = tmp_path / "corrupted.7z"
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 0xFF
        corrupted.write_bytes(bytes(flipped))
        for bad in (truncated, corrupted):
            try:
                job = other.import_vm(str(bad), wait=True)
            except ThalunixError as error:
                assert "cannot be imported" in str(error)
            else:
                assert job["state"] == "failed", job
                assert "cannot be imported" in job["error"]
            assert other.list() == []
            assert list(other.data.vms_dir.iterdir()) == []
            assert not [p for p in other.data.tmp_dir.iterdir() if p.name.startswith("work-")]

        job = other.import_vm(str(archive), wait=True)
        assert job["state"] == "done", job
        assert job["result"]["name"] == "travel" and not job["result"]["renamed"]
        boot(other, "travel")
        assert run(other, "travel", "cat /mnt/data/marker.txt") == "passport"
        other.stop("travel", force=True)
        # A second import of the same file gets a new name and a new identity.
        again = other.import_vm(str(archive), name=None, wait=True)["result"]
        assert again["renamed"] and again["name"] == "travel-2" and again["id"] != job["result"]["id"]
    finally:
        other.close()

    # The full clone is independent of the source: delete the source, the twin still boots with the marker.
    engine.delete("travel")
    boot(engine, "twin")
    assert run(engine, "twin", "cat /mnt/data/marker.txt") == "passport"
    engine.stop("twin", force=True)


def test_data_folder_moves_with_linked_clones(engine: DirectEngine, vm_with_marker, tmp_path: Path,
                                              data_dir: Path) -> None:
    """Backing paths are relative: a moved data folder still resolves every linked clone's chain."""
    vm_with_marker("mover", marker="moved")
    assert engine.clone("mover", "mover-linked", linked=True, wait=True)["state"] == "done"
    engine.close()
    moved = tmp_path / "moved-data"
    shutil.move(str(data_dir), moved)
    other = DirectEngine.open(moved)
    try:
        for disk in other.disks("mover-linked"):
            assert disk.get("error") is None and str(moved) in disk["file"], disk
        chain = other.disks("mover-linked")[-1]
        assert chain["backing_file"].startswith("../../")
        report = other.disk_check("mover-linked", chain["id"])
        assert report["clean"], report
    finally:
        other.close()
