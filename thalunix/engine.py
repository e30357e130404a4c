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
import dataclasses
import os
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thalunix import win11
from thalunix.errors import ConflictError, ThalunixError, ValidationError
from thalunix.events import EventBus
from thalunix.jobs import JobManager
from thalunix.model import (DISK_BUSES, DISK_FORMATS, CDRom, Disk, HostLimits, Nic, PortForward, VMConfig,
                            parse_ram_mib, parse_size, validate)
from thalunix.model.base import choice
from thalunix.qemu.img import QemuImg
from thalunix.qemu.runner import Supervisor
from thalunix.runtime import Runtime
from thalunix.store import DataFolder, VMEntry

#: What ``read_log`` serves: the VM's own logs, by kind.
LOG_KINDS = {"events": "events.log", "qemu": "qemu.log", "serial": "serial.log"}
#: Files offered as installation media.
ISO_SUFFIXES = (".iso", ".img")
#: What ``vm create`` uses for a setting neither the user nor the ISO's catalog entry gives (no disk by default).
CREATE_DEFAULTS: dict[str, str] = {"ram": "2G", "firmware": "uefi", "tpm": "auto", "os": "linux"}


@dataclass
class CreateOptions:
    """What ``vm create`` takes: human units, file paths as the user typed them.

    ``None`` in ``ram``, ``disk``, ``firmware``, ``tpm`` and ``os`` means "not given": a VM made from an
    ISO downloaded from the catalog (or added as one of its entries) gets that entry's defaults there,
    any other VM :data:`CREATE_DEFAULTS`. A value the user gave always wins.
    """

    name: str
    iso: str | None = None
    ram: str | int | None = None
    cpus: int = 2
    #: a size (``20G``) makes a new disk in the VM folder; a path attaches an existing image; "" or "none": no disk
    disk: str | None = None
    disk_format: str = "qcow2"
    #: empty: virtio, or SATA for Windows guests (whose installer has no virtio driver)
    disk_bus: str = ""
    firmware: str | None = None
    tpm: str | None = None
    forwards: list[str] = field(default_factory=list)
    os: str | None = None
    machine: str = "q35"
    accel: str = "auto"
    display: str = "vnc"
    boot: list[str] | None = None
    #: Attach the "Windows 11 setup" answer-file drive (thalunix.win11); None: on for a Windows 11 VM that
    #: will get no TPM (the host has no TPM emulation, or tpm is off).
    win11_setup: bool | None = None


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
    def screenshot(self, name: str) -> bytes: raise NotImplementedError
    def vnc_info(self, name: str) -> dict[str, Any]: raise NotImplementedError
    def send_serial(self, name: str, data: bytes) -> None: raise NotImplementedError
    def serial_output(self, name: str) -> bytes: raise NotImplementedError
    def read_log(self, name: str, kind: str = "events", tail: int = 1 << 20) -> str: raise NotImplementedError
    # Also offered by the libvirt engine (thalunix.libvirt.engine.LibvirtEngine):
    def describe(self, name: str) -> dict[str, Any]: raise NotImplementedError
    def snapshots(self, name: str) -> dict[str, Any]: raise NotImplementedError
    def snapshot_create(self, name: str, snapshot: str, description: str = "",
                        live: bool | None = None) -> dict[str, Any]: raise NotImplementedError
    def snapshot_revert(self, name: str, snapshot: str) -> dict[str, Any]: raise NotImplementedError
    def snapshot_delete(self, name: str, snapshot: str) -> dict[str, Any]: raise NotImplementedError
    def clone(self, name: str, new_name: str, linked: bool = False, tpm: str = "fresh",
              wait: bool = False) -> dict[str, Any]: raise NotImplementedError
    def isos(self) -> list[dict[str, Any]]: raise NotImplementedError
    def catalog(self) -> list[dict[str, Any]]: raise NotImplementedError
    def list_isos(self) -> list[dict[str, Any]]: raise NotImplementedError
    def add_iso(self, path: str, sha256: str | None = None, copy: bool = False,
                catalog_id: str | None = None) -> dict[str, Any]: raise NotImplementedError
    def list_downloads(self) -> list[dict[str, Any]]: raise NotImplementedError
    def remove_quarantined(self, job_id: str) -> dict[str, Any]: raise NotImplementedError
    def download_iso(self, source: str, sha256: str | None = None) -> str: raise NotImplementedError
    def download(self, job_id: str) -> dict[str, Any]: raise NotImplementedError
    def pause_download(self, job_id: str) -> dict[str, Any]: raise NotImplementedError
    def resume_download(self, job_id: str) -> dict[str, Any]: raise NotImplementedError
    def cancel_download(self, job_id: str) -> dict[str, Any]: raise NotImplementedError


class DirectEngine(Engine):
    """VMs in the portable data folder, run by QEMU directly."""

    def __init__(self, data: DataFolder, bus: EventBus | None = None, host: HostLimits | None = None) -> None:
        self.data = data
        self.bus = bus or EventBus()
        self.host = host or HostLimits.probe()
        self._runtime: Runtime | None = None
        self._runtime_lock = threading.Lock()
        self.supervisor = Supervisor(data, self.runtime, self.bus, self.host)
        # Long operations; opening sweeps work folders a killed Thalunix left in tmp/.
        self.jobs = JobManager(self.bus, data)
        self._downloads: Any = None   # DownloadManager, made on first use (loads the catalog and keys)
        # vm id → (config stamp, entry) and (last-exit stamp, state): an unchanged VM is not parsed again.
        self._entries: dict[str, tuple[tuple[int, int, int] | None, VMEntry]] = {}
        self._exits: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._list_lock = threading.Lock()

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
        """Every VM with its state, sorted by name; unreadable ones as ``broken`` with the reason.

        Called on every refresh of every front, so it is cheap: a config is parsed again only when
        its file changed, and a stopped VM costs three ``stat`` calls (no QEMU, no socket, no lock).
        """
        stamps = self.data.vm_file_stamps("run/state.json", "run/last-exit.json")
        rows = []
        with self._list_lock:
            for gone in set(self._entries) - set(stamps):
                del self._entries[gone]
            for vm_id, (stamp, run_state, last_exit) in stamps.items():
                cached = self._entries.get(vm_id)
                if cached is None or stamp is None or cached[0] != stamp:
                    cached = (stamp, self.data.read_vm(vm_id))
                    self._entries[vm_id] = cached
                entry = cached[1]
                if entry.config is None:
                    rows.append({"id": entry.id, "name": None, "state": "broken", "error": entry.error})
                    continue
                config = entry.config
                rows.append({"id": entry.id, "name": config.name,
                             "state": self._list_state(config, run_state, last_exit),
                             "os": config.os, "cpus": config.cpus, "ram_mib": config.ram_mib,
                             "firmware": config.firmware})
        rows.sort(key=lambda row: row["name"].lower() if row["name"] else "~" + row["id"])
        return rows

    def _list_state(self, config: VMConfig, run_state: tuple[int, int, int] | None,
                    last_exit: tuple[int, int, int] | None) -> str:
        session = self.supervisor.sessions.get(config.id)
        if session is not None and not session.exited.is_set():
            return session.state
        if run_state is not None:
            # Running, or left behind by a Thalunix that died: the supervisor checks the pid.
            return str(self.supervisor.status(config)["state"])
        if last_exit is None:
            return "stopped"
        cached = self._exits.get(config.id)
        if cached is None or cached[0] != last_exit:
            cached = (last_exit, str(self.supervisor.status(config)["state"]))
            self._exits[config.id] = cached
        return cached[1]

    def get(self, name: str) -> VMConfig:
        return self.data.find_vm(name)

    def describe(self, name: str) -> dict[str, Any]:
        config = self.get(name)
        return {**config.to_dict(), "state": self.supervisor.status(config)["state"],
                "status": self.supervisor.status(config), "folder": str(self.data.vm_dir(config.id))}

    def create(self, options: CreateOptions) -> VMConfig:
        """Validate everything first; only then make the disk and register the VM."""
        options = self._with_iso_defaults(options)
        # Checked even when no disk is made: a wrong choice is an error, not something silently dropped.
        choice(options.disk_format, DISK_FORMATS, "disk_format", "disk format")
        if options.disk_bus:
            choice(options.disk_bus, DISK_BUSES, "disk_bus", "disk bus")
        config = VMConfig(name=options.name, os=options.os, cpus=options.cpus, ram_mib=parse_ram_mib(options.ram),
                          machine=options.machine, firmware=options.firmware, tpm=options.tpm,
                          accel=options.accel)
        config.display.kind = options.display
        if options.boot:
            config.boot_order = list(options.boot)
        if options.iso:
            iso = Path(options.iso).expanduser()
            if not iso.is_file():
                iso = self._ready_iso(options.iso)   # a ready ISO by name or catalog id
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
        from thalunix import net
        net.ensure_unique_macs(self.data, config, generated=range(len(config.nics)))
        for disk in config.disks:
            disk.path = disk.path.replace("{id}", config.id)
        answer_drive = self._wants_win11_setup(options, config)
        if answer_drive:
            config.cdroms.append(win11.answer_cdrom(config, self.data))
            config.set_defaults()
        validate(config, self.host, file_exists=lambda p: p.startswith(f"vms/{config.id}/") or self.data.exists(p))
        created = self.data.create_vm(config)
        if new_disk_size or answer_drive:
            try:
                if new_disk_size:
                    QemuImg(self.runtime().require_qemu_img()).create(self.data.resolve(config.disks[0].path),
                                                                       new_disk_size, options.disk_format)
                if answer_drive:
                    win11.write_answer_image(self.data.vm_path(created.id, win11.IMAGE_NAME))
            except BaseException:
                self.data.delete_vm(created.id)   # no VM without its disk
                raise
        self.bus.publish("vm.config", vm=created.id, name=created.name, change="created")
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
        fresh_macs = [index for index, nic in enumerate(updated.nics) if not nic.mac]
        updated.set_defaults()
        validate(updated, self.host, self.data.exists)
        from thalunix import net
        net.ensure_unique_macs(self.data, updated, generated=fresh_macs)
        # Only networks this edit brings in: a card on a network deleted since stays editable (start names it).
        known = {nic.network for nic in config.nics if nic.mode == "private"} | set(self.data.network_names())
        for index, nic in enumerate(updated.nics):
            if nic.mode == "private" and nic.network not in known:
                raise ValidationError(f"{updated.label}: card {index + 1} is on network {nic.network!r}, which does "
                                      f"not exist (known: {', '.join(self.data.network_names()) or 'none yet'}); "
                                      f"create it first (`thalunix net create {nic.network}`)",
                                      f"nics[{index}].network")
        self.data.save_vm(updated)
        self.bus.publish("vm.config", vm=updated.id, name=updated.name, change="edited")
        return updated

    def delete(self, name: str, keep_disks: bool = False) -> None:
        config = self.get(name)
        if self.supervisor.status(config)["state"] not in ("stopped", "crashed"):
            raise ConflictError(f"{config.label} is running; stop it before deleting it")
        from thalunix.disks import refuse_if_linked
        refuse_if_linked(self, config, "be deleted")
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
        # Every front's list learns of new, changed and deleted VMs from the bus, as it does of states.
        self.bus.publish("vm.config", vm=config.id, name=config.name, change="deleted")

    # -- running ----------------------------------------------------------------------------------------
    def start(self, name: str) -> dict[str, Any]:
        config = self.get(name)
        busy = self.jobs.busy(config)
        if busy:   # the VM's lock is ours already (re-entrant): only this says its images are being rewritten
            raise ConflictError(f"{config.label} is busy with {busy.title} (job {busy.id}); wait for it to finish")
        if win11.has_answer_image(config):
            config, moved = win11.ensure_answer_image(config, self.data)   # written again if missing
            if moved:
                self.data.save_vm(config)
        return self.supervisor.start(config)

    def stop(self, name: str, force: bool = False, timeout: float = 60) -> dict[str, Any]:
        return self.supervisor.stop(self.get(name), force=force, timeout=timeout)

    def pause(self, name: str) -> None:
        self.supervisor.pause(self.get(name))

    def resume(self, name: str) -> None:
        config = self.get(name)
        self.supervisor.resume(config)
        from thalunix import agent
        agent.sync_time_later(self.supervisor, config)   # the guest clock stood still while paused

    def reset(self, name: str) -> None:
        self.supervisor.reset(self.get(name))

    def status(self, name: str) -> dict[str, Any]:
        return self.supervisor.status(self.get(name))

    # -- console, screen, logs -------------------------------------------------------------------------
    def screenshot(self, name: str) -> bytes:
        """The VM's screen as PNG bytes (QMP ``screendump``; the file passes through the VM's run/ folder)."""
        config = self.get(name)
        if config.display.kind == "none":
            raise ConflictError(f"{config.label} has no display (display: none); set the display to vnc to see "
                                "its screen")
        target = self.data.vm_path(config.id, "run", f"screen-{secrets.token_hex(4)}.png")
        try:
            self.supervisor.qmp(config, "screendump", {"filename": str(target), "format": "png"}, timeout=30)
            return target.read_bytes()
        except OSError as error:
            raise ThalunixError(f"{config.label}: QEMU wrote no screenshot ({error}); see its log") from None
        finally:
            target.unlink(missing_ok=True)

    def vnc_info(self, name: str) -> dict[str, Any]:
        """Where the VM's screen is served (QEMU's websocket VNC on 127.0.0.1) and this start's password."""
        config = self.get(name)
        if config.display.kind != "vnc":
            raise ConflictError(f"{config.label} has no VNC display (display: {config.display.kind}); "
                                "set the display to vnc and restart it")
        record = self.supervisor.require_session(config).record
        if not record.websocket_port:
            raise ConflictError(f"{config.label} was started without a VNC websocket; restart it")
        return {"websocket_port": record.websocket_port, "password": record.vnc_password, "host": "127.0.0.1"}

    def send_serial(self, name: str, data: bytes) -> None:
        """Type ``data`` into the VM's serial line."""
        self.supervisor.send_serial(self.get(name), data)

    def serial_output(self, name: str) -> bytes:
        """Recent serial output: the live buffer while running, else the end of serial.log."""
        return self.supervisor.serial_output(self.get(name))

    def read_log(self, name: str, kind: str = "events", tail: int = 1 << 20) -> str:
        """The end (``tail`` bytes) of one of the VM's logs: ``events``, ``qemu`` or ``serial``."""
        if kind not in LOG_KINDS:
            raise ValidationError(f"log kind {kind!r} is unknown; choose one of {', '.join(LOG_KINDS)}", "kind")
        config = self.get(name)
        path = self.data.vm_path(config.id, "logs", LOG_KINDS[kind])
        try:
            with open(path, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - max(0, tail)))
                return handle.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        except OSError as error:
            raise ThalunixError(f"{config.label}: cannot read {path}: {error}") from None

    def isos(self) -> list[dict[str, Any]]:
        """Every ISO a front offers: the download library's listing with statuses (ready, missing, downloading,
        verifying, quarantined) plus the ISOs VMs use from elsewhere, each with the VMs using it.

        ``exists`` is true only for a usable file (status ``ready``); ``path`` is the stored path of a
        file (``None`` for a download in progress or in quarantine); ``defaults`` are the settings of the
        catalog entry the ISO came from, for a new VM.
        """
        catalog = self.downloads.catalog
        found: dict[str, dict[str, Any]] = {}
        others: list[dict[str, Any]] = []
        for row in self.list_isos():
            usable = row["status"] in ("ready", "missing")
            item = {**row, "path": row.get("file") if usable else None, "exists": row["status"] == "ready",
                    "used_by": []}
            entry = catalog.entries.get(str(row.get("catalog_id") or ""))
            if entry is not None:
                item["defaults"] = dict(entry.defaults)
                item["catalog_name"] = entry.name
            if usable and row.get("full_path"):
                found[os.path.realpath(row["full_path"])] = item
            else:
                others.append(item)

        def add(stored: str) -> dict[str, Any]:
            path = self.data.resolve(stored)
            key = os.path.realpath(path)
            if key not in found:
                try:
                    size: int | None = path.stat().st_size
                except OSError:
                    size = None
                found[key] = {"path": stored, "name": path.name, "full_path": str(path), "size": size,
                              "exists": size is not None, "status": "ready" if size is not None else "missing",
                              "trust": None, "used_by": []}
            return found[key]

        for entry in self.data.list_vms():
            for cdrom in entry.config.cdroms if entry.config else []:
                if cdrom.path:
                    users = add(cdrom.path)["used_by"]
                    if entry.config.name not in users:
                        users.append(entry.config.name)
        return sorted([*found.values(), *others], key=lambda iso: str(iso["name"]).lower())

    # -- the download center (the work is in thalunix/downloads) -----------------------------------------
    # Each verb maps to one REST route; jobs report as job.progress events (kind "download") on self.bus.
    @property
    def downloads(self) -> Any:
        if self._downloads is None:
            from thalunix.downloads import DownloadManager
            self._downloads = DownloadManager(self.data, self.bus)
        return self._downloads

    def catalog(self) -> list[dict[str, Any]]:
        """The downloadable OSes: id, name, trust (signed / checksum only / manual), defaults for a new VM."""
        keyring = self.downloads.keyring
        return [{**entry.summary(), "keys_present": any(f in keyring for f in entry.fingerprints)}
                for entry in self.downloads.catalog.list()]

    def refresh_catalog(self, url: str | None = None) -> dict[str, Any]:
        """Fetch a newer signed catalog (refused unless signed by a catalog key this build lists)."""
        import requests

        from thalunix.downloads.catalog import refresh_catalog
        with requests.Session() as session:
            catalog = refresh_catalog(session, self.data.catalog_file, self.downloads.keyring, url)
        self.downloads.catalog = catalog
        return {"entries": len(catalog.entries), "updated": catalog.meta.get("updated")}

    def refresh_keys(self) -> dict[str, str]:
        """Fetch missing publisher keys named by the catalog, keeping only those with the listed fingerprint."""
        import requests

        from thalunix.downloads.catalog import refresh_keys
        with requests.Session() as session:
            return refresh_keys(session, self.downloads.catalog, self.data.keys_dir, self.downloads.keyring)

    def list_isos(self) -> list[dict[str, Any]]:
        """Every ISO with a status: ready, downloading, verifying or quarantined (with the reason)."""
        from thalunix.downloads import IsoLibrary
        return IsoLibrary(self.data).list(self.downloads)

    def add_iso(self, path: str, sha256: str | None = None, copy: bool = False,
                catalog_id: str | None = None) -> dict[str, Any]:
        """Register a local ISO (hashed; refused if ``sha256`` is given and differs), optionally as a catalog entry."""
        from thalunix.downloads import IsoLibrary
        if catalog_id is not None:
            entry = self.downloads.catalog.entries.get(catalog_id.strip().lower())
            if entry is None:
                raise ValidationError(f"there is no catalog entry {catalog_id!r}; leave it out or pick one the catalog "
                                      "lists", "catalog_id")
            catalog_id = entry.id
        return IsoLibrary(self.data).add(path, sha256=sha256, copy=copy, catalog_id=catalog_id)

    def list_downloads(self) -> list[dict[str, Any]]:
        """The downloads this process knows (running, paused, finished), oldest first."""
        return list(self.downloads.list())

    def remove_quarantined(self, job_id: str) -> dict[str, Any]:
        """Delete a quarantined download: its file, the evidence and the reason (it is never offered for use)."""
        from thalunix.downloads import IsoLibrary
        from thalunix.errors import NotFoundError
        if not job_id or Path(job_id).name != job_id or job_id in (".", ".."):
            raise NotFoundError(f"no quarantined download {job_id!r}; the ISO list shows them")
        IsoLibrary(self.data).remove_quarantined(job_id)
        return {"removed": job_id}

    def download_iso(self, source: str, sha256: str | None = None) -> str:
        """Queue a download of a catalog id or URL; the job id. The same source resumes its partial file."""
        return str(self.downloads.submit(source, sha256=sha256).id)

    def download(self, job_id: str) -> dict[str, Any]:
        return dict(self.downloads.get(job_id).to_dict())

    def pause_download(self, job_id: str) -> dict[str, Any]:
        return dict(self.downloads.pause(job_id).to_dict())

    def resume_download(self, job_id: str) -> dict[str, Any]:
        return dict(self.downloads.resume(job_id).to_dict())

    def cancel_download(self, job_id: str) -> dict[str, Any]:
        return dict(self.downloads.cancel(job_id).to_dict())

    # -- firmware and the Windows 11 setup drive (the work is in thalunix/firmware.py and thalunix/win11.py) -----
    def firmware(self, name: str) -> dict[str, Any]:
        """The VM's firmware kind and its UEFI variable store (path, size, when last written)."""
        from thalunix import firmware
        return firmware.firmware_info(self.get(name), self.data)

    def firmware_reset(self, name: str) -> dict[str, Any]:
        """Forget the VM's UEFI settings (boot entries, enrolled keys); refused while it runs."""
        from thalunix import disks, firmware
        config = self.get(name)
        if disks.is_running(self, config):
            raise ConflictError(f"{config.label} is running; shut it down before resetting its firmware settings")
        with disks.exclusive(self, config):   # no other Thalunix starts it meanwhile
            result = firmware.reset_firmware(config, self.data)
        self.supervisor.vm_log(config, f"firmware settings reset ({result['note']})")
        self.bus.publish("vm.config", vm=config.id, name=config.name, change="firmware-reset")
        return result

    def win11_setup_info(self) -> dict[str, Any]:
        """What the create form says about the Windows 11 setup option on this host, and its default."""
        try:
            caps = self.runtime().caps
            emulation, reason = caps.has_tpm_emulator, ("" if caps.has_tpm_emulator else
                                                        caps.notes.get("tpm", "this QEMU has no TPM emulation"))
        except ThalunixError as error:
            emulation, reason = False, str(error)
        return {"tpm_emulation": emulation, "reason": reason, "default": not emulation, "about": win11.ABOUT,
                "keys": list(win11.LABCONFIG_KEYS)}

    def _wants_win11_setup(self, options: CreateOptions, config: VMConfig) -> bool:
        if options.win11_setup is not None:
            return bool(options.win11_setup)
        if config.os != "windows11":
            return False
        return win11.default_for(config.os, config.tpm, bool(self.win11_setup_info()["tpm_emulation"]))

    def _with_iso_defaults(self, options: CreateOptions) -> CreateOptions:
        """``options`` with what the user left out filled from the ISO's catalog entry, else CREATE_DEFAULTS."""
        filled = dataclasses.replace(options)
        defaults = self._iso_defaults(options.iso) if options.iso else {}
        for key, fallback in CREATE_DEFAULTS.items():
            if getattr(filled, key) is None:
                setattr(filled, key, defaults.get(key, fallback))
        if filled.disk is None and defaults.get("disk"):
            filled.disk = str(defaults["disk"])
        if filled.disk is not None and filled.disk.strip().lower() in ("", "none"):
            filled.disk = None
        return filled

    def _iso_defaults(self, iso: str) -> dict[str, Any]:
        """The new-VM defaults of the catalog entry an ISO came from (by its sidecar); {} for any other file."""
        from thalunix.downloads import IsoLibrary
        path = Path(iso).expanduser()
        if not path.is_file():
            try:
                path = IsoLibrary(self.data).find_ready(iso)
            except ThalunixError:
                return {}   # create() reports the missing ISO with its field
        wanted = os.path.realpath(path)
        for row in IsoLibrary(self.data).ready():
            if os.path.realpath(row["full_path"]) != wanted:
                continue
            catalog_id = row.get("catalog_id")
            entry = self.downloads.catalog.entries.get(str(catalog_id)) if catalog_id else None
            # The catalog in use now (it may have been refreshed), else what the entry said at download time.
            defaults = entry.defaults if entry is not None else row.get("defaults")
            return dict(defaults) if isinstance(defaults, dict) else {}
        return {}

    def _ready_iso(self, name: str) -> Path:
        from thalunix.downloads import IsoLibrary
        from thalunix.errors import NotFoundError
        try:
            return IsoLibrary(self.data).find_ready(name)
        except NotFoundError:
            raise ValidationError(f"ISO {name!r} does not exist; check the path, or give the name of a ready "
                                  "ISO (`thalunix iso list`)", "iso") from None

    # -- disks, snapshots, clones, export/import (thin: the work is in disks/snapshots/clone/archive) ---------
    # Long operations return a job dict at once ({"id": ..., "state": "running"}; progress as job.progress
    # events), or the finished job with wait=True. Each verb maps to one REST route.
    def _job(self, kind: str, config: VMConfig | None, title: str, work: Any, wait: bool,
             lock: bool = True) -> dict[str, Any]:
        from thalunix import disks
        if config is not None:
            busy = self.jobs.busy(config)
            if busy:
                raise ConflictError(f"{config.label} is busy with {busy.title} (job {busy.id}); wait for it or "
                                    "cancel it")

        def run(job: Any) -> Any:
            if config is None or not lock:
                return work(job)
            with disks.exclusive(self, config, job):
                return work(job)
        job = self.jobs.start(kind, run, vm=config, title=title, wait=wait)
        return job.to_dict()

    def disks(self, name: str) -> list[dict[str, Any]]:
        from thalunix import disks
        return disks.list_disks(self, self.get(name))

    def disk_add(self, name: str, size: str | int | None = None, path: str | None = None, format: str = "qcow2",
                 bus: str = "virtio", readonly: bool = False) -> dict[str, Any]:
        from thalunix import disks
        return disks.add_disk(self, self.get(name), size=size, path=path, fmt=format, bus=bus, readonly=readonly)

    def disk_remove(self, name: str, disk: str, delete_file: bool = False) -> dict[str, Any]:
        from thalunix import disks
        return disks.remove_disk(self, self.get(name), disk, delete_file=delete_file)

    def disk_resize(self, name: str, disk: str, size: str | int, force_shrink: bool = False) -> dict[str, Any]:
        from thalunix import disks
        return disks.resize_disk(self, self.get(name), disk, size, force_shrink=force_shrink)

    def disk_convert(self, name: str, disk: str, format: str, wait: bool = False) -> dict[str, Any]:
        from thalunix import disks
        config = self.get(name)
        disks.convert_precheck(self, config, disk, format)
        return self._job("disk.convert", config, f"converting {config.name}/{disk} to {format}",
                         lambda job: disks.convert_disk(self, config, disk, format, job), wait)

    def disk_check(self, name: str, disk: str, repair: str | None = None) -> dict[str, Any]:
        from thalunix import disks
        return disks.check_disk(self, self.get(name), disk, repair=repair)

    def snapshots(self, name: str) -> dict[str, Any]:
        from thalunix import snapshots
        return snapshots.list_snapshots(self, self.get(name))

    def snapshot_create(self, name: str, snapshot: str, description: str = "",
                        live: bool | None = None) -> dict[str, Any]:
        from thalunix import disks, snapshots
        config = self.get(name)
        with disks.exclusive(self, config):
            return snapshots.create_snapshot(self, config, snapshot, description=description, live=live)

    def snapshot_revert(self, name: str, snapshot: str) -> dict[str, Any]:
        from thalunix import disks, snapshots
        config = self.get(name)
        with disks.exclusive(self, config):
            result = snapshots.revert_snapshot(self, config, snapshot)
        if self.supervisor.status(config)["state"] == "running":
            from thalunix import agent
            agent.sync_time_later(self.supervisor, config)   # the guest woke up at the snapshot's time
        return result

    def snapshot_delete(self, name: str, snapshot: str) -> dict[str, Any]:
        from thalunix import disks, snapshots
        config = self.get(name)
        with disks.exclusive(self, config):
            return snapshots.delete_snapshot(self, config, snapshot)

    def clone(self, name: str, new_name: str, linked: bool = False, tpm: str = "fresh",
              wait: bool = False) -> dict[str, Any]:
        from thalunix import clone
        config = self.get(name)
        clone.clone_precheck(self, config, new_name, tpm)
        return self._job("vm.clone", config, f"{'linked' if linked else 'full'} clone of {config.name} as {new_name}",
                         lambda job: self._announce(clone.clone_vm(self, config, new_name, linked=linked, tpm=tpm,
                                                                   job=job)), wait)

    def export(self, name: str, file: str, wait: bool = False) -> dict[str, Any]:
        from thalunix import archive
        config = self.get(name)
        archive.export_precheck(self, config, file)
        return self._job("vm.export", config, f"exporting {config.name}",
                         lambda job: archive.export_vm(self, config, file, job), wait)

    def import_vm(self, file: str, name: str | None = None, wait: bool = False) -> dict[str, Any]:
        from thalunix import archive
        archive.read_manifest(Path(file).expanduser().absolute())   # refuse a foreign file before any job
        return self._job("vm.import", None, f"importing {Path(file).name}",
                         lambda job: self._announce(archive.import_vm(self, file, job, name=name)), wait)

    def _announce(self, made: dict[str, Any]) -> dict[str, Any]:
        """Tell every front that a clone or import made a VM (their lists show it without asking)."""
        self.bus.publish("vm.config", vm=made["id"], name=made["name"], change="created")
        return made

    def jobs_list(self) -> list[dict[str, Any]]:
        return self.jobs.list()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.jobs.get(job_id).to_dict()

    def job_cancel(self, job_id: str) -> dict[str, Any]:
        return self.jobs.cancel(job_id)

    def attach_running(self) -> list[str]:
        from thalunix import share
        configs = [e.config for e in self.data.list_vms() if e.config]
        names = self.supervisor.attach_all(configs)
        for config in configs:
            if config.name in names:
                share.resume_for(self.data, config)   # QEMU's guestfwd reconnects to the new server
        return names

    # -- networks, USB, guest agent, shared folder (the work is in net/usb/agent/share) -------------------
    def nics(self, name: str) -> list[dict[str, Any]]:
        from thalunix import net
        return net.nic_rows(self.get(name))

    def nic_add(self, name: str, mode: str = "user", model: str = "virtio-net-pci", network: str = "",
                bridge: str = "", tap: str = "", mac: str = "", forwards: list[str] | None = None) -> list[dict[str, Any]]:
        config = self.get(name)
        nic = {"mode": mode, "model": model, "network": network, "bridge": bridge, "tap": tap, "mac": mac,
               "forwards": [PortForward.parse(spec).to_dict() for spec in forwards or []]}
        return self.nics(self.edit(name, {"nics": [n.to_dict() for n in config.nics] + [nic]}).name)

    def nic_remove(self, name: str, card: int) -> list[dict[str, Any]]:
        """Remove card ``card`` (1-based, as listings number them)."""
        config = self.get(name)
        if not 1 <= card <= len(config.nics):
            raise ValidationError(f"{config.label} has no network card {card} (it has {len(config.nics)})", "card")
        nics = [n.to_dict() for i, n in enumerate(config.nics) if i != card - 1]
        return self.nics(self.edit(name, {"nics": nics}).name)

    def forward_add(self, name: str, spec: str, card: int = 1) -> list[dict[str, Any]]:
        from thalunix import net
        config = net.add_forward(self.get(name), spec, card - 1)
        return self.nics(self.edit(name, {"nics": [n.to_dict() for n in config.nics]}).name)

    def forward_remove(self, name: str, spec: str, card: int | None = None) -> list[dict[str, Any]]:
        from thalunix import net
        config = net.remove_forward(self.get(name), spec, None if card is None else card - 1)
        return self.nics(self.edit(name, {"nics": [n.to_dict() for n in config.nics]}).name)

    def networks(self) -> list[dict[str, Any]]:
        from thalunix import net
        return net.list_networks(self.data)

    def network_create(self, network: str, description: str = "") -> dict[str, Any]:
        from thalunix import net
        created = net.create_network(self.data, network, description).to_dict()
        self.bus.publish("network.config", network=network, change="created")
        return created

    def network_delete(self, network: str) -> None:
        from thalunix import net
        net.delete_network(self.data, network)
        self.bus.publish("network.config", network=network, change="deleted")

    def usb_host_devices(self) -> list[dict[str, Any]]:
        from thalunix import usb
        return usb.list_host_devices()

    def usb_devices(self, name: str) -> list[dict[str, Any]]:
        from thalunix import usb
        return usb.attached(self, name)

    def usb_attach(self, name: str, device: str, remember: bool = False) -> dict[str, Any]:
        from thalunix import usb
        return usb.attach(self, name, device, remember=remember)

    def usb_detach(self, name: str, device: str, forget: bool = True) -> dict[str, Any]:
        from thalunix import usb
        return usb.detach(self, name, device, forget=forget)

    def agent_info(self, name: str) -> dict[str, Any]:
        from thalunix import agent
        return agent.info(self, name)

    def copy_in(self, name: str, host_file: str, guest_path: str, wait: bool = False) -> dict[str, Any]:
        from thalunix import agent
        config = self.get(name)
        if not Path(host_file).expanduser().is_file():
            raise ValidationError(f"{host_file!r} is not a file on this host; check the path", "host_file")
        self.supervisor.require_session(config)
        return self._job("vm.copy-in", config, f"copying {Path(host_file).name} into {config.name}",
                         lambda job: agent.copy_in(self, name, host_file, guest_path, progress=job.update,
                                                   cancelled=lambda: job.cancelled), wait, lock=False)

    def copy_out(self, name: str, guest_path: str, host_file: str, wait: bool = False) -> dict[str, Any]:
        from thalunix import agent
        config = self.get(name)
        self.supervisor.require_session(config)
        return self._job("vm.copy-out", config, f"copying {guest_path} out of {config.name}",
                         lambda job: agent.copy_out(self, name, guest_path, host_file, progress=job.update,
                                                    cancelled=lambda: job.cancelled), wait, lock=False)

    def share_set(self, name: str, folder: str | None) -> dict[str, Any]:
        from thalunix import share
        return share.set_folder(self, name, folder)

    def share_info(self, name: str) -> dict[str, Any]:
        from thalunix import share
        return share.info(self, name)

    def close(self, stop_vms: bool = False) -> None:
        """Leave: stop the VMs, or let them run on (a later Thalunix re-attaches)."""
        if self._downloads is not None:
            with contextlib.suppress(Exception):
                self._downloads.close()   # running downloads pause; their partial files resume later
        with contextlib.suppress(Exception):
            if stop_vms:
                self.supervisor.stop_all()
        if not stop_vms:
            from thalunix.qemu.winjob import default_job
            default_job().leave_running()   # Windows: a deliberate leave keeps the VMs (a crash does not)
        self.supervisor.detach_all()
