#!/usr/bin/env python3
"""``GET /api/vms`` with 500 VMs in the data folder, through the real server (goal: p95 ≤ 50 ms).

What is measured:

* A temporary data folder gets N VMs (default 500; BIOS, 64 MiB, each with an ISO and a disk in
  its config, all stopped) through ``DataFolder.create_vm``.
* ``thalunix serve`` runs as its own process on that folder (as in use: the client does not share
  its interpreter); the one line it prints gives the URL and token.
* One ``requests`` session (keep-alive) sends ``GET /api/vms`` R times (default 200) after W
  warm-up requests (default 5); each is timed from send to the whole body parsed as JSON, and
  checked to list every VM as stopped. The first request ever (every vm.json parsed) is reported
  on its own.
* Baseline beside it, alternating: ``GET /api/openapi.json`` (a constant document of similar
  size) on the same server: the cost of HTTP + JSON alone, so the ratio shows what listing adds.
* After the run the server must have started no process (no QEMU) and opened no socket other than
  its listener and the client's connection: listing stopped VMs must not touch QEMU.

Usage::

    .venv/bin/python bench/api_list.py                         # 500 VMs, 200 requests
    .venv/bin/python bench/api_list.py --vms 500 --requests 400 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from thalunix.model import CDRom, Disk, VMConfig  # noqa: E402
from thalunix.store import DataFolder  # noqa: E402

GOAL_MS = 50.0
SECTION = "## API: GET /api/vms with 500 VMs"


def make_vms(data: DataFolder, count: int) -> float:
    iso = data.isos_dir / "install.iso"
    iso.write_bytes(b"\0" * 2048)
    started = time.perf_counter()
    for index in range(count):
        config = VMConfig(name=f"vm-{index:04d}", ram_mib=64, cpus=1, firmware="bios", tpm="off",
                          cdroms=[CDRom(path="isos/install.iso")])
        config.set_defaults()
        config.disks = [Disk(path=f"vms/{config.id}/disks/disk0.qcow2")]
        config.set_defaults()
        data.create_vm(config)
    return time.perf_counter() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def timed_get(session: requests.Session, url: str) -> tuple[float, object]:
    started = time.perf_counter()
    answer = session.get(url, timeout=60)
    body = answer.json()
    elapsed = (time.perf_counter() - started) * 1000
    answer.raise_for_status()
    return elapsed, body


def children_and_sockets(pid: int) -> tuple[list[str], int]:
    """The server's child processes and how many sockets it holds (from /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        listed = (task / "children").read_text().split()
        children += [Path(f"/proc/{child}/comm").read_text().strip() for child in listed]
    sockets = sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd).startswith("socket:"))
    return children, sockets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=500)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--results", type=Path, help="write/replace this benchmark's section in this markdown file")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="thalunix-bench-api-"))
    server: subprocess.Popen | None = None
    try:
        data = DataFolder.open(folder / "data")
        setup = make_vms(data, args.vms)
        print(f"created {args.vms} VMs in {setup:.1f} s", file=sys.stderr)
        server = subprocess.Popen([sys.executable, "-m", "thalunix", "--data-dir", str(data.root), "serve"],
                                  cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        launch = server.stdout.readline().strip()
        base, _, token = launch.partition("/?token=")
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        load_before = os.getloadavg()

        first, rows = timed_get(session, base + "/api/vms")
        assert isinstance(rows, list) and len(rows) == args.vms, f"listed {len(rows)} of {args.vms}"
        for _ in range(args.warmup):
            timed_get(session, base + "/api/vms")
            timed_get(session, base + "/api/openapi.json")
        listing, baseline = [], []
        for _ in range(args.requests):
            elapsed, rows = timed_get(session, base + "/api/vms")
            assert len(rows) == args.vms and all(row["state"] == "stopped" for row in rows)  # type: ignore[union-attr]
            listing.append(elapsed)
            baseline.append(timed_get(session, base + "/api/openapi.json")[0])
        load_after = os.getloadavg()
        children, sockets = children_and_sockets(server.pid)
        body_bytes = len(session.get(base + "/api/vms", timeout=60).content)
        openapi_bytes = len(session.get(base + "/api/openapi.json", timeout=60).content)
        session.close()
        assert not children, f"listing started processes: {children}"
        assert not list(data.root.glob("vms/*/run/state.json")), "a VM has run state"

        p50, p95, p99 = (percentile(listing, q) for q in (0.5, 0.95, 0.99))
        b50, b95 = percentile(baseline, 0.5), percentile(baseline, 0.95)
        verdict = "met" if p95 <= GOAL_MS else "**not met**"
        command = "python bench/api_list.py" + "".join(
            f" --{name} {value}" for name, value in (("vms", args.vms), ("requests", args.requests))) + \
            (" --results bench/RESULTS.md" if args.results else "")
        markdown = "\n".join([
            SECTION.replace("500", str(args.vms)),
            "",
            f"- Command: `{command}`",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
            f"- Machine: {platform.system()} {platform.machine()}, nproc {os.cpu_count()}, "
            f"Python {platform.python_version()}; load average before {' '.join(f'{v:.2f}' for v in load_before)}, "
            f"after {' '.join(f'{v:.2f}' for v in load_after)} (other work shares this machine)",
            f"- Server: `thalunix serve` in its own process (waitress, 127.0.0.1); client: one keep-alive "
            f"`requests` session, timed send → JSON parsed; {args.warmup} warm-up pairs excluded",
            f"- Data: {args.vms} stopped VMs (each with an ISO and a disk in its config); answer "
            f"{body_bytes / 1024:.0f} KiB; baseline `GET /api/openapi.json` ({openapi_bytes / 1024:.0f} KiB), "
            "alternating with the listing",
            f"- First listing of a fresh server (every vm.json parsed): {first:.1f} ms",
            "",
            f"| {args.requests} requests each | p50 ms | p95 ms | p99 ms | max ms | mean ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            f"| `GET /api/vms` ({args.vms} VMs) | {p50:.1f} | {p95:.1f} | {p99:.1f} | {max(listing):.1f} | "
            f"{statistics.mean(listing):.1f} |",
            f"| baseline `GET /api/openapi.json` | {b50:.1f} | {b95:.1f} | {percentile(baseline, 0.99):.1f} | "
            f"{max(baseline):.1f} | {statistics.mean(baseline):.1f} |",
            "",
            f"**p95 {p95:.1f} ms**, goal ≤ {GOAL_MS:.0f} ms: {verdict}. Listing / baseline (p50): "
            f"{p50 / b50:.2f}×. The server started no process and held {sockets} sockets at the end "
            "(its listener, the client's connection, and the socket pair of the engine's asyncio loop): no QEMU, no VM socket.",
            "",
        ])
        print(markdown)
        if args.results:
            write_results(args.results, markdown)
        return 0 if p95 <= GOAL_MS else 1
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def write_results(path: Path, markdown: str) -> None:
    """Replace this benchmark's own section, or append it; other sections are left as they are."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n\nSee README.md for how these are made.\n"
    heading = markdown.splitlines()[0]
    if heading in text:
        head, rest = text.split(heading, 1)
        following = rest.find("\n## ")
        text = head + markdown.rstrip() + "\n" + (rest[following:] if following >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + markdown.rstrip() + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
