#!/usr/bin/env python3
"""The portable exe: its size, and launch → the API answering, first launch and warm, against a one-dir build.

What is measured (issue goals: one-file exe ≤ 100 MB with everything inside; warm launch ≤ 0.5 s; first
launch ≤ 2 s; median of ≥ 5):

* size — ``dist/thalunix`` (one file: Python, Thalunix, and the packed runtime: QEMU, qemu-img, swtpm,
  firmware, the TPM helper VM, the web UI, licences), and the one-dir build's folder for comparison.
* launch — ``t0``, ``Popen([exe, "--data-dir", D, "serve"])``; read the one line ``serve`` prints (the
  URL); ``GET`` it until the first 200 → ``t1``. Then SIGTERM and wait (not timed).
  *first*: a fresh data folder D each time, so the runtime is unpacked out of the exe into
  ``D/runtime/<sha256>/`` (checked file by file); *warm*: the same D again (the runtime is reused).
* baseline — the same app built one-dir (``build.py exe --onedir``: nothing unpacked by PyInstaller's
  bootloader), measured in the same rounds, alternating one-file / one-dir, so load drift hits both.

Both builds come from ``build.py exe`` (cached by their inputs). Nothing of the developer's is used:
every data folder is temporary.

Usage::

    .venv/bin/python bench/exe_start.py                       # 5 rounds
    .venv/bin/python bench/exe_start.py --runs 7 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Portable exe: size and launch to API"
GOALS = {"size_mb": 100.0, "warm_s": 0.5, "first_s": 2.0}


def build(onedir: bool) -> Path:
    args = [sys.executable, str(REPO / "build.py"), "exe"] + (["--onedir"] if onedir else [])
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"build.py exe failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    product = Path(done.stdout.strip().splitlines()[-1])
    return product / product.name if onedir else product


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def launch(exe: Path, data: Path, timeout: float = 60) -> float:
    """Seconds from Popen to the first 200 from the URL ``serve`` printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THALUNIX_", "VIRTUAL_ENV", "PYTHON"))}
    env.pop("DISPLAY", None)
    start = time.perf_counter()
    proc = subprocess.Popen([str(exe), "--data-dir", str(data), "serve"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"serve printed {url!r}; stderr: {proc.stderr.read() if proc.stderr else ''}")
        deadline = start + timeout
        while True:
            try:
                # the link's token is swapped for a cookie (and a redirect): keep cookies, as a browser does
                opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
                with opener.open(url, timeout=5) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - start
            except OSError:
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stats(values: list[float]) -> str:
    return (f"{statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} | "
            f"{statistics.stdev(values) if len(values) > 1 else 0:.3f}")


def verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "**not met**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--results", type=Path, help="write/replace this benchmark's section in this file")
    args = parser.parse_args(argv)

    onefile, onedir = build(onedir=False), build(onedir=True)
    sizes = {"one-file exe": onefile.stat().st_size, "one-dir folder": folder_size(onedir.parent)}
    load_before = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {k: {"first": [], "warm": []} for k in ("one-file", "one-dir")}
    with tempfile.TemporaryDirectory(prefix="thalunix-bench-exe-") as temp:
        for _ in range(2):   # warm-up, excluded: page cache for both builds
            for kind, exe in (("one-file", onefile), ("one-dir", onedir)):
                launch(exe, Path(temp) / f"warmup-{kind}")
        for round_ in range(args.runs):
            for kind, exe in (("one-file", onefile), ("one-dir", onedir)):
                data = Path(temp) / f"{kind}-{round_}"
                times[kind]["first"].append(launch(exe, data))
                times[kind]["warm"].append(launch(exe, data))
                shutil.rmtree(data, ignore_errors=True)
    load_after = os.getloadavg()

    med = {k: {w: statistics.median(v) for w, v in d.items()} for k, d in times.items()}
    size_mb = sizes["one-file exe"] / 1e6
    lines = [SECTION, "",
             f"- Command: `.venv/bin/python bench/exe_start.py --runs {args.runs}"
             f"{' --results ' + str(args.results) if args.results else ''}`",
             f"- Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- Machine: {platform.system()} {platform.machine()}, nproc {os.cpu_count()}, Python "
             f"{platform.python_version()}; load average before {' '.join(f'{x:.2f}' for x in load_before)}, after "
             f"{' '.join(f'{x:.2f}' for x in load_after)} (other work shares this machine)",
             "- Launch = Popen → `serve` prints its URL → first HTTP 200 from it; first = fresh data folder (runtime "
             "unpacked from the exe and checked), warm = same folder again. 2 warm-up rounds excluded; "
             "rounds alternate one-file / one-dir.", "",
             "| size | bytes | MB |", "| --- | ---: | ---: |"]
    for name, value in sizes.items():
        lines.append(f"| {name} | {value} | {value / 1e6:.1f} |")
    lines += ["", f"| {args.runs} rounds (s) | median | min | max | stdev |", "| --- | ---: | ---: | ---: | ---: |"]
    for kind in ("one-file", "one-dir"):
        for when in ("first", "warm"):
            lines.append(f"| {kind} {when} | {stats(times[kind][when])} |")
    lines += ["", f"**One-file exe {size_mb:.1f} MB** (goal ≤ {GOALS['size_mb']:.0f} MB: "
              f"{verdict(size_mb, GOALS['size_mb'])}); **warm launch {med['one-file']['warm']:.3f} s** (goal ≤ "
              f"{GOALS['warm_s']} s: {verdict(med['one-file']['warm'], GOALS['warm_s'])}; one-dir "
              f"{med['one-dir']['warm']:.3f} s, ratio {med['one-file']['warm'] / med['one-dir']['warm']:.2f}×); "
              f"**first launch {med['one-file']['first']:.3f} s** (goal ≤ {GOALS['first_s']} s: "
              f"{verdict(med['one-file']['first'], GOALS['first_s'])}; one-dir {med['one-dir']['first']:.3f} s). "
              f"The first-launch extra over warm is the runtime's unpack and check "
              f"(+{med['one-file']['first'] - med['one-file']['warm']:.3f} s one-file, "
              f"+{med['one-dir']['first'] - med['one-dir']['warm']:.3f} s one-dir); the one-file warm extra over "
              "one-dir is PyInstaller's own per-launch unpack of Python and its extensions."]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.results:
        text = args.results.read_text() if args.results.is_file() else "# Benchmark results\n"
        if SECTION in text:
            head, rest = text.split(SECTION, 1)
            nxt = rest.find("\n## ")
            text = head + markdown.rstrip() + "\n" + (rest[nxt:] if nxt >= 0 else "")
        else:
            text = text.rstrip() + "\n\n" + markdown
        args.results.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
