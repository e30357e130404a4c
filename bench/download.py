"""Benchmark: download + verification of a 1 GiB image over loopback, Thalunix vs ``curl -o f && sha256sum f``.

Thalunix hashes while the bytes arrive (a second thread, OpenSSL's SHA-256), so its total should be
close to the transfer alone; the baseline downloads, then reads the file again to hash it. Goal:
Thalunix / baseline ≤ 0.8×.

What is timed on the Thalunix side is the whole path a user waits for: ``DownloadManager.submit()`` of a
signed catalog entry (SHA256SUMS + a detached signature made by a key generated here) until the job is
``ready`` — fetching and verifying the signed list, the transfer with hashing, the checksum and signature
checks, the move into ``isos/`` and its sidecar. A second baseline, ``curl && openssl dgst -sha256``,
uses the same SHA-256 implementation as Thalunix, to show what the overlap alone buys.

The server runs in its own process (sendfile from the page cache), so it shares no GIL with either side.
Rounds alternate (Thalunix, curl+sha256sum, curl+openssl, …) so the load of a shared machine hits all
alike. The output files are deleted after each run.

Example::

    .venv/bin/python bench/download.py                     # 1 GiB, 5 rounds
    .venv/bin/python bench/download.py --size-mib 1024 --runs 5 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SECTION = "## ISO download + verification (1 GiB over loopback)"
GOAL = 0.8
IMAGE = "bench-1.0-amd64.iso"


def serve(folder: Path) -> None:
    """Child process: serve the folder's files until stdin closes; print the port first."""
    from downloads.server import FileServer
    with FileServer() as server:
        for item in folder.iterdir():
            server.add("/pub/" + item.name, file=item)
        print(server.port, flush=True)
        sys.stdin.read()


def make_image(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 8 << 20))
            handle.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def timed_shell(command: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user+sys of the children) of one shell command."""
    before = os.times()
    start = time.perf_counter()
    subprocess.run(command, shell=True, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--results", type=Path, help="write/replace this benchmark's section in the file")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    for tool in ("curl", "sha256sum"):
        if not shutil.which(tool):
            print(f"bench: {tool} is needed for the baseline (apt-get install {tool})", file=sys.stderr)
            return 2

    from downloads.conftest import make_key
    from thalunix.downloads import Catalog, CatalogEntry, DownloadManager, Keyring
    from thalunix.events import EventBus
    from thalunix.store import DataFolder

    work = Path(tempfile.mkdtemp(prefix="thalunix-bench-dl-"))
    server = None
    try:
        published = work / "published"
        published.mkdir()
        size = args.size_mib << 20
        print(f"making a {args.size_mib} MiB image …", flush=True)
        digest = make_image(published / IMAGE, size)
        key = make_key("Bench Publisher")
        sums = f"{digest}  {IMAGE}\n".encode()
        (published / "SHA256SUMS").write_bytes(sums)
        (published / "SHA256SUMS.gpg").write_bytes(key.sign(sums))
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(published)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        port = int(server.stdout.readline())  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}/pub/"
        entry = CatalogEntry.from_dict({
            "id": "bench", "name": "Bench OS", "base_url": base, "image": {"file": IMAGE},
            "checksums": {"file": "SHA256SUMS"}, "fingerprints": [key.fingerprint],
            "signature": {"file": "SHA256SUMS.gpg", "kind": "detached", "over": "checksums"}})
        data = DataFolder.open(work / "data")
        manager = DownloadManager(data, EventBus(), catalog=Catalog([entry]), keyring=Keyring([key.public]))
        out = work / "curl-out.iso"
        has_openssl = bool(shutil.which("openssl"))

        def ours() -> tuple[float, float]:
            cpu = time.process_time()
            start = time.perf_counter()
            job = manager.wait(manager.submit("bench").id, 600)
            wall = time.perf_counter() - start
            cpu = time.process_time() - cpu
            if job.state != "ready" or job.signer != key.fingerprint:
                raise SystemExit(f"bench: the download ended {job.state}: {job.message}")
            os.unlink(job.result["file"])
            os.unlink(job.result["file"] + ".json")
            return wall, cpu

        def curl_sha256sum() -> tuple[float, float]:
            result = timed_shell(f"curl -sS --fail -o {out} {base}{IMAGE} && sha256sum {out}")
            out.unlink()
            return result

        def curl_openssl() -> tuple[float, float]:
            result = timed_shell(f"curl -sS --fail -o {out} {base}{IMAGE} && openssl dgst -sha256 {out}")
            out.unlink()
            return result

        def curl_only() -> tuple[float, float]:
            result = timed_shell(f"curl -sS --fail -o {out} {base}{IMAGE}")
            out.unlink()
            return result

        sides = {"thalunix": ours, "curl && sha256sum": curl_sha256sum, "curl alone (transfer only)": curl_only}
        if has_openssl:
            sides["curl && openssl dgst -sha256"] = curl_openssl
        print("warm-up (excluded): one run of each", flush=True)
        for run in sides.values():
            run()
        load_before = os.getloadavg()
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        ratios = []
        for round_number in range(args.runs):
            for name, run in sides.items():
                times[name].append(run())
            ratio = times["thalunix"][-1][0] / times["curl && sha256sum"][-1][0]
            ratios.append(ratio)
            print(f"round {round_number + 1}: " + ", ".join(f"{n} {t[-1][0]:.2f} s" for n, t in times.items())
                  + f"  ratio {ratio:.3f}", flush=True)
        load_after = os.getloadavg()
    finally:
        if server is not None:
            server.stdin.close()  # type: ignore[union-attr]
            server.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    median = {name: statistics.median(w for w, _ in values) for name, values in times.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}
    ratio = median["thalunix"] / median["curl && sha256sum"]
    verdict = "met" if ratio <= GOAL else "not met"
    mib = size / (1 << 20)
    rows = "\n".join(f"| {name} | {median[name]:.2f} | {min(w for w, _ in times[name]):.2f} | "
                     f"{max(w for w, _ in times[name]):.2f} | {mib / median[name]:.0f} | {cpu[name]:.2f} |"
                     for name in times)
    command = "python bench/download.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = f"""{SECTION}

- Command: `{command.strip()}`
- Date: {datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
- Machine: {platform.system()} {platform.machine()}, nproc {os.cpu_count()}, Python {platform.python_version()}, \
{subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.splitlines()[0].split(" (")[0]}
- Load average (1/5/15 min) before: {" ".join(f"{v:.2f}" for v in load_before)}, after: \
{" ".join(f"{v:.2f}" for v in load_after)} (other work shares this machine; rounds alternate)
- Image: {mib:.0f} MiB of random bytes served from the page cache by a separate process (sendfile); \
output written to the same disk; warm-up run of each side excluded
- Thalunix side: `DownloadManager.submit()` of a signed catalog entry until `ready` (fetch + verify the signed \
SHA256SUMS, transfer with SHA-256 in a second thread, checksum and signature checks, move into isos/, sidecar)

| {args.runs} alternating rounds | median s | min s | max s | MiB/s | CPU s (median) |
| --- | ---: | ---: | ---: | ---: | ---: |
{rows}

**Ratio Thalunix / (curl && sha256sum): {ratio:.3f}×** (median of per-round ratios \
{statistics.median(ratios):.3f}×). Goal ≤ {GOAL}×: **{verdict}**.
"""
    if "curl && openssl dgst -sha256" in median:
        markdown += (f"\nAgainst `curl && openssl dgst -sha256` (the same SHA-256 code as Thalunix, so only the "
                     f"overlap of hashing and transfer differs): "
                     f"{median['thalunix'] / median['curl && openssl dgst -sha256']:.3f}×. "
                     f"Part of the main ratio is the hash code: see the CPU column (coreutils `sha256sum` vs "
                     f"OpenSSL, which uses the CPU's SHA instructions where present). Against the transfer alone: "
                     f"{median['thalunix'] / median['curl alone (transfer only)']:.3f}×.\n")
    print()
    print(markdown)
    if args.results:
        path = args.results
        text = path.read_text() if path.is_file() else "# Benchmark results\n\nSee README.md for how these are made.\n"
        if SECTION in text:
            head, rest = text.split(SECTION, 1)
            nxt = rest.find("\n## ")
            text = head + markdown.rstrip() + "\n" + (rest[nxt:] if nxt >= 0 else "")
        else:
            text = text.rstrip() + "\n\n" + markdown.rstrip() + "\n"
        path.write_text(text)
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
