"""The engine: the few verbs every front (CLI, API, UI) uses to manage VMs.

:class:`Engine` is the interface; :class:`DirectEngine` implements it over the
portable data folder and QEMU run directly (the default; a libvirt engine can
implement the same verbs). Fronts never touch the store or the runner directly.

Example::

    engine = DirectEngine.open()                      # the data folder by the usual rules
    vm = engine.create(CreateOptions(name="debian", iso="~/debian.iso", disk="20G"))
    engine.start("debian")
    engine.status("debian")["state"]                  # "running"
    engine.stop("debian")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thalunix.errors import ConflictError, ValidationError
from thalunix.events import EventBus
from thalunix.model import (CDRom, Disk, HostLimits, Nic, PortForward, VMConfig, parse_ram_mib, parse_size,
                            validate)
from thalunix.qemu.img import QemuImg
from thalunix.qemu.runner import Supervisor
from thalunix.runtime import Runtime
from thalunix.store import DataFolder


@dataclass
class CreateOptions:
    """What ``vm create`` takes: human units, file paths as the user typed them."""

    name: str
    iso: str | None = None
    ram: str | int = "2G"
    cpus: int = 2
    #: a size (``20G``) makes a new disk in the VM folder; a path attaches an existing image
    disk: str | None = None
    disk_format: str = "qcow2"
    disk_bus: str = "virtio"
    firmware: str = "uefi"
    tpm: str = "auto"
    forwards: list[str] = field(default_factory=list)
    os: str = "linux"
    machine: str = "q35"
    accel: str = "auto"
    display: str = "vnc"
    boot: list[str] | None = None


class Engine:
    """The verbs of a VM manager. Implementations raise :class:`thalunix.errors.ThalunixError` subclasses."""

    def list(self) -> list[dict[str, Any]]: raise NotImplementedError
    def get(self, name: str) -> VMConfig: raise NotImplementedError
    def create(self, options: CreateOptions) -> VMConfig: raise NotImplementedError
    def edit(self, name: str, changes: dict[str, Any]) -> VMConfig: raise NotImplementedError
    def delete(self, name: str, keep_disks: bool = False) -> None: raise NotImplementedError
    def start(self, name: str) -> dict[str, Any]: raise NotImplementedError
    def stop(self, name: str, force: bool = False, timeout: float = 60) -> dict[str, Any]: raise NotImplementedError
    def pause(self, name: str) -> None: raise NotImplementedError
    def resume(self, name: str) -> None: raise NotImplementedError
    def reset(self, name: str) -> None: raise NotImplementedError
    def status(self, name: str) -> dict[str, Any]: raise NotImplementedError


class DirectEngine(Engine):
    """VMs in the portable data folder, run by QEMU directly."""

    def __init__(self, data: DataFolder, bus: EventBus | None = None, host: HostLimits | None = None) -> None:
        self.data = data
        self.bus = bus or EventBus()
        self.host = host or HostLimits.probe()
        self._runtime: Runtime | None = None
        self._runtime_lock = threading.Lock()
        self.supervisor = Supervisor(data, self.runtime, self.bus, self.host)

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> "DirectEngine":
        return cls(DataFolder.open(data_dir), **kwargs)

    def runtime(self) -> Runtime:
        """Found and probed on first use, so listing VMs never waits for QEMU."""
        with self._runtime_lock:
            if self._runtime is None:
                self._runtime = Runtime.discover(cache_dir=self.data.cache_dir)
            return self._runtime

    # -- definitions ------------------------------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        rows = []
        for entry in self.data.list_vms():
            if entry.config is None:
                rows.append({"id": entry.id, "name": None, "state": "broken", "error": entry.error})
                continue
            status = self.supervisor.status(entry.config)
            rows.append({"id": entry.id, "name": entry.config.name, "state": status["state"],
                         "os": entry.config.os, "cpus": entry.config.cpus, "ram_mib": entry.config.ram_mib,
                         "firmware": entry.config.firmware})
        return rows

    def get(self, name: str) -> VMConfig:
        return self.data.find_vm(name)

    def describe(self, name: str) -> dict[str, Any]:
        config = self.get(name)
        return {**config.to_dict(), "state": self.supervisor.status(config)["state"],
                "status": self.supervisor.status(config), "folder": str(self.data.vm_dir(config.id))}

    def create(self, options: CreateOptions) -> VMConfig:
        """Validate everything first; only then make the disk and register the VM."""
        config = VMConfig(name=options.name, os=options.os, cpus=options.cpus, ram_mib=parse_ram_mib(options.ram),
                          machine=options.machine, firmware=options.firmware, tpm=options.tpm,
                          accel=options.accel)
        config.display.kind = options.display
        if options.boot:
            config.boot_order = list(options.boot)
        if options.iso:
            iso = Path(options.iso).expanduser()
            if not iso.is_file():
                raise ValidationError(f"ISO {options.iso!r} does not exist; check the path", "iso")
            config.cdroms = [CDRom(path=self.data.to_stored_path(iso))]
        else:
            config.cdroms = [CDRom()]
        new_disk_size = 0
        if options.disk:
            candidate = Path(options.disk).expanduser()
            if candidate.is_file():
                config.disks = [Disk(path=self.data.to_stored_path(candidate), bus=options.disk_bus)]
            elif any(sep in options.disk for sep in "/\\") or options.disk.lower().endswith((".qcow2", ".img", ".raw")):
                raise ValidationError(f"disk image {options.disk!r} does not exist; give an existing image or a "
                                      "size such as 20G for a new disk", "disk")
            else:
                new_disk_size = parse_size(options.disk, field="disk", default_unit="G")
                suffix = "qcow2" if options.disk_format == "qcow2" else "img"
                config.disks = [Disk(path=f"vms/{{id}}/disks/disk0.{suffix}", format=options.disk_format,
                                     bus=options.disk_bus)]
        forwards = [PortForward.parse(spec) for spec in options.forwards]
        config.nics = [Nic(forwards=forwards)]
        config.set_defaults()
        for disk in config.disks:
            disk.path = disk.path.replace("{id}", config.id)
        validate(config, self.host, file_exists=lambda p: p.startswith(f"vms/{config.id}/") or self.data.exists(p))
        created = self.data.create_vm(config)
        if new_disk_size:
            try:
                QemuImg(self.runtime().require_qemu_img()).create(self.data.resolve(config.disks[0].path),
                                                                   new_disk_size, options.disk_format)
            except BaseException:
                self.data.delete_vm(created.id)   # no VM without its disk
                raise
        return created

    def edit(self, name: str, changes: dict[str, Any]) -> VMConfig:
        """Apply field changes (same keys as ``vm.json``); refused while the VM runs."""
        config = self.get(name)
        if self.supervisor.status(config)["state"] not in ("stopped", "crashed"):
            raise ConflictError(f"{config.label} is running; stop it before changing its settings")
        data = config.to_dict()
        for key in changes:
            if key in ("id", "created", "schema"):
                raise ValidationError(f"{key} cannot be changed", key)
        data.update(changes)
        updated = VMConfig.from_dict(data)
        updated.set_defaults()
        validate(updated, self.host, self.data.exists)
        self.data.save_vm(updated)
        return updated

    def delete(self, name: str, keep_disks: bool = False) -> None:
        config = self.get(name)
        if self.supervisor.status(config)["state"] not in ("stopped", "crashed"):
            raise ConflictError(f"{config.label} is running; stop it before deleting it")
        self.data.lock_vm(config)
        try:
            if keep_disks:
                keep = self.data.root / "disks-kept" / config.name
                keep.mkdir(parents=True, exist_ok=True)
                for disk in config.disks:
                    source = self.data.resolve(disk.path)
                    if source.is_file() and self.data.vm_dir(config.id) in source.parents:
                        shutil.move(str(source), keep / source.name)
        finally:
            self.data.unlock_vm(config)
        self.data.delete_vm(config.id)

    # -- running ----------------------------------------------------------------------------------------
    def start(self, name: str) -> dict[str, Any]:
        return self.supervisor.start(self.get(name))

    def stop(self, name: str, force: bool = False, timeout: float = 60) -> dict[str, Any]:
        return self.supervisor.stop(self.get(name), force=force, timeout=timeout)

    def pause(self, name: str) -> None:
        self.supervisor.pause(self.get(name))

    def resume(self, name: str) -> None:
        self.supervisor.resume(self.get(name))

    def reset(self, name: str) -> None:
        self.supervisor.reset(self.get(name))

    def status(self, name: str) -> dict[str, Any]:
        return self.supervisor.status(self.get(name))

    def attach_running(self) -> list[str]:
        return self.supervisor.attach_all([e.config for e in self.data.list_vms() if e.config])

    def close(self, stop_vms: bool = False) -> None:
        """Leave: stop the VMs, or let them run on (a later Thalunix re-attaches)."""
        with contextlib.suppress(Exception):
            if stop_vms:
                self.supervisor.stop_all()
        self.supervisor.detach_all()
