"""``thalunix serve`` and ``thalunix vm screenshot`` as separate processes, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import requests

from . import png
from .conftest import Api, EventReader

REPO = Path(__file__).resolve().parents[2]
READY = "THALUNIX-GUEST-READY"


def thalunix(data_dir: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thalunix", "--data-dir", str(data_dir), *args], cwd=REPO,
                          capture_output=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


class Serve:
    """A ``thalunix serve`` process and a browser-like session opened through the link it printed."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "thalunix", "--data-dir", str(data_dir), "serve", *args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout is not None
        self.link = self.proc.stdout.readline().strip()
        assert self.link, self.proc.stderr.read() if self.proc.stderr else ""
        self.url = self.link.split("/?token=")[0]
        self.session = requests.Session()
        assert self.session.get(self.link, timeout=30).status_code == 200   # link → cookie

    def api(self) -> Api:
        return Api(server=SimpleNamespace(url=self.url), session=self.session)  # type: ignore[arg-type]

    def stop(self) -> tuple[str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err[-3000:]
        return out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def serving(data_dir: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        serve.kill()
    for state in data_dir.glob("vms/*/run/state.json"):
        from thalunix.qemu import process
        record = json.loads(state.read_text())
        process.kill(int(record["pid"]), str(record.get("token", "")))


def test_serve_prints_one_link_and_ends_on_sigterm(data_dir: Path, serving: list[Serve]) -> None:
    serve = Serve(data_dir)
    serving.append(serve)
    assert serve.link.startswith("http://127.0.0.1:") and len(serve.link.split("token=")[1]) >= 40
    assert serve.session.get(serve.url + "/api/vms", timeout=30).json() == []
    out, err = serve.stop()
    assert out == ""   # nothing after the link
    with pytest.raises(requests.ConnectionError):
        requests.get(serve.url + "/api/vms", timeout=5)


def test_serve_on_a_given_port_and_a_port_in_use(data_dir: Path, serving: list[Serve]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = Serve(data_dir, "--port", str(port))
    serving.append(serve)
    assert serve.url == f"http://127.0.0.1:{port}"
    clash = thalunix(data_dir, "serve", "--port", str(port), timeout=60)
    assert clash.returncode == 1 and clash.stdout == b""
    assert f"port {port}" in clash.stderr.decode() and "in use" in clash.stderr.decode()
    serve.stop()


@pytest.mark.qemu
def test_vms_outlive_serve_unless_asked_and_are_reattached(data_dir: Path, serving: list[Serve], guest) -> None:
    first = Serve(data_dir)
    serving.append(first)
    api = first.api()
    created = api.post("/api/vms", json={"name": "long", "iso": str(guest.iso), "ram": "256M", "cpus": 1,
                                         "firmware": "bios", "tpm": "off"})
    assert created.status_code == 201, created.text
    reader = EventReader(api, "?types=vm.serial")
    try:
        assert reader.next({"ready"})[0] == "ready"
        started = api.post("/api/vms/long/start")
        assert started.status_code == 200, started.text
        pid = started.json()["pid"]
        seen = ""
        while READY not in seen:
            kind, data = reader.next({"vm.serial"}, timeout=180)
            assert kind == "vm.serial", seen[-2000:]
            seen += data["data"]
    finally:
        reader.close()
    first.stop()
    from thalunix.qemu import process
    assert process.is_alive(pid), "serve must leave VMs running by default"

    # `vm screenshot` from another process attaches to the VM for the moment it needs.
    shot_file = data_dir.parent / "screen.png"
    taken = thalunix(data_dir, "vm", "screenshot", "long", str(shot_file))
    assert taken.returncode == 0, taken.stderr.decode()
    assert "Saved the screen of VM 'long'" in taken.stdout.decode()
    assert len(png.colours(shot_file.read_bytes())) >= 2

    second = Serve(data_dir, "--stop-vms-on-exit")
    serving.append(second)
    status = second.session.get(second.url + "/api/vms/long", timeout=30).json()["status"]
    assert (status["state"], status["attached"], status["pid"]) == ("running", True, pid)   # re-attached at start
    second.stop()
    assert not process.is_alive(pid), "--stop-vms-on-exit must stop the VM"
    last_exit = json.loads(next(data_dir.glob("vms/*/run/last-exit.json")).read_text())
    assert last_exit["state"] == "stopped"
