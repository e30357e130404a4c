"""The download center over HTTP: catalog, downloads with job.progress events on /api/events, pause/resume/cancel,
the ISO list with statuses, local ISOs with an expected SHA-256, refusals with their field, and `vm create`
taking the catalog entry's defaults. A real API server, a real publisher on 127.0.0.1, a signing key made here.

Run: .venv/bin/python -m pytest tests/api/test_downloads_api.py -q
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from downloads.conftest import make_key, sha256
from downloads.fake_center import TESTOS_DEFAULTS, FakeCenter
from downloads.server import FileServer
from thalunix.engine import DirectEngine

from .conftest import Api, EventReader


@pytest.fixture(scope="module")
def key():
    return make_key("Test Publisher")


@pytest.fixture
def center(api: Api, engine: DirectEngine, key) -> Iterator[FakeCenter]:
    with FileServer() as server:
        yield FakeCenter.install(engine, server, key)
        engine.downloads.close(timeout=10)   # no worker may outlive its server


def _progress_until(reader: EventReader, job: str, states: set[str], timeout: float = 60) -> list[dict[str, Any]]:
    """job.progress events of ``job`` up to (and with) the first in one of ``states``."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        kind, data = reader.next({"job.progress"}, timeout=max(0.1, deadline - time.monotonic()))
        assert kind == "job.progress", f"the stream ended after {[e['state'] for e in seen]}"
        if data["job"] != job:
            continue
        seen.append(data)
        if data["state"] in states:
            return seen


def test_catalog_lists_sizes_trust_and_windows_as_manual(api: Api) -> None:
    rows = {row["id"]: row for row in api.get("/api/catalog").json()}
    assert rows["debian-netinst"]["trust"] == "signed" and rows["debian-netinst"]["keys_present"]
    assert rows["freebsd"]["trust"] == "checksum only"
    assert all(row["size"] > 0 for row in rows.values())
    windows = rows["windows-11"]
    assert windows["kind"] == "manual" and "microsoft.com" in windows["page"] and windows["instructions"]
    assert windows["defaults"]["tpm"] == "on" and windows["defaults"]["firmware"] == "uefi-secure"
    refused = api.post("/api/downloads", json={"source": "windows-11"})
    assert refused.status_code == 400 and refused.json()["field"] == "source"
    assert "microsoft.com" in refused.json()["message"]


def test_download_streams_progress_then_a_vm_gets_the_entry_defaults(api: Api, center: FakeCenter,
                                                                      engine: DirectEngine, tmp_path: Path) -> None:
    reader = EventReader(api, "?types=job.progress")
    try:
        assert reader.next({"ready"})[0] == "ready"
        answer = api.post("/api/downloads", json={"source": "testos"})
        assert answer.status_code == 202, answer.text
        job = answer.json()["id"]
        assert answer.json()["catalog_id"] == "testos"
        events = _progress_until(reader, job, {"ready", "quarantined", "failed"})
    finally:
        reader.close()
    assert events[-1]["state"] == "ready", events[-1]
    downloading = [e for e in events if e["state"] == "downloading" and e["bytes"]]
    assert len(downloading) >= 3                           # a live bar, not a jump from 0 to done
    assert downloading[-1]["total"] == len(center.testos)
    assert any(e["rate"] > 0 and e["eta"] is not None for e in downloading)
    assert [e["bytes"] for e in downloading] == sorted(e["bytes"] for e in downloading)
    assert {e["state"] for e in events} >= {"queued", "resolving", "downloading", "verifying", "ready"}
    assert events[-1]["trust"] == "signed" and events[-1]["signer"] == center.key.fingerprint

    assert [row["id"] for row in api.get("/api/downloads").json()] == [job]
    isos = api.get("/api/isos").json()
    (row,) = [iso for iso in isos if iso["status"] == "ready"]
    assert row["exists"] and row["catalog_id"] == "testos" and row["defaults"] == TESTOS_DEFAULTS
    assert row["path"] == "isos/testos-1.0-amd64.iso" and row["sha256"] == sha256(center.testos)

    # Nothing overridden: the entry's defaults (768M, 3G disk, BIOS, no TPM, os other), not 2G/UEFI/linux.
    created = api.post("/api/vms", json={"name": "from-catalog", "iso": row["full_path"]})
    assert created.status_code == 201, created.text
    vm = created.json()
    assert (vm["ram_mib"], vm["firmware"], vm["tpm"], vm["os"]) == (768, "bios", "off", "other")
    assert len(vm["disks"]) == 1
    info = engine.disks("from-catalog")[0]
    assert info["virtual_size"] == 3 << 30, info
    # By the catalog id as the ISO's name, with what the user gave winning and no disk asked for.
    mine = api.post("/api/vms", json={"name": "mine", "iso": "testos", "ram": "512M", "firmware": "uefi",
                                      "disk": ""}).json()
    assert (mine["ram_mib"], mine["firmware"], mine["tpm"], mine["os"], mine["disks"]) == (512, "uefi", "off",
                                                                                            "other", [])
    # An ISO from no catalog keeps the usual defaults, and no disk unless asked for.
    other = tmp_path / "other.iso"
    other.write_bytes(b"\0" * 4096)
    plain = api.post("/api/vms", json={"name": "plain", "iso": str(other)}).json()
    assert (plain["ram_mib"], plain["firmware"], plain["tpm"], plain["os"], plain["disks"]) == (2048, "uefi", "auto",
                                                                                               "linux", [])


def test_pause_resume_cancel_over_http(api: Api, center: FakeCenter, engine: DirectEngine) -> None:
    center.server.resources["/testos/testos-1.0-amd64.iso"].rate = 1_000_000
    reader = EventReader(api, "?types=job.progress")
    try:
        reader.next({"ready"})
        job = api.post("/api/downloads", json={"source": "testos"}).json()["id"]
        while not _progress_until(reader, job, {"downloading"})[-1]["bytes"]:
            pass
        paused = api.post(f"/api/downloads/{job}/pause")
        assert paused.status_code == 200 and paused.json()["id"] == job
        assert _progress_until(reader, job, {"paused"})[-1]["state"] == "paused"
        kept = api.get(f"/api/downloads/{job}").json()["bytes"]
        assert 0 < kept < len(center.testos)
        (row,) = [iso for iso in api.get("/api/isos").json() if iso.get("job") == job]
        assert (row["status"], row["job_state"], row["exists"], row["path"]) == ("downloading", "paused", False, None)
        assert api.post(f"/api/downloads/{job}/resume").json()["state"] in ("queued", "resolving", "downloading")
        while _progress_until(reader, job, {"downloading"})[-1]["bytes"] <= kept:
            pass                                                    # until bytes flow again
        cancelled = api.post(f"/api/downloads/{job}/cancel")
        assert cancelled.status_code == 200
        assert _progress_until(reader, job, {"cancelled"})[-1]["state"] == "cancelled"
    finally:
        reader.close()
    ranges = [entry.range for entry in center.server.requests_for("/testos/testos-1.0-amd64.iso")]
    assert ranges[0] is None and ranges[1] == f"bytes={kept}-"      # resumed from the bytes kept
    assert not list(engine.data.downloads_dir.glob("*.part"))
    assert [iso for iso in api.get("/api/isos").json() if iso.get("job") == job] == []
    assert api.post("/api/downloads/no-such-job/pause").status_code == 404
    again = api.post(f"/api/downloads/{job}/pause")
    assert again.status_code == 409 and "cancelled" in again.json()["message"]


def test_bad_checksum_is_quarantined_with_its_reason(api: Api, center: FakeCenter, engine: DirectEngine) -> None:
    answer = api.post("/api/downloads", json={"source": "badsum"}).json()
    job = answer["id"]
    engine.downloads.wait(job, 60)
    final = api.get(f"/api/downloads/{job}").json()
    assert final["state"] == "quarantined" and final["error_code"] == "quarantined"
    # Each published change counts: a front keeps the copy with the higher revision (the UI relies on it).
    assert final["revision"] > answer["revision"] >= 0
    (row,) = [iso for iso in api.get("/api/isos").json() if iso["status"] == "quarantined"]
    assert row["job"] == job and row["name"] == "badsum-2.0-amd64.iso" and not row["exists"] and row["path"] is None
    assert "corrupt or altered" in row["reason"] and "ab" * 32 in row["reason"]
    assert not list(engine.data.isos_dir.glob("badsum*"))              # nothing of it is offered for use
    evidence = engine.data.quarantine_dir / job
    assert (evidence / "badsum-2.0-amd64.iso.quarantined").read_bytes() == center.badsum
    for bad in ("..", "no-such-job"):
        assert api.delete(f"/api/quarantine/{bad}").status_code == 404
    assert api.delete(f"/api/quarantine/{job}").json() == {"removed": job}
    assert not evidence.exists() and engine.data.quarantine_dir.is_dir()
    assert [iso for iso in api.get("/api/isos").json() if iso["status"] == "quarantined"] == []


def test_refusals_name_their_field(api: Api, center: FakeCenter, tmp_path: Path) -> None:
    def refused(path: str, body: Any, status: int, field: str | None) -> str:
        answer = api.post(path, json=body)
        assert (answer.status_code, answer.json()["field"]) == (status, field), answer.text
        return str(answer.json()["message"])

    assert "SHA-256" in refused("/api/downloads", {"source": "nosum"}, 422, "sha256")     # fail closed
    refused("/api/downloads", {"source": "nosum", "sha256": "xyz"}, 422, "sha256")
    refused("/api/downloads", {"source": center.server.url("/nosum/nosum-3.0.iso")}, 422, "sha256")
    refused("/api/downloads", {"source": "no-such-os"}, 404, None)
    refused("/api/downloads", {"source": "testos", "mirror": "x"}, 400, "mirror")
    refused("/api/downloads", {"source": 7}, 400, "source")
    refused("/api/downloads", {}, 400, "source")
    assert center.server.requests_for("/nosum/nosum-3.0.iso") == []                        # refused before any byte
    typed = api.post("/api/downloads", json={"source": "nosum", "sha256": center.nosum_sha256.upper()})
    assert typed.status_code == 202
    center_job = typed.json()["id"]
    assert api.get(f"/api/downloads/{center_job}").json()["id"] == center_job

    iso = tmp_path / "Win11_24H2.iso"
    iso.write_bytes(b"windows" * 4096)
    refused("/api/isos", {"path": str(tmp_path / "nothing.iso")}, 400, "path")
    refused("/api/isos", {"path": "  "}, 400, "path")
    assert "does not match" in refused("/api/isos", {"path": str(iso), "sha256": "0" * 64}, 422, "sha256")
    refused("/api/isos", {"path": str(iso), "catalog_id": "windows-12"}, 400, "catalog_id")
    added = api.post("/api/isos", json={"path": str(iso), "sha256": sha256(iso.read_bytes()),
                                        "catalog_id": "windows-11"})
    assert added.status_code == 201, added.text
    row = added.json()
    assert (row["status"], row["trust"], row["catalog_id"], row["exists"]) == ("ready", "user hash", "windows-11", True)
    assert row["defaults"]["tpm"] == "on" and row["full_path"] == str(iso)
    assert row["path"] == str(iso)                      # registered where it lies, not copied
    listed = [item for item in api.get("/api/isos").json() if item["name"] == iso.name]
    assert len(listed) == 1 and listed[0]["catalog_name"] == "Windows 11"
