"""The API's routes against the real server and a real data folder (qemu-img makes the disks; no guest boots)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from thalunix.api import ApiServer
from thalunix.api.openapi import openapi_document
from thalunix.engine import DirectEngine
from thalunix.model import VMConfig

from .conftest import Api, EventReader

SMALL = {"ram": "64M", "cpus": 1, "firmware": "bios", "tpm": "off"}


def create(api: Api, name: str, **fields: Any) -> requests.Response:
    return api.post("/api/vms", json={"name": name, **SMALL, **fields})


def test_vm_lifecycle_of_definitions(api: Api, tmp_path: Path) -> None:
    iso = tmp_path / "install.iso"
    iso.write_bytes(b"\0" * 4096)
    answer = create(api, "web", iso=str(iso), disk="1G", forwards=["tcp:2222:22"], boot=["cdrom", "disk"])
    assert answer.status_code == 201, answer.text
    vm = answer.json()
    assert vm["name"] == "web" and vm["state"] == "stopped" and vm["status"]["state"] == "stopped"
    assert vm["cdroms"][0]["path"] == str(iso)
    disk = Path(vm["folder"]) / "disks" / "disk0.qcow2"
    assert disk.is_file()
    assert vm["nics"][0]["forwards"][0]["host_port"] == 2222

    rows = api.get("/api/vms").json()
    assert [(row["name"], row["state"], row["ram_mib"]) for row in rows] == [("web", "stopped", 64)]
    assert api.get("/api/vms/web").json()["id"] == vm["id"]
    assert api.get(f"/api/vms/{vm['id']}").json()["name"] == "web"   # the id works as well as the name

    edited = api.patch("/api/vms/web", json={"cpus": 2, "ram_mib": 128, "name": "web 2"})
    assert edited.status_code == 200, edited.text
    assert (edited.json()["cpus"], edited.json()["ram_mib"], edited.json()["name"]) == (2, 128, "web 2")
    assert [row["name"] for row in api.get("/api/vms").json()] == ["web 2"]
    assert api.get("/api/vms/web").status_code == 404

    gone = api.delete("/api/vms/web 2")
    assert gone.status_code == 200 and gone.json() == {"deleted": "web 2"}
    assert not disk.exists()
    assert api.get("/api/vms").json() == []


def test_errors_name_the_field_and_say_what_to_do(api: Api) -> None:
    cases = [
        ({"name": "x", "cpus": "two"}, "cpus", 400),
        ({"name": "x", "ram": True}, "ram", 400),
        ({"name": "x", "forwards": "tcp:1:2"}, "forwards", 400),
        ({"name": "x", "forwards": ["nonsense"]}, "forwards", 400),
        ({"name": "x", "boot": ["floppy"]}, "boot_order[0]", 400),
        ({"name": "x", "firmware": "coreboot"}, "firmware", 400),
        ({"name": "x", "disk": "/nowhere/disk.qcow2"}, "disk", 400),
        ({"name": "x", "iso": "/nowhere/install.iso"}, "iso", 400),
        ({"name": "x/y"}, "name", 400),
        ({"name": "x", "colour": "red"}, "colour", 400),
        ({"cpus": 1}, "name", 400),
    ]
    for body, field, status in cases:
        answer = api.post("/api/vms", json=body)
        assert answer.status_code == status, (body, answer.text)
        error = answer.json()
        assert error["field"] == field, (body, error)
        assert error["error"] == "invalid" and len(error["message"]) > 15
    assert api.get("/api/vms").json() == []

    for data, headers, status in [("{", {"Content-Type": "application/json"}, 400),
                                  ("[1, 2]", {"Content-Type": "application/json"}, 400),
                                  ("", {"Content-Type": "application/json"}, 400),
                                  ('{"name": "x"}', {"Content-Type": "text/plain"}, 415),
                                  ("x" * (2 << 20), {"Content-Type": "application/json"}, 413)]:
        answer = api.post("/api/vms", data=data, headers=headers)
        assert answer.status_code == status, data[:20]
        assert answer.json()["message"]

    missing = api.get("/api/vms/nobody")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not-found" and "vm list" in missing.json()["message"]
    assert api.get("/api/nothing-here").json()["error"] == "not-found"
    assert api.session.put(api.url + "/api/vms", timeout=30).status_code == 405


def test_name_clash_and_running_only_actions_are_conflicts(api: Api) -> None:
    assert create(api, "one").status_code == 201
    clash = create(api, "ONE")
    assert clash.status_code == 409 and "already exists" in clash.json()["message"]
    for method, path, body in [("post", "/api/vms/one/pause", None), ("post", "/api/vms/one/resume", None),
                               ("post", "/api/vms/one/reset", None), ("post", "/api/vms/one/stop", {"force": True}),
                               ("post", "/api/vms/one/console", {"data": "ls\n"}), ("get", "/api/vms/one/vnc", None),
                               ("get", "/api/vms/one/screenshot", None)]:
        answer = getattr(api, method)(path, json=body)
        assert answer.status_code == 409, (path, answer.text)
        assert "not running" in answer.json()["message"] and "start it" in answer.json()["message"]


def test_patch_and_stop_bodies_are_checked(api: Api) -> None:
    assert create(api, "edit").status_code == 201
    before = api.get("/api/vms/edit").json()
    for body, field in [({"id": "0" * 32}, "id"), ({"cpus": "many"}, "cpus"), ({"bogus": 1}, "bogus"),
                        ({"disks": [{"path": "/nowhere.qcow2"}]}, "disks[0].path"), ({"ram_mib": 1}, "ram_mib"),
                        ({"display": {"kind": "hologram"}}, "display.kind")]:
        answer = api.patch("/api/vms/edit", json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["field"] == field, (body, answer.json())
    assert api.patch("/api/vms/edit", json={}).status_code == 400
    assert api.get("/api/vms/edit").json() == before
    for body in ({"timeout": 0}, {"timeout": -1}, {"timeout": 10 ** 9}, {"force": "yes"}, {"later": True}):
        assert api.post("/api/vms/edit/stop", json=body).status_code == 400, body
    assert api.post("/api/vms/edit/start", json={"now": True}).status_code == 400


def test_logs_console_and_isos(api: Api, engine: DirectEngine, tmp_path: Path) -> None:
    outside = tmp_path / "outside.iso"
    outside.write_bytes(b"\0" * 2048)
    (engine.data.isos_dir / "debian.iso").write_bytes(b"\0" * 1024)
    (engine.data.isos_dir / "notes.txt").write_text("not an ISO")
    assert create(api, "a", iso=str(outside)).status_code == 201
    assert create(api, "b", iso=str(engine.data.isos_dir / "debian.iso")).status_code == 201
    isos = {iso["name"]: iso for iso in api.get("/api/isos").json()}
    assert set(isos) == {"debian.iso", "outside.iso"}
    assert isos["debian.iso"]["path"] == "isos/debian.iso" and isos["debian.iso"]["used_by"] == ["b"]
    assert isos["outside.iso"]["used_by"] == ["a"] and isos["outside.iso"]["size"] == 2048

    config = engine.get("a")
    engine.data.vm_path(config.id, "logs", "serial.log").write_bytes(b"boot line 1\nTHALUNIX \xff end\n")
    log = api.get("/api/vms/a/log", params={"kind": "serial"}).json()
    assert log["kind"] == "serial" and log["text"].endswith("THALUNIX \ufffd end\n")
    assert api.get("/api/vms/a/log", params={"kind": "serial", "tail": 4}).json()["text"] == "end\n"
    assert api.get("/api/vms/a/log", params={"kind": "qemu"}).json()["text"] == ""
    assert api.get("/api/vms/a/log", params={"kind": "secrets"}).json()["field"] == "kind"
    assert api.get("/api/vms/a/log", params={"tail": "lots"}).status_code == 400
    console = api.get("/api/vms/a/console").json()   # a stopped VM: the end of its serial log
    assert "THALUNIX" in console["text"]


def test_doctor_reports_qemu(api: Api) -> None:
    report = api.get("/api/doctor", timeout=300).json()
    assert report["qemu"]["found"] is True and report["qemu"]["version"]
    assert report["data_folder"]["writable"] is True


def test_listing_follows_the_files_and_shows_broken_configs(api: Api, engine: DirectEngine) -> None:
    for name in ("alpha", "beta"):
        assert create(api, name).status_code == 201
    assert [row["name"] for row in api.get("/api/vms").json()] == ["alpha", "beta"]
    # Changed behind the API's back (another Thalunix, or an editor): the next listing shows it.
    config = engine.data.find_vm("beta")
    renamed = VMConfig.from_dict({**config.to_dict(), "name": "aardvark"})
    engine.data.save_vm(renamed)
    assert [row["name"] for row in api.get("/api/vms").json()] == ["aardvark", "alpha"]
    vm_json = engine.data.vm_path(engine.data.find_vm("alpha").id, "vm.json")
    vm_json.write_text("{ not json")
    rows = api.get("/api/vms").json()
    assert [row["state"] for row in rows] == ["stopped", "broken"]
    assert "not valid JSON" in rows[1]["error"]
    engine.data.delete_vm(rows[1]["id"])
    assert [row["name"] for row in api.get("/api/vms").json()] == ["aardvark"]


def test_unexpected_errors_are_a_generic_json_500(api: Api, engine: DirectEngine, monkeypatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[dict[str, Any]]:
        raise KeyError("a bug")   # stands in for a bug: none can be produced on purpose
    monkeypatch.setattr(engine, "list", broken)
    answer = api.get("/api/vms")
    assert answer.status_code == 500
    assert answer.json()["error"] == "internal" and "KeyError" not in answer.text and "Traceback" not in answer.text
    assert "KeyError" in caplog.text   # the traceback went to the log


def test_every_route_is_in_the_openapi_document(api: Api) -> None:
    document = api.get("/api/openapi.json").json()
    assert document == json.loads(json.dumps(openapi_document()))
    routes = {(route.method.lower(), re.sub(r"<(\w+)>", r"{\1}", route.rule)) for route in api.server.app.routes
              if route.rule.startswith("/api/")}
    documented = {(method, path) for path, item in document["paths"].items() for method in item
                  if method != "parameters"}
    assert routes == documented
    import schemathesis
    schemathesis.openapi.from_dict(document)   # loads and resolves: a valid document


def test_static_files_and_placeholder(engine: DirectEngine, tmp_path: Path) -> None:
    web = tmp_path / "web"
    web.mkdir()
    server = ApiServer(engine, web_root=web).start()
    try:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {server.token}"
        page = session.get(server.url + "/", timeout=30)
        assert page.status_code == 200 and "not installed" in page.text   # the placeholder
        (web / "index.html").write_text("<!doctype html><title>The UI</title>")
        (web / "app.js").write_text("console.log(1)")
        assert session.get(server.url + "/", timeout=30).text == "<!doctype html><title>The UI</title>"
        script = session.get(server.url + "/app.js", timeout=30)
        assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]
        assert session.get(server.url + "/vendor/none.js", timeout=30).status_code == 404
    finally:
        server.stop()


def test_event_stream_relays_filters_and_keeps_alive(api: Api, engine: DirectEngine) -> None:
    everything = EventReader(api)
    only_jobs = EventReader(api, "?types=job.progress")
    try:
        assert everything.next({"ready"})[0] == "ready"
        assert only_jobs.next({"ready"})[0] == "ready"
        engine.bus.publish("vm.log", vm="abc", line="hello")
        engine.bus.publish("job.progress", job="convert-1", done=10, total=100)
        assert everything.next({"vm.log"}) == ("vm.log", {"type": "vm.log", "vm": "abc", "line": "hello",
                                                          "time": pytest.approx(time.time(), abs=60)})
        assert everything.next({"job.progress"})[1]["done"] == 10
        kind, data = only_jobs.next({"vm.log", "job.progress"})
        assert (kind, data["job"]) == ("job.progress", "convert-1")   # the vm.log was filtered out
        # Quiet streams get a comment (heartbeat is 1 s in these tests, 15 s in use).
        assert everything.next({"comment"}, timeout=10)[0] == "comment"
        assert api.get("/api/events", params={"types": "vm.nonsense"}).status_code == 400
        assert api.get("/api/events", params={"vm": "nobody"}).status_code == 404
        # Streams do not hold up the rest of the API.
        assert api.get("/api/vms", timeout=5).status_code == 200
    finally:
        everything.close()
        only_jobs.close()


def test_stopping_the_server_ends_open_streams(engine: DirectEngine) -> None:
    server = ApiServer(engine).start()
    api = Api(server, requests.Session())
    api.session.headers["Authorization"] = f"Bearer {server.token}"
    reader = EventReader(api)
    assert reader.next({"ready"})[0] == "ready"
    started = time.monotonic()
    server.stop()
    assert reader.next({"end"}, timeout=10)[0] == "end"
    assert time.monotonic() - started < 5
