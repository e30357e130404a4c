"""``thalunix doctor``: everything worth knowing about this host and this Thalunix, in one report.

Each check reports what it found and, when something is off, what to do.

Example::

    report = diagnose(engine)
    report["qemu"]["version"]        # "7.2.22"
    report["accelerator"]["summary"] # "KVM: self-test failed (...) → TCG, expect slow guests"
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from thalunix import __version__
from thalunix.engine import DirectEngine
from thalunix.errors import ThalunixError
from thalunix.model import format_size
from thalunix.runtime import host_os


def diagnose(engine: DirectEngine) -> dict[str, Any]:
    report: dict[str, Any] = {"thalunix": __version__, "python": sys.version.split()[0], "host_os": host_os()}
    data = engine.data
    usage = shutil.disk_usage(data.root)
    report["data_folder"] = {"path": str(data.root), "free": usage.free, "free_human": format_size(usage.free),
                             "writable": os.access(data.root, os.W_OK), "vms": len(data.list_vms())}
    report["bundle"] = bundle_report()
    try:
        runtime = engine.runtime()
    except ThalunixError as error:
        report["qemu"] = {"found": False, "error": str(error)}
        return report
    report["qemu"] = {"found": True, "path": str(runtime.qemu), "source": runtime.source,
                      "version": runtime.caps.version, "qemu_img": str(runtime.qemu_img or ""),
                      "swtpm": str(runtime.swtpm or ""), "capabilities": runtime.caps.summary()}
    report["firmware"] = {key: str(value) if value else None for key, value in vars(runtime.firmware).items()}
    try:
        choice = runtime.accelerator("auto", data.cache_dir)
        report["accelerator"] = {"chosen": choice.chosen, "ladder": choice.ladder, "summary": choice.summary,
                                 "verdicts": [{"name": v.name, "usable": v.usable, "reason": v.reason}
                                              for v in choice.verdicts]}
    except ThalunixError as error:
        report["accelerator"] = {"chosen": None, "summary": str(error), "verdicts": []}
    report["tpm"] = tpm_report(engine, runtime)
    from thalunix.net import doctor_report
    report["network"] = doctor_report(runtime)
    return report


def bundle_report() -> dict[str, Any] | None:
    """The portable exe's unpacked runtime: where, what it was built from, where its licences are."""
    from thalunix.bundle import manifest, prepared_root
    root = prepared_root()
    info = manifest(root)
    if root is None or info is None:
        return None
    return {"path": str(root), "target": info.get("target"), "built_at": info.get("built_at"),
            "key": info.get("bundle_key"), "files": len(info.get("files", {})),
            "packages": {p["package"]: p["version"] for p in info.get("packages", [])},
            "wheels": {w["name"]: w["version"] for w in info.get("wheels", [])},
            "requires": info.get("requires", {}), "helper_vm": "skipped" not in (info.get("helper_vm") or {}),
            "licences": str(root / "licences"), "manifest": str(root / "manifest.json")}


def tpm_report(engine: DirectEngine, runtime: Any) -> dict[str, Any]:
    """What each TPM backend needs here, and what a VM with TPM 'auto' would get (and why)."""
    from thalunix.model import VMConfig
    from thalunix.tpm import TpmManager
    from thalunix.tpm.helper import HelperImage
    manager = TpmManager(engine.data, engine.bus)
    helper: dict[str, Any] = {"path": str(runtime.helper_vm or "")}
    try:
        image = HelperImage.load(runtime.helper_vm)
        helper.update(usable=True, kernel=str(image.kernel), ram_mib=image.ram_mib)
    except ThalunixError as error:
        helper.update(usable=False, reason=str(error))
    choice = manager.choose(VMConfig(name="doctor", tpm="auto"), runtime)
    return {"emulator": runtime.caps.has_tpm_emulator,
            "emulator_reason": "" if runtime.caps.has_tpm_emulator else runtime.caps.notes.get("tpm", ""),
            "swtpm": str(runtime.swtpm or ""), "native_problem": manager.native_problem(runtime),
            "helper_vm": helper, "auto": choice.backend or "off", "auto_reason": choice.reason}


def render(report: dict[str, Any]) -> str:
    """The human form of :func:`diagnose`."""
    lines = [f"Thalunix {report['thalunix']} (Python {report['python']}, {report['host_os']})"]
    folder = report["data_folder"]
    lines.append(f"Data folder: {folder['path']}  ({folder['free_human']} free, "
                 f"{'writable' if folder['writable'] else 'NOT WRITABLE'}, {folder['vms']} VMs)")
    bundle = report.get("bundle")
    if bundle:
        wheels = "".join(f", {name} {version}" for name, version in bundle["wheels"].items())
        lines.append(f"Bundled runtime: {bundle['path']} ({bundle['target']}, built {bundle['built_at']}, "
                     f"{bundle['files']} files from {len(bundle['packages'])} Debian packages{wheels})")
        lines.append(f"  manifest: {bundle['manifest']}   licences: {bundle['licences']} "
                     "(thalunix doctor --licences)")
    qemu = report["qemu"]
    if not qemu.get("found"):
        lines.append(f"QEMU: not found. {qemu['error']}")
        return "\n".join(lines)
    lines.append(f"QEMU: {qemu['version']} at {qemu['path']} ({qemu['source']})")
    lines.append(f"qemu-img: {qemu['qemu_img'] or 'not found'}   swtpm: {qemu['swtpm'] or 'not found'}")
    caps = qemu["capabilities"]
    lines.append(f"Machines: {', '.join(caps['machines'])}   accelerators listed: {', '.join(caps['accelerators'])}"
                 f"   TPM: {caps['tpm']}")
    firmware = report["firmware"]
    lines.append(f"UEFI firmware: {firmware.get('code') or 'not found'}"
                 f"{'  (+ Secure Boot)' if firmware.get('secure_code') else ''}")
    acc = report["accelerator"]
    lines.append(f"Accelerator: {acc.get('chosen') or 'none'} — {acc['summary']}")
    for verdict in acc.get("verdicts", []):
        lines.append(f"  {'ok ' if verdict['usable'] else 'no '} {verdict['name']}: {verdict['reason']}")
    tpm = report.get("tpm")
    if tpm:
        lines.append(f"TPM: VMs with TPM 'auto' get {tpm['auto']} — {tpm['auto_reason']}")
        if not tpm["emulator"]:
            lines.append(f"  no  QEMU TPM emulation: {tpm['emulator_reason']}")
        lines.append(f"  {'ok ' if not tpm['native_problem'] else 'no '} native swtpm: "
                     f"{tpm['swtpm'] if not tpm['native_problem'] else tpm['native_problem']}")
        helper = tpm["helper_vm"]
        lines.append(f"  {'ok ' if helper['usable'] else 'no '} helper VM: "
                     f"{helper['path'] if helper['usable'] else helper['reason']}")
    network = report.get("network")
    if network:
        private = (f"ok ({network['private_backend']} on 127.0.0.1, no admin rights)" if network["private_ok"]
                   else "unavailable (this QEMU has no dgram or socket backend)")
        lines.append(f"Networks: private networks {private}; {network['bridge_summary']}; "
                     f"USB devices on this host: {network.get('usb_devices')}")
    return "\n".join(lines)
