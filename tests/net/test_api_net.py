"""The network, USB, agent and share routes over real HTTP (the API server on 127.0.0.1), good and bad input."""

from __future__ import annotations

from pathlib import Path

from api.conftest import Api, api  # noqa: F401 - the real server fixture

from thalunix.engine import DirectEngine


def test_network_routes(api: Api, engine: DirectEngine, make_vm, tmp_path: Path) -> None:  # noqa: F811
    make_vm("web")
    made = api.post("/api/networks", json={"name": "lab", "description": "test net"})
    assert made.status_code == 201 and made.json()["name"] == "lab"
    assert api.post("/api/networks", json={"name": "lab"}).status_code == 409
    bad = api.post("/api/networks", json={"name": "no/slash"})
    assert bad.status_code == 400 and bad.json()["field"] == "name"
    assert api.post("/api/networks", json={"name": "x", "colour": "red"}).json()["field"] == "colour"

    rows = api.post("/api/vms/web/nics", json={"mode": "private", "network": "lab", "model": "e1000"})
    assert rows.status_code == 201 and [r["mode"] for r in rows.json()] == ["user", "private"]
    missing = api.post("/api/vms/web/nics", json={"mode": "private", "network": "ghost"})
    assert missing.status_code == 400 and "'ghost'" in missing.json()["message"]
    assert missing.json()["field"] == "nics[2].network"
    assert api.get("/api/networks").json()[0]["vms"] == ["web"]
    assert api.delete("/api/networks/lab").status_code == 409

    forwarded = api.post("/api/vms/web/forwards", json={"spec": "tcp:18080:80"})
    assert forwarded.status_code == 200 and forwarded.json()[0]["forwards"] == ["tcp:127.0.0.1:18080:80"]
    bad = api.post("/api/vms/web/forwards", json={"spec": "tcp:18080"})
    assert bad.status_code == 400 and "HOSTPORT" in bad.json()["message"]
    assert api.post("/api/vms/web/forwards", json={"spec": "tcp:1:2", "card": 2}).status_code == 400  # private card
    assert api.delete("/api/vms/web/forwards", params={"spec": "tcp:18080"}).json()[0]["forwards"] == []
    assert api.delete("/api/vms/web/forwards", params={"spec": "tcp:18080"}).status_code == 404
    assert api.delete("/api/vms/web/nics/9").status_code == 400
    assert api.delete("/api/vms/web/nics/two").status_code == 400
    assert len(api.delete("/api/vms/web/nics/2").json()) == 1
    assert api.delete("/api/networks/lab").json() == {"deleted": "lab"}

    assert isinstance(api.get("/api/usb").json(), list)
    assert api.post("/api/vms/web/usb", json={"device": "12:34"}).status_code == 400
    assert api.post("/api/vms/web/usb", json={"device": "usb-kbd"}).status_code == 409   # not running
    agent = api.get("/api/vms/web/agent")
    assert agent.status_code == 409 and "not running" in agent.json()["message"]
    copy = api.post("/api/vms/web/copy-in", json={"host_file": str(tmp_path / "nope"), "guest_path": "/tmp/x"})
    assert copy.status_code == 400 and copy.json()["field"] == "host_file"

    folder = tmp_path / "shared"
    folder.mkdir()
    shared = api.session.put(api.url + "/api/vms/web/share", json={"folder": str(folder)}, timeout=60)
    assert shared.status_code == 200 and shared.json()["guest_url"] == "http://10.0.2.100/"
    assert engine.get("web").shared_folder == str(folder)
    bad = api.session.put(api.url + "/api/vms/web/share", json={"folder": str(tmp_path / "none")}, timeout=60)
    assert bad.status_code == 400 and bad.json()["field"] == "shared_folder"
    off = api.session.put(api.url + "/api/vms/web/share", json={"folder": None}, timeout=60)
    assert off.json()["folder"] is None and engine.get("web").shared_folder == ""
