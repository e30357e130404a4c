"""`thalunix iso …` in separate processes against a real server, including a download killed with SIGKILL
and resumed by the next process from its partial file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from downloads.conftest import sha256
from downloads.server import FileServer, random_bytes

ROOT = Path(__file__).resolve().parents[2]


def cli(data_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "thalunix", "--data-dir", str(data_dir), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_catalog_lists_entries_and_windows_is_manual(tmp_path: Path):
    result = cli(tmp_path, "iso", "catalog", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["id"]: row for row in json.loads(result.stdout)}
    for wanted in ("ubuntu-desktop-lts", "ubuntu-server-lts", "fedora-workstation", "debian-netinst", "debian-live",
                   "linuxmint-cinnamon", "alpine-standard", "archlinux", "opensuse-leap", "freebsd", "windows-11"):
        assert wanted in rows
    assert rows["freebsd"]["trust"] == "checksum only"
    assert rows["debian-netinst"]["keys_present"] and rows["archlinux"]["keys_present"]   # shipped keys
    assert rows["windows-11"]["trust"] == "manual" and rows["windows-11"]["defaults"]["tpm"] == "on"
    refused = cli(tmp_path, "iso", "download", "windows-11")
    assert refused.returncode == 1
    assert "microsoft.com" in refused.stderr and "iso add" in refused.stderr


def test_download_by_url_with_progress_list_and_refusals(tmp_path: Path):
    image = random_bytes(3 << 20)
    with FileServer() as server:
        server.add("/isos/tiny.iso", image, rate=6_000_000)
        url = server.url("/isos/tiny.iso")
        unchecked = cli(tmp_path, "iso", "download", url)
        assert unchecked.returncode == 1 and "--sha256" in unchecked.stderr
        assert server.requests_for("/isos/tiny.iso") == []        # refused before any byte
        wrong = cli(tmp_path, "iso", "download", url, "--sha256", "1" * 64)
        assert wrong.returncode == 1 and "quarantined" in wrong.stderr and "1" * 64 in wrong.stderr
        result = cli(tmp_path, "iso", "download", url, "--sha256", sha256(image))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Ready: ") and "tiny.iso (user hash)" in result.stdout
    bars = [line for line in result.stderr.splitlines() if "tiny.iso" in line and "[" in line]
    assert any("downloading" in line for line in bars) and "100.0%" in bars[-1] and bars[-1].endswith("ready")
    listing = cli(tmp_path, "iso", "list", "--json")
    statuses = sorted((row["name"], row["status"]) for row in json.loads(listing.stdout))
    assert statuses == [("tiny.iso", "quarantined"), ("tiny.iso", "ready")]
    human = cli(tmp_path, "iso", "list")
    assert "quarantined" in human.stdout and "corrupt or altered" in human.stdout


def test_add_local_iso_and_create_a_vm_from_it_by_name(tmp_path: Path):
    iso = tmp_path / "rescue.iso"
    iso.write_bytes(b"\0" * 65536)
    data = tmp_path / "data"
    bad = cli(data, "iso", "add", str(iso), "--sha256", "f" * 64)
    assert bad.returncode == 1 and "does not match" in bad.stderr and "Nothing was added" in bad.stderr
    good = cli(data, "--json", "iso", "add", str(iso), "--sha256", sha256(iso.read_bytes()))
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["trust"] == "user hash"
    created = cli(data, "--json", "vm", "create", "rescuer", "--iso", "rescue", "--firmware", "bios", "--tpm", "off")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["cdroms"][0]["path"] == str(iso)
    missing = cli(data, "vm", "create", "other", "--iso", "nothing-like-this")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_sigkilled_download_resumes_in_the_next_process(tmp_path: Path):
    image = random_bytes(12 << 20)
    data = tmp_path / "data"
    with FileServer() as server:
        resource = server.add("/isos/big.iso", image, rate=2_000_000)
        url = server.url("/isos/big.iso")
        first = subprocess.Popen([sys.executable, "-m", "thalunix", "--data-dir", str(data), "iso", "download", url,
                                  "--sha256", sha256(image), "--quiet"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            parts: list[Path] = []
            while time.monotonic() < deadline:
                parts = list((data / "downloads").glob("*.part")) if (data / "downloads").exists() else []
                if parts and parts[0].stat().st_size > (2 << 20):
                    break
                assert first.poll() is None, first.communicate()
                time.sleep(0.05)
            else:
                raise AssertionError("the first process never got 2 MiB")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
        kept = parts[0].stat().st_size
        sidecar = json.loads(parts[0].with_suffix(".json").read_text())
        assert sidecar["resolved"]["expected"] == sha256(image) and sidecar["source"] == url
        listing = json.loads(cli(data, "iso", "list", "--json").stdout)
        assert [(row["status"], row["job_state"]) for row in listing] == [("downloading", "paused")]
        resource.rate = None
        second = cli(data, "iso", "download", url, "--sha256", sha256(image))
        transfers = server.requests_for("/isos/big.iso")
    assert second.returncode == 0, second.stderr
    assert [t.range for t in transfers][0] is None
    resumed_at = int(transfers[-1].range.split("=")[1].rstrip("-"))
    assert resumed_at == kept and transfers[-1].status == 206     # resumed from the partial file, not zero
    assert transfers[-1].sent == len(image) - resumed_at
    assert sha256((data / "isos" / "big.iso").read_bytes()) == sha256(image)
    assert not list((data / "downloads").glob("*.part"))


def test_ctrl_c_pauses_and_the_same_command_resumes(tmp_path: Path):
    image = random_bytes(6 << 20)
    data = tmp_path / "data"
    with FileServer() as server:
        resource = server.add("/isos/int.iso", image, rate=1_500_000)
        url = server.url("/isos/int.iso")
        command = [sys.executable, "-m", "thalunix", "--data-dir", str(data), "iso", "download", url,
                   "--sha256", sha256(image)]
        first = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not list(data.glob("downloads/*.part")):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=30)
        assert first.returncode == 130, err
        assert "Paused" in err and "run the same command again to resume" in err
        kept = next((data / "downloads").glob("*.part")).stat().st_size
        assert 0 < kept < len(image)
        resource.rate = None
        second = cli(data, "iso", "download", url, "--sha256", sha256(image))
        assert second.returncode == 0, second.stderr
        assert server.requests_for("/isos/int.iso")[-1].range == f"bytes={kept}-"


def test_engine_verbs_are_json_and_map_to_routes(tmp_path: Path):
    from thalunix.engine import DirectEngine
    image = random_bytes(2 << 20)
    engine = DirectEngine.open(tmp_path / "data")
    try:
        with FileServer() as server:
            server.add("/isos/e.iso", image, rate=1_000_000)
            with engine.bus.subscribe(accept=lambda e: e["type"] == "job.progress") as events:
                job_id = engine.download_iso(server.url("/isos/e.iso"), sha256=sha256(image))
                assert isinstance(job_id, str)
                assert engine.download_iso(server.url("/isos/e.iso"), sha256=sha256(image)) == job_id  # same job
                first = events.get(timeout=10)
                assert first["job"] == job_id and first["kind"] == "download"
                started = time.monotonic()
                paused = engine.pause_download(job_id)      # while queued: it may already be in a worker's hands
                engine.downloads.wait(job_id, 30)
                assert time.monotonic() - started < 5
                assert engine.download(job_id)["state"] == "paused" and paused["id"] == job_id
                server.resources["/isos/e.iso"].rate = None
                engine.resume_download(job_id)
                engine.downloads.wait(job_id, 60)
            final = engine.download(job_id)
            json.dumps(final), json.dumps(engine.list_isos()), json.dumps(engine.catalog())
            assert final["state"] == "ready" and final["percent"] == 100.0
            assert [row["status"] for row in engine.list_isos()] == ["ready"]
            cancelled = engine.cancel_download(job_id)
            assert cancelled["state"] == "ready"          # a finished download is not undone by cancel
    finally:
        engine.close()
