"""The data folder: layout, atomic writes with the previous version kept, locks, portable paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from thalunix.errors import ConflictError, CorruptConfigError, DataFolderError, LockedError, NotFoundError
from thalunix.model import CDRom, VMConfig
from thalunix.store import CONFIG_NAME, DataFolder, atomic_write_json, default_data_dir


@pytest.fixture
def data(tmp_path: Path) -> DataFolder:
    return DataFolder.open(tmp_path / "data")


def test_layout_is_created(data: DataFolder) -> None:
    for name in ("vms", "isos", "downloads", "cache", "runtime", "tmp", "logs"):
        assert (data.root / name).is_dir()


def test_data_dir_resolution_order(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("THALUNIX_DATA", str(tmp_path / "env"))
    assert default_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert default_data_dir() == tmp_path / "env"
    monkeypatch.delenv("THALUNIX_DATA")
    assert default_data_dir().name == "thalunix-data"     # the checkout, when run from source
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "stick" / "thalunix"))
    assert default_data_dir() == tmp_path / "stick" / "thalunix-data"


def test_read_only_mount(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a read-only tmpfs")
    target = tmp_path / "stick"
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.decode().strip()}")
    try:
        with pytest.raises(DataFolderError, match="not writable.*read-only.*--data-dir"):
            DataFolder.open(target)
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_file_is_not_a_data_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataFolderError, match="is a file"):
        DataFolder.open(tmp_path / "file")


def test_create_edit_keeps_previous(data: DataFolder) -> None:
    config = data.create_vm(VMConfig(name="web"))
    folder = data.vm_dir(config.id)
    assert json.loads((folder / CONFIG_NAME).read_text())["name"] == "web"
    config.cpus = 1
    data.save_vm(config)
    assert json.loads((folder / CONFIG_NAME).read_text())["cpus"] == 1
    assert json.loads((folder / (CONFIG_NAME + ".prev")).read_text())["cpus"] == 2
    assert not list(folder.glob(".*.tmp")), "no temp files left behind"


def test_names_are_unique_case_insensitively(data: DataFolder) -> None:
    data.create_vm(VMConfig(name="Web"))
    with pytest.raises(ConflictError, match="already exists"):
        data.create_vm(VMConfig(name="web"))
    other = data.create_vm(VMConfig(name="db"))
    other.name = "WEB"
    with pytest.raises(ConflictError):
        data.save_vm(other)
    assert [e.config.name for e in data.list_vms()] == ["db", "Web"]


def test_corrupted_config_is_named_and_others_still_listed(data: DataFolder) -> None:
    good = data.create_vm(VMConfig(name="good"))
    bad = data.create_vm(VMConfig(name="bad"))
    (data.vm_dir(bad.id) / CONFIG_NAME).write_text('{"name": "bad", "cpus": ')
    entries = data.list_vms()
    assert [e.config.name for e in entries if e.config] == ["good"]
    broken = [e for e in entries if e.config is None]
    assert len(broken) == 1
    assert str(data.vm_dir(bad.id) / CONFIG_NAME) in broken[0].error
    assert "not valid JSON" in broken[0].error and ".prev" in broken[0].error
    assert data.find_vm("good").id == good.id
    with pytest.raises(NotFoundError, match="no VM named 'bad'"):
        data.find_vm("bad")
    with pytest.raises(CorruptConfigError, match="not valid JSON"):
        data.find_vm(bad.id)


def test_config_with_wrong_types_is_reported(data: DataFolder) -> None:
    config = data.create_vm(VMConfig(name="typed"))
    path = data.vm_dir(config.id) / CONFIG_NAME
    raw = json.loads(path.read_text())
    raw["ram_mib"] = "lots"
    path.write_text(json.dumps(raw))
    (entry,) = data.list_vms()
    assert entry.config is None and "ram_mib: expected a whole number" in entry.error


def test_stored_paths_are_relative_inside_and_survive_a_move(tmp_path: Path) -> None:
    data = DataFolder.open(tmp_path / "a" / "data")
    iso = data.isos_dir / "x.iso"
    iso.write_bytes(b"iso")
    outside = tmp_path / "outside.iso"
    outside.write_bytes(b"iso")
    config = data.create_vm(VMConfig(name="mover", cdroms=[CDRom(path=data.to_stored_path(iso)),
                                                         CDRom(path=data.to_stored_path(outside))]))
    assert config.cdroms[0].path == "isos/x.iso"
    assert config.cdroms[1].path == str(outside)
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    moved = DataFolder.open(tmp_path / "b" / "data")
    found = moved.find_vm("mover")
    assert moved.resolve(found.cdroms[0].path) == tmp_path / "b" / "data" / "isos" / "x.iso"
    assert moved.exists(found.cdroms[0].path)


def test_delete_is_all_or_nothing(data: DataFolder) -> None:
    config = data.create_vm(VMConfig(name="gone"))
    (data.vm_dir(config.id) / "disks" / "d.qcow2").write_bytes(b"x" * 1000)
    data.delete_vm(config.id)
    assert not data.vm_dir(config.id).exists()
    assert data.list_vms() == []


def test_atomic_write_never_leaves_half_a_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})

    def failing_replace(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


LOCKER = """
import sys, time
from thalunix.store import DataFolder
data = DataFolder.open(sys.argv[1])
data.lock_vm(data.find_vm("locked"))
print("locked", flush=True)
time.sleep(60)
"""


def test_vm_lock_excludes_other_processes_and_dies_with_them(data: DataFolder) -> None:
    config = data.create_vm(VMConfig(name="locked"))
    other = subprocess.Popen([sys.executable, "-c", LOCKER, str(data.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"another Thalunix process \\(pid {other.pid}\\)"):
            data.lock_vm(config)
    finally:
        other.kill()
        other.wait()
    data.lock_vm(config)      # the OS released it with the process
    data.unlock_vm(config)
