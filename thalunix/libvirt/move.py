"""Moving a VM between the portable data folder and a libvirt host, both ways, with checksums.

To a host: every disk is uploaded as a storage volume (virStorageVolUpload) and read back (virStorageVolDownload)
to compare SHA-256; CD-ROM images go into the host's pool once (named by their checksum) unless the host is
this machine; then the domain is defined. Only when all of that succeeded is the portable VM removed; until
then it stays whole and locked against starts, and on any failure everything made on the host is removed.

Back from a host: every disk volume is downloaded into a work folder (hashed while streaming, hashed again
from the written file), the VM is registered in the data folder by one rename, and only then is the domain
(with the volumes Thalunix made for it) removed from the host.

Not moved: UEFI variables and TPM state (the target starts them fresh) — the result says so.

Example::

    job = move_to_host(direct, "web", manager.engine("lab"), wait=True)      # the job dict, with checksums
    job = move_to_local(manager.engine("lab"), "web", direct, wait=True)
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thalunix.errors import ConflictError, NotFoundError, ValidationError
from thalunix.jobs import Job, WorkFolder
from thalunix.libvirt import xml as domxml
from thalunix.libvirt.engine import CHUNK, file_sha256
from thalunix.model import VMConfig, validate
from thalunix.qemu.img import qcow2_backing_file

if TYPE_CHECKING:  # pragma: no cover
    from thalunix.engine import DirectEngine
    from thalunix.libvirt.engine import LibvirtEngine

LEFT_BEHIND = "UEFI variables and TPM state are not moved: the VM starts them fresh"


def _volume_name(config: VMConfig, drive_id: str, fmt: str) -> str:
    return domxml.safe_volume_name(f"{config.name}-{drive_id}.{'qcow2' if fmt == 'qcow2' else 'img'}")


def move_precheck(direct: "DirectEngine", config: VMConfig, target: "LibvirtEngine") -> None:
    """Every refusal that can be known before a byte moves: state, name clash, volume clash, model limits."""
    from thalunix import disks
    disks.require_stopped(direct, config, "be moved")
    busy = direct.jobs.busy(config)
    if busy:
        raise ConflictError(f"{config.label} is busy with {busy.title} (job {busy.id}); wait for it to finish")
    disks.refuse_if_linked(direct, config, "be moved")
    target._check_libvirt_model(config)
    validate(config, target.limits)
    target.domain_type(config.accel)
    target._refuse_taken(config.name)
    pool = target.pool()
    with contextlib.suppress(Exception):
        pool.refresh(0)
    existing = set(pool.listVolumes() or [])
    for disk in config.disks:
        path = direct.data.resolve(disk.path)
        if not path.is_file():
            raise ValidationError(f"{config.label}: disk image {path} does not exist; fix the VM before moving it",
                                  "disks")
        if disk.format == "qcow2" and qcow2_backing_file(path):
            raise ConflictError(f"{config.label}: disk {disk.id} is a linked clone's overlay; make a full clone "
                                "first and move that")
        name = _volume_name(config, disk.id, disk.format)
        if name in existing:
            raise ConflictError(f"{target.host.label}: pool {target.host.pool!r} already has a volume {name!r}; "
                                "rename the VM or remove that volume on the host")
    for cdrom in config.cdroms:
        if cdrom.path and not direct.data.resolve(cdrom.path).is_file():
            raise ValidationError(f"{config.label}: ISO {cdrom.path} does not exist; empty the drive or put the ISO "
                                  "back before moving", "cdroms")


def move_to_host(direct: "DirectEngine", name: str, target: "LibvirtEngine", keep_source: bool = False,
                 wait: bool = False) -> dict[str, Any]:
    """Move (or with ``keep_source`` copy) a stopped portable VM to ``target``; a job dict."""
    config = direct.get(name)
    move_precheck(direct, config, target)
    return direct._job("vm.move", config, f"moving {config.name} to {target.host.name}",
                       lambda job: _to_host(direct, config, target, keep_source, job), wait)


def _to_host(direct: "DirectEngine", config: VMConfig, target: "LibvirtEngine", keep_source: bool,
             job: Job) -> dict[str, Any]:
    from thalunix import disks
    made: list[Any] = []
    defined = None
    checksums: dict[str, str] = {}
    try:
        paths: dict[str, str] = {}
        count = max(1, len(config.disks))
        for index, disk in enumerate(config.disks):
            source = direct.data.resolve(disk.path)
            virtual = int(disks.qemu_img(direct).info(source).get("virtual-size") or source.stat().st_size)
            volume = target.new_volume(_volume_name(config, disk.id, disk.format),
                                       max(virtual, source.stat().st_size), disk.format)
            made.append(volume)
            with job.step(90 * index / count, 90 * (index + 1) / count, f"uploading {disk.id} ({source.name})"):
                checksums[disk.id] = target.upload(volume, source, progress=lambda p: job.update(p),
                                                   cancelled=lambda: bool(job.cancelled))
            paths[disk.id] = str(volume.path())
        job.check_cancelled()
        origins: dict[str, str] = {}
        for cdrom in config.cdroms:
            if cdrom.path:
                origins[cdrom.id] = cdrom.path
                with job.step(90, 98, f"placing ISO {Path(cdrom.path).name}"):
                    paths[cdrom.id] = target.place_iso(str(direct.data.resolve(cdrom.path)), made)
        moved = domxml.rebase_drives(config, paths)
        root = domxml.new_domain_xml(moved, target.domain_type(config.accel), target.host.network)
        domxml.set_owned_volumes(root, {paths[disk.id]: checksums[disk.id] for disk in config.disks})
        meta = domxml.ensure_metadata(root)
        for drive_id, origin in origins.items():
            domxml.ET.SubElement(meta, f"{domxml._T}origin", drive=drive_id, path=origin)
        job.check_cancelled()
        defined = target._call(f"defining VM {config.name!r}", target.conn.defineXML, domxml.to_text(root))
    except BaseException:
        if defined is not None:
            with contextlib.suppress(Exception):
                defined.undefine()
        for volume in made:
            if not volume.name().startswith("iso-"):
                with contextlib.suppress(Exception):
                    volume.delete(0)
        raise
    # Verified on the host: only now does the portable copy go.
    if not keep_source:
        direct.delete(config.id)
    target.bus.publish("vm.config", vm=config.id, name=config.name, change="created", host=target.host.name)
    return {"name": config.name, "host": target.host.name, "checksums": checksums, "source_kept": keep_source,
            "note": LEFT_BEHIND}


def move_to_local(source: "LibvirtEngine", name: str, direct: "DirectEngine", keep_source: bool = False,
                  wait: bool = False) -> dict[str, Any]:
    """Move (or copy) a stopped VM from a host into the portable folder; a job dict."""
    domain = source._domain(name)
    if source._state(domain) not in ("stopped", "crashed"):
        raise ConflictError(f"VM {domain.name()!r} on {source.host.label} is running; stop it before moving it")
    root = domxml.parse(source._xml(domain))
    view = domxml.config_from_xml(root)
    config = view.config
    try:
        local = direct.data.find_vm(config.name)
    except NotFoundError:
        local = None
    if local is not None:
        raise ConflictError(f"the portable folder already has a VM named {local.name!r}; rename one of them first")
    volumes = {disk.id: source._volume_by_path(disk.path) for disk in config.disks}
    return direct._job("vm.move", None, f"moving {config.name} from {source.host.name}",
                       lambda job: _to_local(source, root, view, volumes, direct, keep_source, job), wait)


def _to_local(source: "LibvirtEngine", root: Any, view: domxml.DomainView, volumes: dict[str, Any],
              direct: "DirectEngine", keep_source: bool, job: Job) -> dict[str, Any]:
    import uuid
    config = view.config
    if direct.data.vm_dir(config.id).exists():
        config.id = uuid.uuid4().hex   # a copy of this VM is still here: the one coming back gets its own id
    checksums: dict[str, str] = {}
    with WorkFolder(direct.data, f"move-{config.id[:8]}") as work:
        staging = work / "vm"
        (staging / "disks").mkdir(parents=True)
        count = max(1, len(config.disks))
        for index, disk in enumerate(config.disks):
            file_name = f"{disk.id}.{'qcow2' if disk.format == 'qcow2' else 'img'}"
            target = staging / "disks" / file_name
            with job.step(95 * index / count, 95 * (index + 1) / count, f"downloading {disk.id}"):
                with open(target, "wb") as sink:
                    streamed = source.volume_sha256(volumes[disk.id], progress=lambda p: job.update(p), sink=sink)
                    sink.flush()
            job.check_cancelled()
            written = file_sha256(target)
            if written != streamed:
                raise ConflictError(f"VM {config.name!r}: the downloaded {disk.id} differs from what the host sent "
                                    f"(SHA-256 {written[:16]}… ≠ {streamed[:16]}…); nothing was moved")
            checksums[disk.id] = streamed
            disk.path = f"vms/{config.id}/disks/{file_name}"
        meta = domxml._meta(root)
        origins = {o.get("drive"): o.get("path") for o in meta.findall(f"{domxml._T}origin")} if meta is not None else {}
        for cdrom in config.cdroms:
            origin = origins.get(cdrom.id)
            if origin and direct.data.exists(origin):
                cdrom.path = origin
            elif cdrom.path and not source.host.remote and Path(cdrom.path).is_file():
                cdrom.path = direct.data.to_stored_path(cdrom.path)
            else:
                cdrom.path = ""   # an ISO only the host has stays there; the drive comes back empty
        if config.accel not in ("auto", "kvm", "tcg"):
            config.accel = "auto"
        if config.os not in ("linux", "windows", "windows11", "bsd", "other"):
            config.os = "other"
        config.set_defaults()
        validate(config, direct.host, lambda p: p.startswith(f"vms/{config.id}/") or direct.data.exists(p))
        job.update(97, "registering the VM in the portable folder")
        direct.data.adopt_vm(staging, config)
    if not keep_source:
        source.delete(config.name)
    direct.bus.publish("vm.config", vm=config.id, name=config.name, change="created")
    return {"name": config.name, "host": "local", "checksums": checksums, "source_kept": keep_source,
            "note": LEFT_BEHIND}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = ["move_to_host", "move_to_local", "move_precheck", "LEFT_BEHIND", "CHUNK"]
