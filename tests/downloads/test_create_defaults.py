"""`vm create` from a catalog ISO in separate CLI processes: what the user leaves out comes from the catalog entry,
what the user gives wins, and an ISO from no catalog keeps the usual defaults.

Run: .venv/bin/python -m pytest tests/downloads/test_create_defaults.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

from downloads.test_cli_downloads import cli


def test_vm_create_takes_the_catalog_entry_defaults_unless_given(tmp_path: Path) -> None:
    data = tmp_path / "data"
    win = tmp_path / "Win11_24H2_English_x64.iso"
    win.write_bytes(b"\0" * 65536)
    plain = tmp_path / "rescue.iso"
    plain.write_bytes(b"\0" * 4096)
    unknown = cli(data, "iso", "add", str(win), "--catalog", "windows-12")
    assert unknown.returncode == 1 and "no catalog entry 'windows-12'" in unknown.stderr
    added = cli(data, "--json", "iso", "add", str(win), "--catalog", "windows-11")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["catalog_id"] == "windows-11"

    made = cli(data, "--json", "vm", "create", "win", "--iso", "Win11_24H2_English_x64")
    assert made.returncode == 0, made.stderr
    vm = json.loads(made.stdout)
    assert (vm["os"], vm["ram_mib"], vm["firmware"], vm["tpm"]) == ("windows11", 4096, "uefi-secure", "on")
    (disk,) = vm["disks"]
    disks = json.loads(cli(data, "--json", "vm", "disk", "win", "list").stdout)
    assert disks[0]["virtual_size"] == 64 << 30 and disk["format"] == "qcow2"

    mine = cli(data, "--json", "vm", "create", "win-small", "--iso", str(win), "--ram", "3G", "--tpm", "off",
               "--disk", "none")
    assert mine.returncode == 0, mine.stderr
    vm = json.loads(mine.stdout)
    assert (vm["os"], vm["ram_mib"], vm["firmware"], vm["tpm"], vm["disks"]) == ("windows11", 3072, "uefi-secure",
                                                                                 "off", [])

    other = json.loads(cli(data, "--json", "vm", "create", "other", "--iso", str(plain)).stdout)
    assert (other["os"], other["ram_mib"], other["firmware"], other["tpm"], other["disks"]) == ("linux", 2048, "uefi",
                                                                                                "auto", [])
