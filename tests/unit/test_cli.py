"""The CLI's shape and its refusals: hostile input never creates or damages anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thalunix.cli import main


def run(capsys, data: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--data-dir", str(data), *args])
    out, err = capsys.readouterr()
    return code, out, err


def vm_folders(data: Path) -> list[Path]:
    return sorted((data / "vms").iterdir()) if (data / "vms").exists() else []


@pytest.mark.parametrize("name", ["../x", "", "a" * 300, "bad\x00name", "x/../../etc"])
def test_hostile_names_create_nothing(capsys, tmp_path: Path, name: str) -> None:
    code, out, err = run(capsys, tmp_path, "vm", "create", name)
    assert code == 1
    assert err.startswith("thalunix: name:")
    assert vm_folders(tmp_path) == []
    assert not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["--ram", "0"], "ram: '0' is zero"),
    (["--ram", "100T"], "more than this host has"),
    (["--ram", "lots"], "not a size"),
    (["--cpus", "0"], "at least 1"),
    (["--cpus", "4096"], "more than this host"),
    (["--iso", "/no/such.iso"], "ISO '/no/such.iso' does not exist"),
    (["--disk", "/no/such.qcow2"], "does not exist"),
    (["--disk", "0G"], "zero"),
    (["--forward", "tcp:99999:22"], "out of range"),
    (["--forward", "nonsense"], "write it as"),
])
def test_bad_create_options(capsys, tmp_path: Path, args: list[str], message: str) -> None:
    code, out, err = run(capsys, tmp_path, "vm", "create", "x", *args)
    assert code == 1, out
    assert message in err
    assert vm_folders(tmp_path) == []


def test_json_errors_are_machine_readable(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, tmp_path, "--json", "vm", "create", "x", "--ram", "0")
    assert code == 1
    assert json.loads(err) == {"error": "invalid", "message": "ram: '0' is zero; give a size above zero",
                               "field": "ram"}


def test_create_show_edit_delete(capsys, tmp_path: Path) -> None:
    iso = tmp_path / "os.iso"
    iso.write_bytes(b"\0" * 2048)
    code, out, _ = run(capsys, tmp_path / "d", "vm", "create", "web", "--iso", str(iso), "--ram", "1G", "--cpus", "1",
                       "--disk", "1G", "--forward", "tcp:8080:80", "--firmware", "bios")
    assert code == 0 and "Created VM 'web'" in out
    code, out, _ = run(capsys, tmp_path / "d", "vm", "show", "web", "--json")
    shown = json.loads(out)
    assert shown["state"] == "stopped" and shown["ram_mib"] == 1024 and shown["firmware"] == "bios"
    assert shown["cdroms"][0]["path"] == str(iso)
    disk = tmp_path / "d" / shown["disks"][0]["path"]
    assert disk.is_file() and shown["disks"][0]["path"].startswith("vms/")
    assert shown["nics"][0]["forwards"] == [{"protocol": "tcp", "host_port": 8080, "guest_port": 80,
                                             "host_address": "127.0.0.1"}]
    code, out, _ = run(capsys, tmp_path / "d", "vm", "edit", "web", "--ram", "512", "--rename", "www",
                       "--set", "serial=false")
    assert code == 0
    code, out, _ = run(capsys, tmp_path / "d", "--json", "vm", "list")
    (row,) = json.loads(out)
    assert row["name"] == "www" and row["ram_mib"] == 512 and row["state"] == "stopped"
    code, out, err = run(capsys, tmp_path / "d", "vm", "edit", "www", "--set", "cpus=true")
    assert code == 1 and "cpus: expected a whole number" in err
    code, out, err = run(capsys, tmp_path / "d", "vm", "edit", "www", "--set", "id=\"00\"")
    assert code == 1 and "id cannot be changed" in err
    code, _, _ = run(capsys, tmp_path / "d", "vm", "delete", "www", "--yes")
    assert code == 0
    assert not disk.exists() and vm_folders(tmp_path / "d") == []


def test_list_survives_a_corrupted_config(capsys, tmp_path: Path) -> None:
    for name in ("one", "two"):
        assert run(capsys, tmp_path, "vm", "create", name)[0] == 0
    (first,) = [f for f in vm_folders(tmp_path) if json.loads((f / "vm.json").read_text())["name"] == "one"]
    (first / "vm.json").write_text("{ not json")
    code, out, _ = run(capsys, tmp_path, "vm", "list")
    assert code == 0
    assert "two" in out and "broken" in out and str(first / "vm.json") in out
    code, out, err = run(capsys, tmp_path, "vm", "show", "one")
    assert code == 1 and "no VM named 'one'" in err


def test_unknown_vm(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, tmp_path, "vm", "start", "ghost")
    assert code == 1 and "no VM named 'ghost'" in err


def test_stopped_vm_cannot_be_paused(capsys, tmp_path: Path) -> None:
    run(capsys, tmp_path, "vm", "create", "idle")
    code, _, err = run(capsys, tmp_path, "vm", "pause", "idle")
    assert code == 1 and "VM 'idle' is not running; start it first" in err


def test_doctor_without_qemu(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, out, _ = run(capsys, tmp_path, "doctor")
    assert code == 0
    assert "QEMU: not found" in out and "apt install qemu-system-x86" in out
