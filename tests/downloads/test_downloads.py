"""The download engine against a real HTTP server on 127.0.0.1: every ending is a clear state with a message,
and no file reaches isos/ unless its checksum and (where the publisher signs) its signature verified."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import subprocess
import time
from pathlib import Path

import pytest

from downloads.conftest import PublisherKey, entry, gnu_sums, publish, sha256, signed_entry
from downloads.server import FileServer, random_bytes
from thalunix.downloads.library import IsoLibrary
from thalunix.downloads.verifier import VerificationError
from thalunix.errors import ValidationError

IMAGE = "testos-1.2-amd64.iso"


def wait_done(manager, job, timeout: float = 60):
    assert manager.wait(job.id, timeout).done.is_set(), f"job still {job.state} after {timeout}s"
    return job


def assert_nothing_ready(data) -> None:
    """Fail closed: no image and no sidecar in isos/."""
    assert [p.name for p in data.isos_dir.iterdir()] == []


def test_signed_download_is_ready_with_progress_events(harness, server: FileServer, publisher_key: PublisherKey):
    image = random_bytes(6 << 20)
    publish(server, publisher_key, {IMAGE: image, "testos-1.1-amd64.iso": b"older"})
    manager = harness.manager(signed_entry(server, publisher_key))
    with harness.bus.subscribe(accept=lambda e: e["type"] == "job.progress") as events:
        job = wait_done(manager, manager.submit("testos"))
        seen = []
        while (event := events.get(timeout=0.1)) is not None:
            seen.append(event)
    assert job.state == "ready", job.message
    assert job.filename == IMAGE                     # the newest name matching the pattern
    final = harness.data.isos_dir / IMAGE
    assert hashlib.sha256(final.read_bytes()).hexdigest() == sha256(image)
    record = json.loads((harness.data.isos_dir / f"{IMAGE}.json").read_text())
    assert record["trust"] == "signed" and record["signer"] == publisher_key.fingerprint
    assert record["sha256"] == sha256(image) and record["verified"] == ["checksum", "signature"]
    assert record["source"] == server.url(f"/pub/{IMAGE}")
    assert list(harness.data.downloads_dir.glob("*.part")) == [] and not list(harness.data.downloads_dir.glob("*.json"))
    states = [e["state"] for e in seen]
    assert states[0] == "queued" and states[-1] == "ready"
    assert {"resolving", "downloading", "verifying"} <= set(states)
    progress = [e for e in seen if e["state"] == "downloading" and e["bytes"]]
    assert progress and all({"bytes", "total", "rate", "eta", "percent"} <= set(e) for e in progress)
    assert progress[-1]["total"] == len(image)
    assert IsoLibrary(harness.data).find_ready("testos") == final


def test_resume_after_the_server_cuts_the_connection(harness, server: FileServer, publisher_key: PublisherKey):
    image = random_bytes(8 << 20)
    publish(server, publisher_key, {IMAGE: image}, cut_after=3 << 20, cuts=2)
    manager = harness.manager(signed_entry(server, publisher_key))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "ready", job.message
    transfers = server.requests_for(f"/pub/{IMAGE}")
    assert [t.status for t in transfers] == [200, 206, 206]
    assert [t.range for t in transfers] == [None, f"bytes={3 << 20}-", f"bytes={6 << 20}-"]
    assert sum(t.sent for t in transfers) == len(image)          # nothing fetched twice
    assert sha256((harness.data.isos_dir / IMAGE).read_bytes()) == sha256(image)


def test_server_without_range_support_restarts_from_zero_and_still_verifies(harness, server: FileServer,
                                                                             publisher_key: PublisherKey):
    image = random_bytes(4 << 20)
    publish(server, publisher_key, {IMAGE: image}, ranges=False, cut_after=1 << 20, cuts=1)
    manager = harness.manager(signed_entry(server, publisher_key))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "ready", job.message
    transfers = server.requests_for(f"/pub/{IMAGE}")
    assert [(t.range, t.status) for t in transfers] == [(None, 200), (f"bytes={1 << 20}-", 200)]
    assert transfers[1].sent == len(image)                      # the whole file again, from zero
    assert sha256((harness.data.isos_dir / IMAGE).read_bytes()) == sha256(image)


def test_changed_file_on_the_server_restarts_via_if_range(harness, server: FileServer, publisher_key: PublisherKey):
    image = random_bytes(3 << 20)
    publish(server, publisher_key, {IMAGE: image}, cut_after=1 << 20, cuts=1)
    # After the cut the publisher replaces the file (new ETag): If-Range no longer matches, so the
    # server sends the file whole and the download starts over instead of splicing two files.
    server.resources[f"/pub/{IMAGE}"].next_etag = '"replaced"'
    manager = harness.manager(signed_entry(server, publisher_key))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "ready", job.message
    transfers = server.requests_for(f"/pub/{IMAGE}")
    assert [(t.range is not None, t.status) for t in transfers] == [(False, 200), (True, 200)]
    assert transfers[1].sent == len(image)


def test_wrong_checksum_is_quarantined_with_the_reason(harness, server: FileServer, publisher_key: PublisherKey):
    image = random_bytes(2 << 20)
    publish(server, publisher_key, {IMAGE: image})
    server.resources[f"/pub/{IMAGE}"].data = image[:-1] + bytes([image[-1] ^ 1])   # one flipped bit on the wire
    manager = harness.manager(signed_entry(server, publisher_key))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "quarantined"
    assert "corrupt or altered" in job.error and sha256(image) in job.error
    assert_nothing_ready(harness.data)
    folder = harness.data.quarantine_dir / job.id
    reason = json.loads((folder / "reason.json").read_text())
    assert reason["reason"] == job.error and (folder / f"{IMAGE}.quarantined").exists()
    assert (folder / "checksums").exists() and (folder / "signature").exists()
    rows = IsoLibrary(harness.data).list(manager)
    assert [(r["name"], r["status"]) for r in rows] == [(IMAGE, "quarantined")]
    assert rows[0]["reason"] == job.error


def test_valid_checksum_with_a_bad_signature_is_refused_before_downloading(harness, server: FileServer,
                                                                          publisher_key: PublisherKey):
    image = random_bytes(1 << 20)
    publish(server, publisher_key, {IMAGE: image})
    # The checksum list is right, but the signature was made over another list.
    server.resources["/pub/SHA256SUMS.gpg"].data = publisher_key.sign(gnu_sums({IMAGE: b"something else"}))
    manager = harness.manager(signed_entry(server, publisher_key))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "quarantined"
    assert "does not match" in job.error and "SHA256SUMS" in job.error
    assert server.requests_for(f"/pub/{IMAGE}") == []           # a forged list costs no download
    assert_nothing_ready(harness.data)
    assert (harness.data.quarantine_dir / job.id / "signature").exists()


def test_signature_by_an_unknown_key_is_refused(harness, server: FileServer, publisher_key: PublisherKey,
                                                stranger_key: PublisherKey):
    image = random_bytes(1 << 20)
    publish(server, stranger_key, {IMAGE: image})              # a valid signature, by the wrong key
    manager = harness.manager(signed_entry(server, publisher_key))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "quarantined"
    assert "unknown key" in job.error and stranger_key.fingerprint in job.error
    assert publisher_key.fingerprint in job.error
    assert_nothing_ready(harness.data)


def test_signature_over_the_image_is_checked_after_the_download(harness, server: FileServer,
                                                                publisher_key: PublisherKey):
    image, other = random_bytes(2 << 20, 3), random_bytes(2 << 20, 4)
    server.add(f"/pub/{IMAGE}", image)
    server.add(f"/pub/{IMAGE}.sha256", gnu_sums({IMAGE: image}))
    server.add(f"/pub/{IMAGE}.asc", publisher_key.sign(other))   # signs some other image
    alpine_like = signed_entry(server, publisher_key, image={"pattern": r"testos-\d+\.\d+-amd64\.iso", "from": "listing"},
                               checksums={"file": "{image}.sha256"},
                               signature={"file": "{image}.asc", "kind": "detached", "over": "image"})
    manager = harness.manager(alpine_like)
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "quarantined" and "does not match" in job.error
    assert_nothing_ready(harness.data)
    server.resources[f"/pub/{IMAGE}.asc"].data = publisher_key.sign(image)
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "ready", job.message
    assert job.signer == publisher_key.fingerprint


def test_clearsigned_bsd_checksum_list_found_by_folder_listing(harness, server: FileServer, publisher_key: PublisherKey):
    image = random_bytes(1 << 20)
    publish(server, publisher_key, {IMAGE: image}, sums_name="TestOS-1-1.4-x86_64-CHECKSUM", style="bsd",
            signature="inline")
    fedora_like = signed_entry(server, publisher_key, checksums={"pattern": r"TestOS-{version}-[0-9.]+-x86_64-CHECKSUM"},
                               signature={"kind": "inline", "over": "checksums"})
    manager = harness.manager(fedora_like)
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "ready", job.message
    assert job.trust == "signed"


def test_404_fails_with_a_clear_message_and_mirrors_are_tried(harness, server: FileServer, publisher_key: PublisherKey):
    image = random_bytes(1 << 20)
    publish(server, publisher_key, {IMAGE: image}, folder="/mirror/")
    publish(server, publisher_key, {IMAGE: image})
    del server.resources[f"/pub/{IMAGE}"]                        # the primary lost the image
    manager = harness.manager(signed_entry(server, publisher_key, mirrors=[server.url("/mirror/")]))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "ready", job.message
    assert [t.status for t in server.requests_for(f"/pub/{IMAGE}")] == [404]
    assert len(server.requests_for(f"/mirror/{IMAGE}")) == 1

    lonely = harness.manager(signed_entry(server, publisher_key, id="lonely"))
    job = wait_done(lonely, lonely.submit("lonely"))
    assert job.state == "failed"
    assert "HTTP 404" in job.error and IMAGE in job.error
    assert not (harness.data.downloads_dir / f"{job.id}.part").exists()
    assert [p.name for p in harness.data.isos_dir.iterdir()] == [IMAGE, f"{IMAGE}.json"]   # only the first one


def test_retries_with_backoff_after_server_errors(harness, server: FileServer, publisher_key: PublisherKey):
    image = random_bytes(1 << 20)
    publish(server, publisher_key, {IMAGE: image}, fail_status=503, fails=2)
    manager = harness.manager(signed_entry(server, publisher_key))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "ready", job.message
    assert [t.status for t in server.requests_for(f"/pub/{IMAGE}")] == [503, 503, 200]


def test_slow_server_cancel_is_prompt_and_leaves_nothing(harness, server: FileServer, publisher_key: PublisherKey):
    image = random_bytes(4 << 20)
    publish(server, publisher_key, {IMAGE: image}, rate=200_000)
    manager = harness.manager(signed_entry(server, publisher_key))
    job = manager.submit("testos")
    with harness.bus.subscribe(accept=lambda e: e.get("job") == job.id and e["state"] == "downloading"
                               and e["bytes"] > 100_000) as events:
        assert events.get(timeout=30) is not None
    started = time.monotonic()
    manager.cancel(job.id)
    wait_done(manager, job, 10)
    assert time.monotonic() - started < 3
    assert job.state == "cancelled" and "cancelled" in job.message
    assert [p.name for p in harness.data.downloads_dir.iterdir() if p.is_file()] == []
    assert_nothing_ready(harness.data)


def test_pause_then_resume_continues_from_the_bytes_on_disk(harness, server: FileServer, publisher_key: PublisherKey):
    image = random_bytes(3 << 20)
    publish(server, publisher_key, {IMAGE: image}, rate=1_000_000)
    manager = harness.manager(signed_entry(server, publisher_key))
    job = manager.submit("testos")
    with harness.bus.subscribe(accept=lambda e: e.get("job") == job.id and e["bytes"] > 500_000) as events:
        assert events.get(timeout=30) is not None
    manager.pause(job.id)
    wait_done(manager, job, 10)
    assert job.state == "paused"
    part = harness.data.downloads_dir / f"{job.id}.part"
    paused_at = part.stat().st_size
    assert 0 < paused_at < len(image)
    rows = IsoLibrary(harness.data).list(manager)
    assert rows[0]["status"] == "downloading" and rows[0]["job_state"] == "paused"
    server.resources[f"/pub/{IMAGE}"].rate = None
    manager.resume(job.id)
    wait_done(manager, job)
    assert job.state == "ready", job.message
    assert server.requests_for(f"/pub/{IMAGE}")[-1].range == f"bytes={paused_at}-"


def test_parallel_downloads_are_limited_to_max_parallel(harness, server: FileServer, publisher_key: PublisherKey):
    files = {f"testos-1.{n}-amd64.iso": random_bytes(600_000, n) for n in range(3)}
    publish(server, publisher_key, files, rate=1_500_000)
    entries = [signed_entry(server, publisher_key, id=f"os{n}", image={"file": f"testos-1.{n}-amd64.iso"})
               for n in range(3)]
    manager = harness.manager(*entries, max_parallel=2)
    with harness.bus.subscribe(accept=lambda e: e["type"] == "job.progress") as events:
        jobs = [manager.submit(f"os{n}") for n in range(3)]
        for job in jobs:
            wait_done(manager, job)
        downloading: set[str] = set()
        most = 0
        while (event := events.get(timeout=0.1)) is not None:
            (downloading.add if event["state"] == "downloading" else downloading.discard)(event["job"])
            most = max(most, len(downloading))
    assert [job.state for job in jobs] == ["ready"] * 3
    assert most == 2                       # two at once, never three
    assert server.max_active >= 2          # and the server saw them overlap


def test_checksum_only_entry_is_labelled_and_no_checksum_is_refused(harness, server: FileServer):
    image = random_bytes(1 << 20)
    publish(server, None, {IMAGE: image})
    plain = entry(server)                                       # a checksum list, no signature
    bare = entry(server, id="bare", image={"file": IMAGE}, checksums=None)
    manager = harness.manager(plain, bare)
    assert plain.trust == "checksum only" and bare.trust == "no checksum"
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "ready" and job.trust == "checksum only"
    record = json.loads((harness.data.isos_dir / f"{IMAGE}.json").read_text())
    assert record["trust"] == "checksum only" and record["signer"] is None
    with pytest.raises(VerificationError, match="no checksum.*--sha256"):
        manager.submit("bare")
    with pytest.raises(VerificationError, match="--sha256"):
        manager.submit(server.url(f"/pub/{IMAGE}"))
    wrong = wait_done(manager, manager.submit("bare", sha256="0" * 64))
    assert wrong.state == "quarantined" and "the SHA-256 you gave" in wrong.error
    job = wait_done(manager, manager.submit("bare", sha256=sha256(image)))
    assert job.state == "ready" and job.trust == "user hash"


def test_url_download_with_user_hash(harness, server: FileServer):
    image = random_bytes(1 << 20)
    server.add("/files/thing.iso", image)
    manager = harness.manager()
    job = wait_done(manager, manager.submit(server.url("/files/thing.iso"), sha256=sha256(image).upper()))
    assert job.state == "ready" and job.trust == "user hash"
    with pytest.raises(ValidationError, match="neither a catalog id nor"):
        manager.submit("ftp://example.test/x.iso", sha256=sha256(image))


@pytest.mark.parametrize("kind", ["xz", "7z"])
def test_compressed_image_is_extracted_after_verification(harness, server: FileServer, publisher_key: PublisherKey,
                                                          kind: str, tmp_path: Path):
    inner = random_bytes(1 << 20, 7) + bytes(2 << 20)           # compressible tail
    name = f"testos-1.2-amd64.iso.{kind}"
    if kind == "xz":
        packed = lzma.compress(inner)
    else:
        import py7zr
        (tmp_path / IMAGE).write_bytes(inner)
        with py7zr.SevenZipFile(tmp_path / "a.7z", "w") as archive:
            archive.write(tmp_path / IMAGE, IMAGE)
        packed = (tmp_path / "a.7z").read_bytes()
    publish(server, publisher_key, {name: packed})
    manager = harness.manager(signed_entry(server, publisher_key, image={"file": name}))
    with harness.bus.subscribe(accept=lambda e: e["type"] == "job.progress") as events:
        job = wait_done(manager, manager.submit("testos"))
        states = []
        while (event := events.get(timeout=0.1)) is not None:
            states.append(event["state"])
    assert job.state == "ready", job.message
    assert states.index("verifying") < states.index("extracting") < states.index("ready")
    final = harness.data.isos_dir / IMAGE
    assert final.read_bytes() == inner
    record = json.loads((harness.data.isos_dir / f"{IMAGE}.json").read_text())
    assert record["sha256"] == sha256(inner) and record["compressed"]["digest"] == sha256(packed)
    assert not list(harness.data.downloads_dir.glob(f"{job.id}*"))


def test_corrupt_compressed_image_never_extracts(harness, server: FileServer, publisher_key: PublisherKey):
    packed = lzma.compress(bytes(1 << 20))
    name = "testos-1.2-amd64.iso.xz"
    publish(server, publisher_key, {name: packed})
    server.resources[f"/pub/{name}"].data = packed[:100] + b"\0" + packed[101:]
    manager = harness.manager(signed_entry(server, publisher_key, image={"file": name}))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "quarantined"
    assert_nothing_ready(harness.data)


def test_a_new_process_resumes_the_partial_file(harness, server: FileServer, publisher_key: PublisherKey):
    """In-process restart: the manager goes away mid-download (close pauses), a new one resumes from disk."""
    image = random_bytes(3 << 20)
    publish(server, publisher_key, {IMAGE: image}, rate=1_000_000)
    first = harness.manager(signed_entry(server, publisher_key))
    job = first.submit("testos")
    with harness.bus.subscribe(accept=lambda e: e.get("job") == job.id and e["bytes"] > 600_000) as events:
        assert events.get(timeout=30) is not None
    first.close()
    done = (harness.data.downloads_dir / f"{job.id}.part").stat().st_size
    server.resources[f"/pub/{IMAGE}"].rate = None
    second = harness.manager(signed_entry(server, publisher_key))
    assert second.get(job.id).state == "paused"                 # restored from the sidecar
    again = wait_done(second, second.submit("testos"))
    assert again.state == "ready", again.message
    assert server.requests_for(f"/pub/{IMAGE}")[-1].range == f"bytes={done}-"
    assert len(server.requests_for("/pub/SHA256SUMS")) == 1     # the verified list was kept, not fetched again


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 12 MiB tmpfs: the data folder on a nearly full disk."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs and needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_refused_before_the_start(small_disk: Path, server: FileServer, publisher_key: PublisherKey,
                                               keyring):
    from downloads.conftest import Harness
    from thalunix.events import EventBus
    from thalunix.store import DataFolder
    data = DataFolder.open(small_disk / "data")
    harness = Harness(data, EventBus(), keyring)
    image = random_bytes(20 << 20)
    publish(server, publisher_key, {IMAGE: image})
    manager = harness.manager(signed_entry(server, publisher_key))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "failed" and job.error_code == "no-space"
    assert "not enough free space" in job.error and str(data.downloads_dir) in job.error
    assert not (data.downloads_dir / f"{job.id}.part").exists()   # stopped at the headers: nothing written
    assert_nothing_ready(data)
    manager.close()


def test_disk_filling_up_mid_download_fails_clearly(small_disk: Path, server: FileServer, publisher_key: PublisherKey,
                                                    keyring):
    from downloads.conftest import Harness
    from thalunix.events import EventBus
    from thalunix.store import DataFolder
    data = DataFolder.open(small_disk / "data")
    harness = Harness(data, EventBus(), keyring)
    image = random_bytes(20 << 20)
    publish(server, publisher_key, {IMAGE: image}, chunked=True)   # no size announced: no check possible up front
    manager = harness.manager(signed_entry(server, publisher_key))
    job = wait_done(manager, manager.submit("testos"))
    assert job.state == "failed" and job.error_code == "no-space"
    assert "is full" in job.error and "resumes" in job.error
    assert_nothing_ready(data)
    rows = IsoLibrary(data).list(manager)
    assert rows[0]["status"] == "downloading" and rows[0]["job_state"] == "failed"
    manager.cancel(job.id)
    assert not (data.downloads_dir / f"{job.id}.part").exists()
    manager.close()


def test_local_iso_add(data, tmp_path: Path):
    iso = tmp_path / "mine.iso"
    iso.write_bytes(b"an iso" * 1000)
    library = IsoLibrary(data)
    with pytest.raises(VerificationError, match="does not match"):
        library.add(iso, sha256="ab" * 32)
    assert library.ready() == []
    row = library.add(iso, sha256=sha256(iso.read_bytes()))
    assert row["status"] == "ready" and row["trust"] == "user hash" and row["full_path"] == str(iso)
    assert library.find_ready("mine") == iso                     # registered where it lies
    copied = IsoLibrary(data).add(iso, copy=True)
    assert copied["trust"] == "local" and Path(copied["full_path"]).parent == data.isos_dir


def test_signed_entry_without_its_key_is_refused_at_once(harness, server: FileServer, publisher_key: PublisherKey):
    publish(server, publisher_key, {IMAGE: random_bytes(1 << 20)})
    manager = harness.manager(signed_entry(server, publisher_key, fingerprints=["0" * 40]))
    with pytest.raises(VerificationError, match="not in the keyring.*--refresh-keys"):
        manager.submit("testos")
    assert server.log == []

