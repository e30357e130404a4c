#!/usr/bin/env python3
"""The swtpm helper micro-VM: launch → first TPM2 command answered, QEMU peak RSS, guest RAM floor, image size.

What is measured (issue goals: ≤ 1.5 s median of ≥ 5 under TCG, QEMU peak RSS ≤ 96 MB, guest RAM 64 MB):

* CPU seconds — user + system time of the helper's QEMU at that moment: the same boot's cost
  less dependent on what else runs (this machine is shared; wall time on an idle core is close to it,
  as a 1-vCPU TCG guest runs on one thread).
* launch → answered — :meth:`thalunix.tpm.helper.HelperVM.start` as Thalunix runs it: ``t0`` just
  before ``Popen`` of QEMU, ``t1`` when a raw ``TPM2_GetRandom`` sent to the forwarded data port on
  127.0.0.1 gets a TPM response (polled every 20 ms). The state disk exists already (formatted by a
  warm-up boot, reported apart): that is every start but a VM's first. Each run is stopped cleanly
  (``CMD_SHUTDOWN``) and not timed.
* peak RSS — ``VmHWM`` of the helper's QEMU after a small tpm2-tools workload (startup, getrandom,
  NV define/write/read, PCR extend), read just before the clean stop.
* RAM floor — the smallest ``-m`` (from a list) at which the helper boots and serves that workload
  (each size on a fresh state disk, so it includes formatting).
* image size — the files ``helper-vm/build.py`` produces (what a bundle carries), raw and zstd -3.

Usage::

    python bench/tpm_helper.py --runs 7 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from thalunix.runtime import Runtime  # noqa: E402
from thalunix.tpm.helper import TCG_TB_MIB, HelperImage, HelperVM  # noqa: E402

SECTION = "## TPM helper VM"
RAM_STEPS = (24, 32, 40, 48, 64)


def tpm2(helper: HelperVM, *args: str, data: bytes | None = None) -> bool:
    env = {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:host=127.0.0.1,port={helper.data_port}"}
    done = subprocess.run(list(args), input=data, capture_output=True, env=env, timeout=120)
    return done.returncode == 0


def workload(helper: HelperVM) -> bool:
    steps = [
        tpm2(helper, "tpm2_startup", "-c"),
        tpm2(helper, "tpm2_getrandom", "32"),
        tpm2(helper, "tpm2_nvdefine", "0x1500020", "-C", "o", "-s", "64", "-a",
             "ownerread|ownerwrite|authread|authwrite") or True,   # defined already on a reused disk
        tpm2(helper, "tpm2_nvwrite", "0x1500020", "-C", "o", "-i", "-", data=b"x" * 64),
        tpm2(helper, "tpm2_nvread", "0x1500020", "-C", "o", "-s", "64"),
        tpm2(helper, "tpm2_pcrextend", "16:sha256=" + "ab" * 32),
    ]
    return all(steps)


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used: what the boot costs, whatever else shares the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make(runtime: Runtime, image: HelperImage, disk: Path, **kw) -> HelperVM:
    return HelperVM(runtime.qemu, image, disk, machines=runtime.caps.machines, **kw)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--results", type=Path, default=None, help="replace/append the section in this file")
    args = parser.parse_args(argv)
    if not shutil.which("tpm2_startup"):
        sys.exit("tpm2-tools is needed (apt-get install tpm2-tools)")
    runtime = Runtime.discover()
    image = HelperImage.load(runtime.helper_vm)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="tpm-bench-"))
    try:
        disk = work / "state.img"
        first = make(runtime, image, disk)
        first.start()
        first_boot = first.ready_seconds
        assert workload(first), "the tpm2-tools workload failed"
        first.stop()

        times, cpus = [], []
        for _ in range(args.runs):
            helper = make(runtime, image, disk)
            helper.start()
            times.append(helper.ready_seconds)
            assert helper.proc is not None
            cpus.append(cpu_seconds(helper.proc.pid))
            helper.stop()

        rss: dict[int, float] = {}
        served: dict[int, bool] = {}
        floor = None
        for ram in RAM_STEPS:
            helper = make(runtime, image, work / f"state-{ram}.img", ram_mib=ram, ready_timeout=30)
            try:
                helper.start()
                ok = workload(helper)
                assert helper.proc is not None
                rss[ram] = peak_rss_mib(helper.proc.pid)
                helper.stop()
            except Exception:  # noqa: BLE001 - below the floor the guest panics; that is the measurement
                helper.kill()
                ok = False
            served[ram] = ok
            if ok and floor is None:
                floor = ram
        default_rss = rss.get(image.ram_mib, 0.0)

        files = [image.kernel.name, image.initrd.name] + ([image.rootfs.name] if image.rootfs else [])
        sizes = {name: (image.folder / name).stat().st_size for name in files}
        packed_root = len(subprocess.run(["zstd", "-3", "-c", str(image.rootfs)], capture_output=True).stdout) \
            if image.rootfs else 0
        packed = len(subprocess.run(["zstd", "-3", "-c", str(image.kernel)], capture_output=True).stdout)
        packed_initrd = len(subprocess.run(["zstd", "-3", "-c", str(image.initrd)], capture_output=True).stdout)
        kernel_version = json.loads((image.folder / "manifest.json").read_text()).get("kernel_version", "?")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    median = statistics.median(times)
    qemu_version = subprocess.run([str(runtime.qemu), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    lines = [
        SECTION, "",
        f"- Command: `python bench/tpm_helper.py --runs {args.runs}{' --results ' + str(args.results) if args.results else ''}`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Machine: {platform.system()} {platform.machine()}, nproc {os.cpu_count()}, {qemu_version}, TCG "
        f"(tb-size={TCG_TB_MIB}), microvm, 1 vCPU",
        f"- Load average before: {' '.join(f'{v:.2f}' for v in load_before)}, after: "
        f"{' '.join(f'{v:.2f}' for v in load_after)} (other engineers' guests share the 2 cores)",
        f"- Image: {image.folder.name} — kernel {sizes[image.kernel.name] / 1e6:.1f} MB ({kernel_version}, LZ4 "
        f"bzImage; {packed / 1e6:.1f} MB with zstd -3), initramfs {sizes[image.initrd.name] / 1e6:.1f} MB "
        "(uncompressed), "
        f"read-only root disk {sizes.get('rootfs.img', 0) / 1e6:.1f} MB ({packed_root / 1e6:.1f} MB with zstd -3); "
        f"total {sum(sizes.values()) / 1e6:.1f} MB raw, {(packed + packed_root + packed_initrd) / 1e6:.1f} MB "
        "compressed",
        "",
        f"| launch → first TPM2 command answered ({args.runs} runs, existing state disk) | seconds |",
        "| --- | ---: |",
        f"| median | {median:.2f} |", f"| min | {min(times):.2f} |", f"| max | {max(times):.2f} |",
        f"| QEMU CPU seconds to that point (median; less load-dependent than wall time) | {statistics.median(cpus):.2f} |",
        f"| first boot of a VM (state disk formatted) | {first_boot:.2f} |",
        "",
        f"Goal ≤ 1.5 s: **{'met' if median <= 1.5 else 'not met'}** (median {median:.2f} s wall; "
        f"{statistics.median(cpus):.2f} s of QEMU CPU, which bounds it on an idle core).",
        "",
        "| guest RAM (-m) | boots and serves tpm2-tools | QEMU peak RSS (VmHWM) |",
        "| ---: | :---: | ---: |",
    ]
    for ram in RAM_STEPS:
        lines.append(f"| {ram} MiB | {'yes' if served.get(ram) else 'no'} | "
                     f"{f'{rss[ram]:.0f} MiB' if ram in rss else '—'} |")
    lines += [
        "",
        f"RAM floor: **{floor} MiB** of the steps tried (goal: the helper runs in 64: "
        f"{'met' if served.get(64) else 'not met'}). Thalunix gives it the manifest's {image.ram_mib} MiB. "
        f"Peak RSS at {image.ram_mib} MiB: **{default_rss:.0f} MiB** (goal ≤ 96: "
        f"{'met' if default_rss and default_rss <= 96 else 'not met'}).",
        "",
        "What got it there (each measured A/B while building it): a kernel of its own (helper-vm/kernel.config "
        "over tinyconfig, all built in, LZ4 bzImage) instead of Debian's cloud kernel (53 MB PVH vmlinux, "
        "~2 s of TCG to initialise, 72 MiB RAM floor, 205 MiB RSS); the kernel's RNG seeded from RDRAND "
        "(RANDOM_TRUST_CPU: without it swtpm and mke2fs blocked in getrandom(), 7 s for a first boot, 3.8 s "
        "of CPU); no legacy ptys (~50 ms); an uncompressed initramfs (~150 ms of zstd under TCG); a 16 MiB "
        "translation cache (32: +18 MiB RSS, no faster; 8: −10 MiB, +0.5 s); swtpm and its libraries on a "
        "read-only root disk, `-cpu qemu64,+rdrand`, the host's TSC rate on the command line, and a readiness "
        "probe that retries every 80 ms.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.results:
        old = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
        if SECTION in old:
            head, rest = old.split(SECTION, 1)
            tail = rest.split("\n## ", 1)
            old = head.rstrip("\n") + "\n\n" + (("## " + tail[1]) if len(tail) > 1 else "")
        args.results.write_text(old.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
