"""The shared folder: a file written on the host is read in the guest (busybox wget), a file PUT by the guest
lands on the host; only through the guest's user network (a UNIX socket in run/, no TCP port)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from thalunix.engine import DirectEngine

from .conftest import boot, nat_up, run


def test_shared_folder_round_trip(engine: DirectEngine, make_vm, tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    (folder / "sub").mkdir(parents=True)
    (folder / "from-host.txt").write_text("written-on-the-host\n")
    payload = os.urandom(300_000)
    (folder / "sub" / "blob.bin").write_bytes(payload)
    make_vm("sharer")
    info = engine.share_set("sharer", str(folder))
    assert info["folder"] == str(folder) and info["guest_url"] == "http://10.0.2.100/"
    boot(engine, "sharer")
    config = engine.get("sharer")
    argv = " ".join(engine.supervisor.sessions[config.id].record.argv)
    assert "guestfwd=tcp:10.0.2.100:80-unix:share.sock" in argv
    assert engine.data.vm_path(config.id, "run", "share.sock").exists()
    nat_up(engine, "sharer")

    assert run(engine, "sharer", "wget -q -O - http://10.0.2.100/from-host.txt") == "written-on-the-host"
    digest = hashlib.sha256(payload).hexdigest()
    assert run(engine, "sharer", "wget -q -O - http://10.0.2.100/sub/blob.bin | sha256sum | cut -d' ' -f1") == digest
    # The other way: the guest writes (busybox wget has no PUT: POST with the override header).
    run(engine, "sharer", "echo written-in-the-guest-$((6*7)) > /tmp/g.txt; dd if=/dev/urandom of=/tmp/g.bin "
                          "bs=1k count=200 2>/dev/null")
    guest_digest = run(engine, "sharer", "sha256sum /tmp/g.bin | cut -d' ' -f1")
    out = run(engine, "sharer", "wget -q -O - --header 'X-HTTP-Method-Override: PUT' --post-file /tmp/g.txt "
                                "http://10.0.2.100/sub/g.txt && echo PUT-OK")
    assert out.endswith("PUT-OK"), out
    # busybox wget posts a file as a C string (it stops at the first NUL): binary goes up as a real PUT with nc.
    # The server keeps the stream open (guestfwd carries every connection over one), so nc is ended by timeout.
    out = run(engine, "sharer", "{ printf 'PUT /sub/g.bin HTTP/1.1\\r\\nHost: 10.0.2.100\\r\\nContent-Length: "
                                "%d\\r\\n\\r\\n' $(stat -c %s /tmp/g.bin); cat /tmp/g.bin; } | "
                                "timeout 8 nc 10.0.2.100 80 | head -1", timeout=120)
    assert out.startswith("HTTP/1.1 201 Created"), out
    assert (folder / "sub" / "g.txt").read_text() == "written-in-the-guest-42\n"
    assert hashlib.sha256((folder / "sub" / "g.bin").read_bytes()).hexdigest() == guest_digest
    # Listing (PROPFIND-less clients get HTML) and confinement: nothing outside the folder.
    assert "g.bin" in run(engine, "sharer", "wget -q -O - http://10.0.2.100/sub/")
    (tmp_path / "secret.txt").write_text("outside")
    out = run(engine, "sharer", "wget -q -O - http://10.0.2.100/../secret.txt || echo REFUSED")
    assert out.endswith("REFUSED") and "outside" not in out
    out = run(engine, "sharer", "wget -q -O - http://10.0.2.100/%2e%2e/secret.txt || echo REFUSED")
    assert out.endswith("REFUSED") and "outside" not in out
    info = engine.share_info("sharer")
    assert info["serving"]
    deadline = time.monotonic() + 30   # the server process publishes its count every few seconds
    while engine.share_info("sharer")["requests"] < 5 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert engine.share_info("sharer")["requests"] >= 5
    # The server is a process of its own: it outlives this Thalunix and leaves with the VM.
    pid = engine.data.read_json(engine.data.vm_path(config.id, "run", "share.json"))["pid"]
    assert pid != os.getpid()
    engine.stop("sharer", force=True)
    deadline = time.monotonic() + 30
    while engine.share_info("sharer")["serving"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not engine.share_info("sharer")["serving"]
