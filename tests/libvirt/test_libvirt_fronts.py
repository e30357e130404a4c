"""The fronts over libvirt hosts, against the real local libvirtd: the API's /api/hosts routes (a good host listed
with its VMs beside an unreachable one with its cause; create, edit, delete a VM there; the local routes
unchanged) and the CLI's ``host add/list/remove`` and ``vm … --host``. No guest boots."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from thalunix.api import ApiServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def api(engine) -> Iterator[tuple[str, requests.Session]]:
    server = ApiServer(engine).start()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {server.token}"
    try:
        yield server.url, session
    finally:
        session.close()
        server.stop()


def test_api_hosts_grouped_with_errors_and_vm_verbs(api, local_daemon, engine, make_vm, tmp_path: Path) -> None:
    url, http = api
    make_vm("portable-one")
    assert http.post(f"{url}/api/hosts", json={"name": "lab", "uri": local_daemon.uri}, timeout=30).status_code == 201
    assert http.post(f"{url}/api/hosts", json={"name": "gone", "uri": "qemu:///system?socket=/nonexistent/sock"},
                     timeout=30).status_code == 201
    clash = http.post(f"{url}/api/hosts", json={"name": "lab", "uri": "qemu:///session"}, timeout=30)
    assert clash.status_code == 409 and clash.json()["error"] == "conflict"
    bad = http.post(f"{url}/api/hosts", json={"name": "x", "uri": "ftp://nowhere"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["field"] == "uri"

    created = http.post(f"{url}/api/hosts/lab/vms", timeout=60, json={
        "name": "api-vm", "ram": "128M", "cpus": 1, "firmware": "uefi", "tpm": "on", "accel": "tcg", "disk": "8M"})
    assert created.status_code == 201, created.text
    detail = created.json()
    assert detail["host"] == "lab" and detail["firmware"] == "uefi" and detail["tpm"] == "on"
    assert "<backend type='emulator' version='2.0'/>" in detail["xml"] and "firmware='efi'" in detail["xml"]

    started = time.monotonic()
    rows = {row["name"]: row for row in http.get(f"{url}/api/hosts", timeout=60).json()}
    assert time.monotonic() - started < 20
    assert rows["lab"]["state"] == "connected" and [vm["name"] for vm in rows["lab"]["vms"]] == ["api-vm"]
    assert rows["gone"]["state"] == "error" and rows["gone"]["cause"] == "unreachable"
    assert "'gone'" in rows["gone"]["error"]
    # The portable folder's VMs are where they always were.
    assert [vm["name"] for vm in http.get(f"{url}/api/vms", timeout=30).json()] == ["portable-one"]
    assert http.get(f"{url}/api/hosts/gone/vms", timeout=60).json()["error"] == "host-connection"

    edited = http.patch(f"{url}/api/hosts/lab/vms/api-vm", json={"ram_mib": 192, "cpus": 2}, timeout=60)
    assert edited.status_code == 200 and edited.json()["ram_mib"] == 192 and edited.json()["cpus"] == 2
    refused = http.patch(f"{url}/api/hosts/lab/vms/api-vm", json={"ram_mib": 1}, timeout=60)
    assert refused.status_code == 400 and refused.json()["field"] == "ram_mib"
    assert http.get(f"{url}/api/hosts/lab/vms/nothing", timeout=30).status_code == 404
    assert http.post(f"{url}/api/hosts/lab/vms/api-vm/pause", timeout=30).status_code in (409, 500)
    assert http.delete(f"{url}/api/hosts/lab/vms/api-vm", timeout=60).json() == {"deleted": "api-vm"}
    assert http.get(f"{url}/api/hosts/lab/vms", timeout=30).json() == []
    assert http.delete(f"{url}/api/hosts/gone", timeout=30).json() == {"removed": "gone"}
    assert [h["name"] for h in http.get(f"{url}/api/hosts", timeout=60).json()] == ["lab"]
    document = http.get(f"{url}/api/openapi.json", timeout=30).json()
    assert {"/api/hosts", "/api/hosts/{host}/vms/{name}/move", "/api/vms/{name}/move"} <= set(document["paths"])


def _cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "thalunix", "--data-dir", str(data), *args], capture_output=True,
                          text=True, timeout=180, cwd=REPO)


def test_cli_hosts_and_vm_verbs_with_host(local_daemon, tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert _cli(data, "host", "add", "lab", local_daemon.uri).returncode == 0
    assert _cli(data, "host", "add", "dead", "qemu:///system?socket=/nonexistent/sock").returncode == 0
    listed = _cli(data, "host", "list")
    assert listed.returncode == 0
    assert "lab" in listed.stdout and "connected" in listed.stdout and "unreachable" in listed.stdout
    made = _cli(data, "vm", "create", "cli-vm", "--host", "lab", "--ram", "128M", "--cpus", "1", "--firmware", "bios",
                "--tpm", "off", "--accel", "tcg", "--disk", "8M")
    assert made.returncode == 0, made.stderr
    rows = json.loads(_cli(data, "vm", "list", "--host", "lab", "--json").stdout)
    assert [(r["name"], r["state"], r["host"]) for r in rows] == [("cli-vm", "stopped", "lab")]
    assert _cli(data, "vm", "list", "--json").stdout.strip() == "[]"   # no --host: the portable folder
    assert _cli(data, "vm", "edit", "cli-vm", "--host", "lab", "--ram", "160M").returncode == 0
    shown = json.loads(_cli(data, "vm", "show", "cli-vm", "--host", "lab", "--json").stdout)
    assert shown["ram_mib"] == 160
    missing = _cli(data, "vm", "show", "cli-vm", "--host", "nowhere")
    assert missing.returncode == 1 and "no host named 'nowhere'" in missing.stderr
    unreachable = _cli(data, "vm", "list", "--host", "dead")
    assert unreachable.returncode == 1 and "unreachable" in unreachable.stderr
    assert _cli(data, "vm", "delete", "cli-vm", "--host", "lab", "--yes").returncode == 0
    assert _cli(data, "host", "remove", "dead").returncode == 0
    assert json.loads(_cli(data, "host", "list", "--json").stdout)[0]["name"] == "lab"
