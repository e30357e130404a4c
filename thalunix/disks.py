"""A VM's disks: list, add (new or existing image), remove, grow, convert raw ⇄ qcow2, check and repair.

Stopped VMs are changed with ``qemu-img``; running VMs get disks hot-plugged and
unplugged over QMP (``blockdev-add`` + ``device_add``; ``device_del``, wait for
``DEVICE_DELETED``, ``blockdev-del``) and grown with ``block_resize``. Every change
is persisted in the VM's config. Also here, because every module that rewrites a
disk needs it: :func:`linked_clones_of` (which VMs' images are built on this one's).

Every function takes the engine (for its data folder, runtime, supervisor and jobs)
and the VM's config, and returns JSON-able dicts, so engine verbs and REST routes map 1:1.

Example::

    add_disk(engine, vm, size="8G", bus="virtio")          # {"id": "disk1", "path": ..., ...}
    resize_disk(engine, vm, "disk1", "16G")
    engine.jobs.start("disk.convert", lambda job: convert_disk(engine, vm, "disk1", "raw", job))
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from thalunix.errors import ConflictError, NotFoundError, ThalunixError, ValidationError
from thalunix.events import Subscription
from thalunix.jobs import Job, WorkFolder
from thalunix.model import DISK_BUSES, DISK_FORMATS, Disk, VMConfig, format_size, parse_size
from thalunix.qemu.img import ImageError, QemuImg, allocated_size, qcow2_backing_file

if TYPE_CHECKING:
    from thalunix.engine import DirectEngine

SUFFIX = {"qcow2": ".qcow2", "raw": ".img"}
#: Spare PCIe root ports the q35 machine is given at start, so disks can be hot-plugged (pcie.0 cannot).
HOTPLUG_PORT_PREFIX = "hotplug"
UNPLUG_TIMEOUT = 30.0


class DiskError(ThalunixError):
    """A disk operation was refused or failed; the message says why and what to do."""

    code = "disk"
    http_status = 409


# -- shared helpers ------------------------------------------------------------------------------------
def qemu_img(engine: "DirectEngine") -> QemuImg:
    return QemuImg(engine.runtime().require_qemu_img())


def vm_state(engine: "DirectEngine", config: VMConfig) -> str:
    return str(engine.supervisor.status(config)["state"])


def is_running(engine: "DirectEngine", config: VMConfig) -> bool:
    return vm_state(engine, config) in ("running", "paused", "starting")


def require_stopped(engine: "DirectEngine", config: VMConfig, what: str) -> None:
    state = vm_state(engine, config)
    if state not in ("stopped", "crashed"):
        raise ConflictError(f"{config.label} is {state}; stop it before you {what}")


def refuse_if_busy(engine: "DirectEngine", config: VMConfig, job: Job | None = None) -> None:
    """Refuse while a job (other than ``job``) is reading or rewriting this VM's images."""
    busy = engine.jobs.busy(config)
    if busy is not None and busy is not job:
        raise ConflictError(f"{config.label} is busy with {busy.title} (job {busy.id}); wait for it to finish "
                            "or cancel it")


@contextlib.contextmanager
def exclusive(engine: "DirectEngine", config: VMConfig, job: Job | None = None) -> Iterator[None]:
    """Hold the VM's lock while its images are rewritten, so no other Thalunix starts it meanwhile.

    A running VM's lock is already held by its session (here or elsewhere); then nothing changes.
    """
    refuse_if_busy(engine, config, job)
    if is_running(engine, config):
        yield
        return
    lock = engine.data.lock_vm(config)          # LockedError names the other process
    try:
        yield
    finally:
        session = engine.supervisor.sessions.get(config.id)
        if not (session and not session.exited.is_set()) and lock.held:
            engine.data.unlock_vm(config)


def find_disk(config: VMConfig, disk_id: str) -> Disk:
    for disk in config.disks:
        if disk.id == disk_id or disk.path == disk_id or Path(disk.path).name == disk_id:
            return disk
    known = ", ".join(d.id for d in config.disks) or "none"
    raise NotFoundError(f"{config.label} has no disk {disk_id!r}; its disks: {known}")


def disk_path(engine: "DirectEngine", disk: Disk) -> Path:
    return engine.data.resolve(disk.path)


def reload(engine: "DirectEngine", config: VMConfig) -> VMConfig:
    """The VM's config as stored now (another front may have changed it meanwhile)."""
    return engine.data.find_vm(config.id)


def backing_chain(path: Path, limit: int = 16) -> list[Path]:
    """The backing files under ``path`` (nearest first), read from qcow2 headers."""
    chain: list[Path] = []
    current = path
    for _ in range(limit):
        backing = qcow2_backing_file(current)
        if not backing:
            break
        current = (current.parent / backing) if not os.path.isabs(backing) else Path(backing)
        chain.append(Path(os.path.normpath(current)))
    return chain


def vm_files(engine: "DirectEngine", config: VMConfig) -> set[Path]:
    """Every image a VM's disks use: the images themselves and their backing chains."""
    files: set[Path] = set()
    for disk in config.disks:
        path = Path(os.path.normpath(disk_path(engine, disk)))
        files.add(path)
        files.update(backing_chain(path))
    return files


def linked_clones_of(engine: "DirectEngine", config: VMConfig) -> list[str]:
    """Names of other VMs whose disks are built (via a backing file) on an image in this VM's folder."""
    folder = Path(os.path.normpath(engine.data.vm_dir(config.id)))
    clones = []
    for entry in engine.data.list_vms():
        other = entry.config
        if other is None or other.id == config.id:
            continue
        for disk in other.disks:
            chain = backing_chain(Path(os.path.normpath(disk_path(engine, disk))))
            if any(folder in image.parents for image in chain):
                clones.append(other.name)
                break
    return sorted(clones, key=str.lower)


def refuse_if_linked(engine: "DirectEngine", config: VMConfig, what: str) -> None:
    clones = linked_clones_of(engine, config)
    if clones:
        names = ", ".join(repr(name) for name in clones)
        raise ConflictError(f"{config.label} cannot {what}: linked clone{'s' if len(clones) > 1 else ''} "
                            f"{names} {'are' if len(clones) > 1 else 'is'} built on its disks; delete "
                            f"{'them' if len(clones) > 1 else 'it'} first (or make full clones instead)")


@contextlib.contextmanager
def qmp_events(engine: "DirectEngine", config: VMConfig) -> Iterator[Subscription]:
    """QMP events of one VM from now on; subscribe *before* the command whose event you wait for."""
    with engine.bus.subscribe(accept=lambda e: e.get("vm") == config.id and e["type"] == "vm.qmp") as events:
        yield events


def await_event(events: Subscription, match: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = events.get(timeout=max(0.0, deadline - time.monotonic()))
        if event and match(event):
            return event
    return None


# -- listing ------------------------------------------------------------------------------------------
def describe_disk(engine: "DirectEngine", disk: Disk) -> dict[str, Any]:
    path = disk_path(engine, disk)
    info: dict[str, Any] = {**disk.to_dict(), "file": str(path), "exists": path.is_file()}
    if not path.is_file():
        return info
    try:
        facts = qemu_img(engine).info(path)
    except ImageError as error:
        info["error"] = str(error)
        return info
    info.update({"virtual_size": facts.get("virtual-size"), "actual_size": facts.get("actual-size"),
                 "size": format_size(int(facts.get("virtual-size", 0) or 0)),
                 "detected_format": facts.get("format"), "backing_file": facts.get("backing-filename"),
                 "snapshots": [s["name"] for s in facts.get("snapshots", [])]})
    return info


def list_disks(engine: "DirectEngine", config: VMConfig) -> list[dict[str, Any]]:
    return [describe_disk(engine, disk) for disk in config.disks]


# -- adding and removing ------------------------------------------------------------------------------
def _new_disk_id(config: VMConfig) -> str:
    taken = {d.id for d in config.disks} | {c.id for c in config.cdroms}
    index = 0
    while f"disk{index}" in taken:
        index += 1
    return f"disk{index}"


def add_disk(engine: "DirectEngine", config: VMConfig, size: str | int | None = None, path: str | None = None,
             fmt: str = "qcow2", bus: str = "virtio", readonly: bool = False) -> dict[str, Any]:
    """Give the VM a new empty disk of ``size``, or attach the existing image at ``path``; hot-plug if running."""
    if (size is None) == (path is None):
        raise ValidationError(f"{config.label}: give either a size for a new disk or the path of an existing "
                              "image, not both", "size")
    if bus not in DISK_BUSES:
        raise ValidationError(f"bus {bus!r} is unknown; choose one of {', '.join(DISK_BUSES)}", "bus")
    config = reload(engine, config)
    refuse_if_busy(engine, config)
    running = is_running(engine, config)
    if running:
        _check_hotplug_bus(config, bus)
    disk_id = _new_disk_id(config)
    created: Path | None = None
    if path is not None:
        image = Path(path).expanduser()
        if not image.is_file():
            raise ValidationError(f"disk image {path!r} does not exist; check the path", "path")
        detected = qemu_img(engine).info(image).get("format", "raw")
        if detected not in DISK_FORMATS:
            raise ValidationError(f"disk image {path!r} is in {detected} format; convert it to qcow2 first "
                                  f"(qemu-img convert -O qcow2 …)", "path")
        if any(engine.data.resolve(d.path) == image.absolute() for d in config.disks):
            raise ConflictError(f"{config.label} already has {image} as a disk")
        disk = Disk(path=engine.data.to_stored_path(image), format=detected, bus=bus, readonly=readonly, id=disk_id)
    else:
        if fmt not in DISK_FORMATS:
            raise ValidationError(f"format {fmt!r} is unknown; choose one of {', '.join(DISK_FORMATS)}", "format")
        bytes_ = parse_size(size, field="size", default_unit="G")   # type: ignore[arg-type]
        target = engine.data.vm_path(config.id, "disks", disk_id + SUFFIX[fmt])
        if target.exists():
            # Left by an add that died between making the file and saving the config: nobody uses it.
            if any(engine.data.resolve(d.path) == target for d in config.disks):
                raise ConflictError(f"{target} is already one of {config.label}'s disks")
            target.unlink()
        qemu_img(engine).create(target, bytes_, fmt)
        created = target
        disk = Disk(path=engine.data.to_stored_path(target), format=fmt, bus=bus, readonly=readonly, id=disk_id)
    try:
        if running:
            _hotplug(engine, config, disk)
        config.disks.append(disk)
        engine.data.save_vm(config)
    except BaseException:
        if created is not None:
            created.unlink(missing_ok=True)
        raise
    engine.supervisor.vm_log(config, f"disk {disk.id} added ({disk.path}, {disk.format}, {disk.bus})"
                                     + (" while running" if running else ""))
    return describe_disk(engine, disk)


def remove_disk(engine: "DirectEngine", config: VMConfig, disk_id: str, delete_file: bool = False) -> dict[str, Any]:
    """Take a disk off the VM (unplugging it if running); ``delete_file`` also erases an image in the VM's folder."""
    config = reload(engine, config)
    refuse_if_busy(engine, config)
    disk = find_disk(config, disk_id)
    path = disk_path(engine, disk)
    if delete_file and engine.data.vm_dir(config.id) in path.parents:
        # A disk whose image others are built on cannot go; only this VM's own images are erased.
        refuse_if_linked(engine, config, f"delete disk {disk.id}")
    if is_running(engine, config):
        _unplug(engine, config, disk)
    config.disks = [d for d in config.disks if d.id != disk.id]
    engine.data.save_vm(config)
    deleted = False
    if delete_file and engine.data.vm_dir(config.id) in path.parents:
        path.unlink(missing_ok=True)
        deleted = True
    engine.supervisor.vm_log(config, f"disk {disk.id} removed ({disk.path}){'; file deleted' if deleted else ''}")
    return {"removed": disk.id, "path": disk.path, "file_deleted": deleted}


def _check_hotplug_bus(config: VMConfig, bus: str) -> None:
    if bus in ("sata", "ide"):
        raise ConflictError(f"{config.label} is running and {bus.upper()} disks cannot be plugged in while it "
                            "runs; use the virtio, scsi or nvme bus, or stop the VM first")


def _hotplug(engine: "DirectEngine", config: VMConfig, disk: Disk) -> None:
    supervisor = engine.supervisor
    node = {"driver": disk.format, "node-name": disk.id, "read-only": disk.readonly,
            "file": {"driver": "file", "filename": str(disk_path(engine, disk)), "read-only": disk.readonly}}
    supervisor.qmp(config, "blockdev-add", node)
    try:
        if disk.bus == "scsi":
            _ensure_scsi_controller(engine, config)
            supervisor.qmp(config, "device_add", {"driver": "scsi-hd", "drive": disk.id, "id": f"{disk.id}-dev",
                                                  "bus": "scsi0.0"})
        else:
            device: dict[str, Any] = {"driver": "virtio-blk-pci" if disk.bus == "virtio" else "nvme",
                                      "drive": disk.id, "id": f"{disk.id}-dev"}
            if disk.bus == "nvme":
                device["serial"] = disk.id
            _add_pci_device(engine, config, device)
    except BaseException:
        with contextlib.suppress(ThalunixError):
            supervisor.qmp(config, "blockdev-del", {"node-name": disk.id})
        raise


def _add_pci_device(engine: "DirectEngine", config: VMConfig, device: dict[str, Any]) -> None:
    """``device_add`` on a free hot-plug port (q35) or on the root bus (pc)."""
    if config.machine != "q35":
        engine.supervisor.qmp(config, "device_add", device)
        return
    # Ask which port is empty rather than trying each: a device_add refused for an occupied port can
    # leave QEMU believing the device id is taken.
    free = []
    for bus in engine.supervisor.qmp(config, "query-pci"):
        for item in bus.get("devices", []):
            bridge = item.get("pci_bridge")
            if bridge is not None and str(item.get("qdev_id", "")).startswith(HOTPLUG_PORT_PREFIX) \
                    and not bridge.get("devices"):
                free.append(item["qdev_id"])
    if not free:
        raise ConflictError(f"{config.label} has no free hot-plug slot (its spare PCIe ports are all in use); "
                            "remove a hot-plugged disk, or stop the VM and add the disk then")
    engine.supervisor.qmp(config, "device_add", {**device, "bus": sorted(free)[0]})


def _ensure_scsi_controller(engine: "DirectEngine", config: VMConfig) -> None:
    tree = engine.supervisor.qmp(config, "qom-list", {"path": "/machine/peripheral"})
    if any(item.get("name") == "scsi0" for item in tree):
        return
    _add_pci_device(engine, config, {"driver": "virtio-scsi-pci", "id": "scsi0"})


def _unplug(engine: "DirectEngine", config: VMConfig, disk: Disk) -> None:
    device_id = f"{disk.id}-dev"
    with qmp_events(engine, config) as events:
        engine.supervisor.qmp(config, "device_del", {"id": device_id})
        gone = await_event(events, lambda e: e.get("event") == "DEVICE_DELETED"
                           and e.get("data", {}).get("device") == device_id, UNPLUG_TIMEOUT)
    if gone is None:
        raise DiskError(f"{config.label}: the guest did not release disk {disk.id} within {UNPLUG_TIMEOUT:.0f} s "
                        "(it must support hot-unplug and be past its boot loader); unmount it in the guest and "
                        "try again, or stop the VM and remove the disk then")
    with contextlib.suppress(ThalunixError):
        # The node may already be gone with its device (drive= owned by it); ours is named, so delete it.
        engine.supervisor.qmp(config, "blockdev-del", {"node-name": disk.id})


# -- size -----------------------------------------------------------------------------------------------
def resize_disk(engine: "DirectEngine", config: VMConfig, disk_id: str, size: str | int,
                force_shrink: bool = False) -> dict[str, Any]:
    """Grow a disk (also while running); shrinking only when stopped and with ``force_shrink``."""
    config = reload(engine, config)
    refuse_if_busy(engine, config)
    disk = find_disk(config, disk_id)
    path = disk_path(engine, disk)
    target = parse_size(size, field="size", default_unit="G")
    current = int(qemu_img(engine).info(path).get("virtual-size", 0))
    if target == current:
        return {**describe_disk(engine, disk), "changed": False}
    shrink = target < current
    if shrink and not force_shrink:
        raise ValidationError(
            f"{config.label}: disk {disk.id} is {format_size(current)}; shrinking it to {format_size(target)} "
            f"cuts off the last {format_size(current - target)} and whatever the guest keeps there is lost. "
            "Shrink the partitions and filesystems inside the guest first, then repeat with force "
            "(--force-shrink)", "size")
    if disk.format == "qcow2" and engine.data.vm_dir(config.id) in path.parents and shrink:
        refuse_if_linked(engine, config, f"shrink disk {disk.id}")
    if is_running(engine, config):
        if shrink:
            raise ConflictError(f"{config.label} is running; a disk can only be shrunk while the VM is stopped")
        engine.supervisor.qmp(config, "block_resize", {"node-name": disk.id, "size": target})
    else:
        qemu_img(engine).resize(path, target, disk.format, shrink=shrink)
    engine.supervisor.vm_log(config, f"disk {disk.id} resized from {format_size(current)} to {format_size(target)}")
    return {**describe_disk(engine, disk), "changed": True, "previous_size": current}


# -- convert --------------------------------------------------------------------------------------------
def convert_precheck(engine: "DirectEngine", config: VMConfig, disk_id: str, fmt: str) -> Disk:
    """Everything that refuses a convert, checked before any job starts; returns the disk."""
    if fmt not in DISK_FORMATS:
        raise ValidationError(f"format {fmt!r} is unknown; choose one of {', '.join(DISK_FORMATS)}", "format")
    disk = find_disk(config, disk_id)
    require_stopped(engine, config, f"convert disk {disk.id}")
    source = disk_path(engine, disk)
    if not source.is_file():
        raise NotFoundError(f"{config.label}: disk {disk.id}'s image {source} is missing")
    if disk.format == fmt and not qcow2_backing_file(source):
        raise ValidationError(f"{config.label}: disk {disk.id} is already {fmt}", "format")
    if engine.data.vm_dir(config.id) in source.parents:
        refuse_if_linked(engine, config, f"convert disk {disk.id}")
    snapshots = qemu_img(engine).snapshots(source) if disk.format == "qcow2" else []
    if snapshots and fmt == "raw":
        names = ", ".join(repr(s["name"]) for s in snapshots)
        raise ConflictError(f"{config.label}: disk {disk.id} holds snapshots ({names}) that a raw image cannot "
                            f"keep; delete them first (thalunix vm snapshot {config.name!r} delete SNAP)")
    return disk


def convert_disk(engine: "DirectEngine", config: VMConfig, disk_id: str, fmt: str, job: Job) -> dict[str, Any]:
    """Convert a stopped VM's disk to ``fmt`` (raw ⇄ qcow2) with progress; the old image goes only once the
    new one is complete and the config points to it."""
    config = reload(engine, config)
    disk = convert_precheck(engine, config, disk_id, fmt)
    source = disk_path(engine, disk)
    inside = engine.data.vm_dir(config.id) in source.parents
    target = engine.data.vm_path(config.id, "disks", Path(source.name).stem + SUFFIX[fmt])
    if target == source:
        target = target.with_name(f"{target.stem}-{fmt}{target.suffix}")
    if target.exists() and any(engine.data.resolve(d.path) == target for d in config.disks):
        raise ConflictError(f"{target} is already one of {config.label}'s disks; rename it first")
    job.update(0, f"converting {disk.id} to {fmt}")
    with WorkFolder(engine.data, f"convert-{config.id[:8]}") as work:
        temp = work / target.name
        qemu_img(engine).convert(source, temp, fmt, disk.format, progress=lambda pct: job.update(pct * 0.99),
                                 track=job.track)
        job.check_cancelled()
        os.replace(temp, target)   # tmp/ and vms/ share a filesystem: a rename, never a copy
    try:
        fresh = reload(engine, config)
        for item in fresh.disks:
            if item.id == disk.id:
                item.path, item.format = engine.data.to_stored_path(target), fmt
        engine.data.save_vm(fresh)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if inside:
        source.unlink(missing_ok=True)
    engine.supervisor.vm_log(config, f"disk {disk.id} converted from {disk.format} to {fmt} ({target.name})")
    result = describe_disk(engine, find_disk(reload(engine, config), disk.id))
    result["previous_file"] = str(source)
    result["previous_file_kept"] = not inside
    job.update(100, f"disk {disk.id} is now {fmt}")
    return result


# -- check ----------------------------------------------------------------------------------------------
def check_disk(engine: "DirectEngine", config: VMConfig, disk_id: str, repair: str | None = None) -> dict[str, Any]:
    """``qemu-img check`` (and repair: ``leaks`` or ``all``) of a stopped VM's qcow2 disk."""
    config = reload(engine, config)
    refuse_if_busy(engine, config)
    disk = find_disk(config, disk_id)
    if disk.format != "qcow2":
        raise ValidationError(f"{config.label}: disk {disk.id} is raw, which has no metadata to check; only "
                              "qcow2 images can be checked", "disk")
    require_stopped(engine, config, f"check disk {disk.id}")
    report = qemu_img(engine).check(disk_path(engine, disk), disk.format, repair)
    clean = not (report["check-errors"] or report["leaks"] or report["corruptions"])
    if repair:
        engine.supervisor.vm_log(config, f"disk {disk.id} checked and repaired ({repair})")
    return {"disk": disk.id, "clean": clean, "report": report, "allocated": allocated_size(disk_path(engine, disk))}
