"""USB: the host's devices, and plugging them (or emulated ones) into a running VM over QMP.

Host devices are listed from sysfs on Linux (``/sys/bus/usb/devices/*/idVendor`` …) and from the
Plug-and-Play device list on Windows (``USB\\VID_xxxx&PID_yyyy\\…`` instance ids, read through
PowerShell; QEMU then opens the device with libusb, which needs the WinUSB driver bound to it,
e.g. with Zadig). Both parsers are pure functions with tests on fixtures.

A device is named by ``vendor:product`` (``0781:5567``); the emulated devices ``usb-kbd``,
``usb-mouse`` and ``usb-tablet`` can be plugged in the same way. Devices attached with
``remember=True`` are kept in the VM's ``usb_devices`` and plugged in again at the next start when
present.

Example::

    from thalunix import usb
    usb.list_host_devices()                    # [{"id": "0781:5567", "product": "Cruzer Blade", ...}]
    usb.attach(engine, "web", "0781:5567", remember=True)
    usb.detach(engine, "web", "0781:5567")
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from thalunix.errors import ConflictError, NotFoundError, ThalunixError, ValidationError
from thalunix.model import VMConfig

if TYPE_CHECKING:
    from thalunix.engine import DirectEngine

SYSFS_USB = Path("/sys/bus/usb/devices")
#: Emulated devices that can be plugged in like a host device.
EMULATED = ("usb-kbd", "usb-mouse", "usb-tablet")
_USB_ID = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})$")
_PNP_ID = re.compile(r"^USB\\VID_([0-9A-F]{4})&PID_([0-9A-F]{4})(?:\\(.*))?$", re.IGNORECASE)
_CLASSES = {"00": "per interface", "01": "audio", "02": "communications", "03": "HID", "07": "printer",
            "08": "mass storage", "09": "hub", "0a": "CDC data", "0e": "video", "e0": "wireless", "ef": "misc",
            "ff": "vendor specific"}


class UsbError(ThalunixError):
    code = "usb"
    http_status = 409


# -- listing ---------------------------------------------------------------------------------------------
def parse_sysfs(root: Path) -> list[dict[str, Any]]:
    """Devices under a sysfs ``bus/usb/devices`` folder (hubs left out), sorted by bus and address."""
    devices = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    for entry in entries:
        def read(name: str) -> str:
            try:
                return (entry / name).read_text(errors="replace").strip()
            except OSError:
                return ""
        vendor, product = read("idVendor").lower(), read("idProduct").lower()
        if not vendor or not product or ":" in entry.name:
            continue   # interfaces (1-1:1.0) have no ids of their own
        device_class = read("bDeviceClass").lower()
        if device_class == "09":
            continue   # hubs, root hubs included, are not passed through
        bus, address = read("busnum"), read("devnum")
        devices.append({
            "id": f"{vendor}:{product}", "vendor_id": vendor, "product_id": product,
            "manufacturer": read("manufacturer"), "product": read("product") or "USB device",
            "serial": read("serial"), "bus": int(bus) if bus.isdigit() else None,
            "address": int(address) if address.isdigit() else None, "port": entry.name,
            "speed": read("speed"), "class": _CLASSES.get(device_class, device_class or "?"),
            "node": f"/dev/bus/usb/{int(bus):03d}/{int(address):03d}" if bus.isdigit() and address.isdigit() else "",
        })
    devices.sort(key=lambda d: (d["bus"] or 0, d["address"] or 0))
    return devices


def parse_windows_pnp(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Devices from Win32_PnPEntity rows (``DeviceID``, ``Name``, ``Manufacturer``); composite parts left out."""
    devices: dict[str, dict[str, Any]] = {}
    for row in entries:
        match = _PNP_ID.match(str(row.get("DeviceID") or ""))
        if not match or "&MI_" in str(row["DeviceID"]).upper():
            continue
        vendor, product, instance = match.group(1).lower(), match.group(2).lower(), match.group(3) or ""
        name = str(row.get("Name") or "USB device")
        if "hub" in name.lower():
            continue
        key = f"{vendor}:{product}:{instance}"
        devices[key] = {"id": f"{vendor}:{product}", "vendor_id": vendor, "product_id": product,
                        "manufacturer": str(row.get("Manufacturer") or ""), "product": name,
                        "serial": instance if "&" not in instance else "", "bus": None, "address": None,
                        "port": instance, "speed": "", "class": "?", "node": ""}
    return sorted(devices.values(), key=lambda d: (d["id"], d["port"]))


_POWERSHELL = ("Get-CimInstance Win32_PnPEntity | Where-Object { $_.DeviceID -like 'USB\\VID_*' -and "
               "$_.Present } | Select-Object DeviceID,Name,Manufacturer | ConvertTo-Json -Compress")


def list_host_devices(sysfs: Path | None = None) -> list[dict[str, Any]]:
    """The USB devices plugged into this host (empty when the host exposes none)."""
    if os.name != "nt":
        return parse_sysfs(sysfs or SYSFS_USB)
    try:
        out = subprocess.run(["powershell", "-NoProfile", "-Command", _POWERSHELL], capture_output=True,
                             text=True, timeout=30, creationflags=0x08000000).stdout   # CREATE_NO_WINDOW
        rows = json.loads(out) if out.strip() else []
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        raise UsbError(f"cannot list the host's USB devices through PowerShell: {error}") from None
    return parse_windows_pnp(rows if isinstance(rows, list) else [rows])


# -- plugging ---------------------------------------------------------------------------------------------
def device_id(usb: str) -> str:
    """The QMP id of a plugged device: ``usb-0781-5567`` or the emulated kind (``usb-kbd``)."""
    return usb if usb in EMULATED else "usb-" + usb.lower().replace(":", "-")


def _check_id(config: VMConfig, usb: str) -> str:
    if usb in EMULATED:
        return usb
    if not isinstance(usb, str) or not _USB_ID.match(usb.strip()):
        raise ValidationError(f"{config.label}: {usb!r} is not a USB device: give vendor:product as "
                              f"`thalunix usb list` shows it (e.g. 0781:5567), or one of {', '.join(EMULATED)}",
                              "device")
    return usb.strip().lower()


def present_at_start(config: VMConfig, devices: list[dict[str, Any]] | None = None) -> tuple[tuple[str, str], ...]:
    """The remembered devices present now, as (device id, vendor:product) for the launch plan."""
    if devices is None:
        try:
            devices = list_host_devices()
        except UsbError:
            devices = []
    present = {d["id"] for d in devices}
    return tuple((device_id(usb), usb.lower()) for usb in config.usb_devices if usb.lower() in present)


def _check_access(config: VMConfig, usb: str, devices: list[dict[str, Any]]) -> None:
    found = [d for d in devices if d["id"] == usb]
    if not found:
        raise NotFoundError(f"{config.label}: no USB device {usb} is plugged into this host; plug it in, or pick "
                            "one that `thalunix usb list` shows")
    node = found[0].get("node")
    if node and os.path.exists(node) and not os.access(node, os.R_OK | os.W_OK):
        raise UsbError(f"{config.label}: no permission to open {node} ({found[0]['product']}); give your user "
                       "read/write access to it (a udev rule with MODE=\"0666\" or your user's group)")


def attached(engine: "DirectEngine", name: str) -> list[dict[str, Any]]:
    """The USB devices of a running VM as QEMU lists them (HMP ``info usb``), plus the remembered ones."""
    config = engine.get(name)
    rows: list[dict[str, Any]] = []
    try:
        text = engine.supervisor.qmp(config, "human-monitor-command", {"command-line": "info usb"})
        for line in str(text).splitlines():
            match = re.search(r"Device (\S+), Port (\S+), Speed (.*?), Product (.*?)(?:, ID: (\S+))?$", line.strip())
            if match:
                rows.append({"device": match.group(1), "port": match.group(2), "speed": match.group(3),
                             "product": match.group(4), "qemu_id": match.group(5) or ""})
    except ConflictError:
        pass   # not running: only the remembered list
    return [*rows, *({"remembered": usb} for usb in config.usb_devices)]


def attach(engine: "DirectEngine", name: str, usb: str, remember: bool = False,
           devices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Plug host device ``vendor:product`` (or an emulated one) into running VM ``name``."""
    config = engine.get(name)
    usb = _check_id(config, usb)
    if not config.usb_tablet and not config.usb_devices:
        raise UsbError(f"{config.label} has no USB controller (its USB tablet is off and it has no USB devices); "
                       "stop it, turn the USB tablet on, and start it again")
    session = engine.supervisor.require_session(config)
    if usb in EMULATED:
        arguments = {"driver": usb, "id": device_id(usb), "bus": "xhci.0"}
    else:
        _check_access(config, usb, list_host_devices() if devices is None else devices)
        vendor, product = usb.split(":")
        arguments = {"driver": "usb-host", "id": device_id(usb), "bus": "xhci.0",
                     "vendorid": int(vendor, 16), "productid": int(product, 16)}
    try:
        engine.supervisor.qmp(config, "device_add", arguments)
    except ConflictError:
        raise
    except ThalunixError as error:
        if "Duplicate" in str(error) or "already" in str(error):
            raise ConflictError(f"{config.label}: USB device {usb} is already plugged in") from None
        raise UsbError(f"{config.label}: QEMU could not plug in USB device {usb}: {error}") from None
    session.log(f"USB device {usb} plugged in")
    if remember and usb not in EMULATED and usb not in config.usb_devices:
        _save_list(engine, config, [*config.usb_devices, usb])
    return {"vm": config.name, "device": usb, "id": device_id(usb), "remembered": usb in engine.get(name).usb_devices}


def detach(engine: "DirectEngine", name: str, usb: str, forget: bool = True, timeout: float = 10.0) -> dict[str, Any]:
    """Unplug ``usb`` from running VM ``name`` (waiting for QEMU's DEVICE_DELETED); forget it unless asked not to."""
    config = engine.get(name)
    usb = _check_id(config, usb)
    running = engine.supervisor.status(config)["state"] in ("running", "paused")
    if running:
        qid = device_id(usb)
        with engine.bus.subscribe(accept=lambda e: e.get("vm") == config.id and e["type"] == "vm.qmp"
                                  and e.get("event") == "DEVICE_DELETED") as events:
            try:
                engine.supervisor.qmp(config, "device_del", {"id": qid})
            except ThalunixError as error:
                if usb not in config.usb_devices:
                    raise NotFoundError(f"{config.label}: USB device {usb} is not plugged in ({error})") from None
            else:
                import time
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    event = events.get(timeout=max(0.0, deadline - time.monotonic()))
                    if event and (event.get("data") or {}).get("device") == qid:
                        break
    elif usb not in config.usb_devices:
        raise NotFoundError(f"{config.label}: USB device {usb} is neither plugged in nor remembered")
    if forget and usb in config.usb_devices:
        _save_list(engine, config, [u for u in config.usb_devices if u != usb])
    return {"vm": config.name, "device": usb, "unplugged": running}


def _save_list(engine: "DirectEngine", config: VMConfig, devices: list[str]) -> None:
    # Saved while the VM runs: this list is read only at the next start.
    config.usb_devices = devices
    engine.data.save_vm(config)
    engine.bus.publish("vm.config", vm=config.id, name=config.name, change="edited")
