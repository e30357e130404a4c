"""Clones of a stopped VM: full (every disk copied) or linked (qcow2 overlays on the source's images).

Both give the clone a new id (so a new SMBIOS UUID), new MAC addresses, a copy of the
UEFI variables, and a fresh or copied TPM state. The clone is assembled in a work
folder under ``tmp/`` and registered by one rename: a clone killed half-way leaves no VM.

Linked clones: the source's current image of each disk becomes a read-only *base*; the
clone gets an overlay on it, and so does the source (which keeps running on its own
overlay), so neither can change what the other sees. Backing paths are relative
(``../../<source-id>/disks/…``) so the data folder can move. While linked clones exist the
source cannot be deleted nor revert its snapshots (they stay in the base); the
refusal names the clones (:func:`thalunix.disks.refuse_if_linked`).

Example::

    engine.jobs.start("clone", lambda job: clone_vm(engine, vm, "web-2", linked=True, tpm="fresh", job=job))
"""

from __future__ import annotations

import datetime
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thalunix import disks
from thalunix.errors import ConflictError, ValidationError
from thalunix.jobs import Job, WorkFolder
from thalunix.model import VMConfig, random_mac, validate_name

if TYPE_CHECKING:
    from thalunix.engine import DirectEngine

TPM_CHOICES = ("fresh", "copy")


def new_identity(source: VMConfig, name: str) -> VMConfig:
    """A copy of ``source``'s settings with a new name, id, creation time and MAC addresses."""
    data = source.to_dict()
    data.update(name=name, id=uuid.uuid4().hex,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    config = VMConfig.from_dict(data)
    used = set()
    for nic in config.nics:
        mac = random_mac()
        while mac in used:
            mac = random_mac()
        nic.mac = mac
        used.add(mac)
    return config


def _check_target_name(engine: "DirectEngine", name: str) -> None:
    validate_name(name)
    for entry in engine.data.list_vms():
        if entry.config and entry.config.name.lower() == name.lower():
            raise ConflictError(f"a VM named {entry.config.name!r} already exists; choose another name for the clone")


def _copy_firmware_and_tpm(engine: "DirectEngine", source: VMConfig, staging: Path, tpm: str, job: Job) -> None:
    firmware = engine.data.vm_path(source.id, "firmware")
    (staging / "firmware").mkdir(parents=True, exist_ok=True)
    if firmware.is_dir():
        for item in firmware.iterdir():
            if item.name == "vars.qcow2":
                # convert, not copy: the source's snapshot tags in it mean nothing to the clone.
                disks.qemu_img(engine).convert(item, staging / "firmware" / item.name, "qcow2", "qcow2",
                                               track=job.track)
            elif item.is_file() and not item.name.endswith(".prev"):
                shutil.copy2(item, staging / "firmware" / item.name)
    if tpm == "copy":
        state = engine.data.vm_path(source.id, "tpm")
        if state.is_dir():
            shutil.copytree(state, staging / "tpm", dirs_exist_ok=True)


def clone_precheck(engine: "DirectEngine", source: VMConfig, name: str, tpm: str) -> None:
    """Everything that refuses a clone, checked before any job starts."""
    if tpm not in TPM_CHOICES:
        raise ValidationError(f"tpm {tpm!r}: choose fresh (a new, empty TPM) or copy (the source's TPM state)", "tpm")
    _check_target_name(engine, name)
    disks.require_stopped(engine, source, "clone it")


def clone_vm(engine: "DirectEngine", source: VMConfig, name: str, linked: bool = False, tpm: str = "fresh",
             job: Job | None = None) -> dict[str, Any]:
    """Make ``name`` from the stopped VM ``source``; returns the new VM's summary."""
    job = job or Job(None, "clone")
    source = disks.reload(engine, source)
    clone_precheck(engine, source, name, tpm)
    clone = new_identity(source, name)
    from thalunix import net
    net.ensure_unique_macs(engine.data, clone, generated=range(len(clone.nics)))   # unique in the whole folder
    with WorkFolder(engine.data, f"clone-{clone.id[:8]}") as work:
        staging = work / "vm"
        (staging / "disks").mkdir(parents=True)
        if linked:
            switches = _linked_disks(engine, source, clone, staging, job)
        else:
            _full_disks(engine, source, clone, staging, job)
            switches = []
        job.check_cancelled()
        _copy_firmware_and_tpm(engine, source, staging, tpm, job)
        job.check_cancelled()
        if switches:
            # The source moves onto its new overlays *before* the clone exists: from now on nothing writes
            # to the bases. A crash here leaves the source on overlays (fine) and no clone.
            fresh = disks.reload(engine, source)
            for disk in fresh.disks:
                if disk.id in switches:
                    disk.path, disk.format = engine.data.to_stored_path(switches[disk.id]), "qcow2"
            engine.data.save_vm(fresh)
        created = engine.data.adopt_vm(staging, clone)
    engine.supervisor.vm_log(source, f"{'linked' if linked else 'full'} clone {created.name!r} made (TPM {tpm})")
    job.update(100, f"clone {created.name!r} ready")
    return {"name": created.name, "id": created.id, "linked": linked, "tpm": tpm, "source": source.name,
            "folder": str(engine.data.vm_dir(created.id))}


def _full_disks(engine: "DirectEngine", source: VMConfig, clone: VMConfig, staging: Path, job: Job) -> None:
    img = disks.qemu_img(engine)
    sizes = []
    for disk in source.disks:
        path = disks.disk_path(engine, disk)
        if not path.is_file():
            raise ValidationError(f"{source.label}: disk {disk.id} ({path}) is missing; cannot clone it", "disks")
        sizes.append(max(1, int(img.info(path).get("virtual-size", 1))))
    total, done = sum(sizes) or 1, 0
    names: set[str] = set()
    for disk, size, target_disk in zip(source.disks, sizes, clone.disks):
        path = disks.disk_path(engine, disk)
        file_name = _unique(path.name, names)
        start, end = 95 * done / total, 95 * (done + size) / total
        with job.step(start, end, f"copying disk {disk.id} ({path.name})"):
            # convert (not a byte copy): sparse stays sparse, a backing chain is flattened into one image.
            img.convert(path, staging / "disks" / file_name, disk.format, disk.format, progress=job.update,
                        track=job.track)
        job.check_cancelled()
        target_disk.path = engine.data.to_stored_path(engine.data.vm_path(clone.id, "disks", file_name))
        done += size


def _linked_disks(engine: "DirectEngine", source: VMConfig, clone: VMConfig, staging: Path,
                  job: Job) -> dict[str, Path]:
    """Overlays for the clone (in staging) and for the source (beside its images); returns disk id → source overlay."""
    img = disks.qemu_img(engine)
    source_disks = engine.data.vm_path(source.id, "disks")
    switches: dict[str, Path] = {}
    made: list[Path] = []
    names: set[str] = set()
    try:
        for disk, target_disk in zip(source.disks, clone.disks):
            if disk.readonly:
                continue   # nobody writes to it: both VMs can use the same image
            base = disks.disk_path(engine, disk)
            if not base.is_file():
                raise ValidationError(f"{source.label}: disk {disk.id} ({base}) is missing; cannot clone it", "disks")
            size = int(img.info(base).get("virtual-size", 0))
            file_name = _unique(f"{disk.id}.qcow2", names)
            final = engine.data.vm_path(clone.id, "disks", file_name)
            # Relative from the clone's final folder, so the data folder can move as a whole.
            relative = os.path.relpath(base, final.parent)
            img.create(staging / "disks" / file_name, size, "qcow2", backing=relative, backing_format=disk.format)
            target_disk.path, target_disk.format = engine.data.to_stored_path(final), "qcow2"
            overlay = source_disks / f"{disk.id}-{uuid.uuid4().hex[:6]}.qcow2"
            img.create(overlay, size, "qcow2", backing=os.path.relpath(base, overlay.parent),
                       backing_format=disk.format)
            made.append(overlay)
            switches[disk.id] = overlay
            job.check_cancelled()
    except BaseException:
        for overlay in made:
            overlay.unlink(missing_ok=True)
        raise
    return switches


def _unique(name: str, taken: set[str]) -> str:
    candidate, number = name, 2
    stem, suffix = Path(name).stem, Path(name).suffix
    while candidate in taken:
        candidate = f"{stem}-{number}{suffix}"
        number += 1
    taken.add(candidate)
    return candidate
