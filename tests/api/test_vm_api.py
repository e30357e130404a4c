"""A real guest driven only through the API: create, start, serial over SSE, console, screenshot, VNC, stop."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from . import png
from .conftest import Api, EventReader

pytestmark = pytest.mark.qemu
READY = "THALUNIX-GUEST-READY"
BOOT_TIMEOUT = 180
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def serial_until(reader: EventReader, needle: str, timeout: float) -> str:
    """Collect vm.serial text from the stream until ``needle`` shows (it may span chunks)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        kind, data = reader.next({"vm.serial"}, timeout=max(0.1, deadline - time.monotonic()))
        assert kind == "vm.serial", f"stream ended; serial so far: {seen[-2000:]!r}"
        seen += data["data"]
    return seen


def state_until(reader: EventReader, wanted: str, timeout: float = 60) -> list[str]:
    states = []
    deadline = time.monotonic() + timeout
    while wanted not in states:
        kind, data = reader.next({"vm.state"}, timeout=max(0.1, deadline - time.monotonic()))
        assert kind == "vm.state", f"stream ended; states so far: {states}"
        states.append(data["state"])
    return states


def test_guest_through_the_api(api: Api, guest) -> None:
    created = api.post("/api/vms", json={"name": "api guest", "iso": str(guest.iso), "ram": "256M", "cpus": 1,
                                         "firmware": "bios", "tpm": "off", "display": "vnc"})
    assert created.status_code == 201, created.text
    vm_id = created.json()["id"]
    reader = EventReader(api, f"?vm={vm_id}")
    try:
        assert reader.next({"ready"})[0] == "ready"
        started = api.post("/api/vms/api guest/start")
        assert started.status_code == 200, started.text
        assert started.json()["state"] == "running" and started.json()["accel"] == "tcg"
        assert "running" in state_until(reader, "running")
        serial_until(reader, READY, BOOT_TIMEOUT)
        assert READY in api.get("/api/vms/api guest/console").json()["text"]

        # Typed into the serial line, answered by the guest's shell, seen on the stream.
        sent = api.post("/api/vms/api guest/console", json={"data": "echo $((6*7))xyz\n"})
        assert sent.status_code == 200 and sent.json() == {"sent": 17}
        serial_until(reader, "42xyz", 60)

        shot = api.get("/api/vms/api guest/screenshot")
        assert shot.status_code == 200 and shot.headers["Content-Type"] == "image/png"
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "api-screenshot.png").write_bytes(shot.content)
        width, height, _ = png.decode(shot.content)
        assert width >= 640 and height >= 400
        assert len(png.colours(shot.content)) >= 2, "the screenshot is a single colour"
        assert not list(api.server.engine.data.vm_path(vm_id, "run").glob("screen-*.png")), "temp file left behind"

        vnc = api.get("/api/vms/api guest/vnc").json()
        assert vnc["host"] == "127.0.0.1" and len(vnc["password"]) >= 6
        with socket.create_connection(("127.0.0.1", vnc["websocket_port"]), timeout=10):
            pass   # QEMU's websocket VNC listens there

        listed = {row["name"]: row["state"] for row in api.get("/api/vms").json()}
        assert listed == {"api guest": "running"}
        assert api.delete("/api/vms/api guest").status_code == 409
        assert api.patch("/api/vms/api guest", json={"cpus": 1}).status_code == 409

        assert api.post("/api/vms/api guest/pause").status_code == 200
        assert "paused" in state_until(reader, "paused")
        assert api.post("/api/vms/api guest/resume").status_code == 200
        assert "running" in state_until(reader, "running")

        stopped = api.post("/api/vms/api guest/stop", json={"timeout": 90}, timeout=150)
        assert stopped.status_code == 200 and stopped.json()["state"] == "stopped", stopped.text
        assert "stopped" in state_until(reader, "stopped")
        events_log = api.get("/api/vms/api guest/log", params={"kind": "events"}).json()["text"]
        assert "pressing the ACPI power button" in events_log
        assert api.get("/api/vms/api guest/log", params={"kind": "qemu"}).json()["text"].startswith("=== thalunix")
        assert api.delete("/api/vms/api guest").status_code == 200
    finally:
        reader.close()
