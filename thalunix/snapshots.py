"""Snapshots of a whole VM: every writable disk, its UEFI variables and its TPM state, kept as a tree.

* **offline** (VM stopped): ``qemu-img snapshot`` on each writable qcow2 image, plus a
  copy of the TPM state files (``tpm/``) kept beside the metadata;
* **live** (VM running, RAM included): QMP ``snapshot-save`` / ``snapshot-load`` /
  ``snapshot-delete`` jobs over every writable node (the disks and ``fw-vars``); the
  memory state goes into the first disk. QEMU's TPM emulator carries the TPM state in
  the memory state itself.

qcow2 internal snapshots are flat, so the tree (parent links, descriptions, which one
is current) lives in ``snapshots.json`` in the VM's folder. A raw disk cannot hold
snapshots: the refusal names it and offers the convert.

TPM hook: if :mod:`thalunix.tpm` offers ``save_state(data, config, folder)`` and
``restore_state(data, config, folder)``, they are used; otherwise the state files are
copied while the VM is stopped.

Example::

    create_snapshot(engine, vm, "before-upgrade", description="clean install")
    revert_snapshot(engine, vm, "before-upgrade")
    list_snapshots(engine, vm)["tree"]     # [{"name": "before-upgrade", "children": [...]}]
    delete_snapshot(engine, vm, "before-upgrade")
"""

from __future__ import annotations

import datetime
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thalunix import disks
from thalunix.errors import ConflictError, NotFoundError, ThalunixError, ValidationError
from thalunix.model import VMConfig
from thalunix.store import atomic_write_json

if TYPE_CHECKING:
    from thalunix.engine import DirectEngine

META_NAME = "snapshots.json"
STATE_FOLDER = "snapshots"
FW_NODE = "fw-vars"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
LIVE_TIMEOUT = 600.0


class SnapshotError(ThalunixError):
    code = "snapshot"
    http_status = 409


class SnapshotUnsupportedError(SnapshotError):
    """A disk of the VM cannot hold snapshots (raw); ``disks`` names them, ``fix`` says how."""

    code = "snapshot-unsupported"

    def __init__(self, message: str, disks_: list[str], fix: str) -> None:
        super().__init__(message)
        self.disks = disks_
        self.fix = fix


def validate_snapshot_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", "..") or name.isdigit():
        raise ValidationError(f"snapshot name {name!r} is not allowed; use up to 63 letters, digits, '.', '_' and "
                              "'-', starting with a letter or digit (and not only digits, which qemu-img reads "
                              "as snapshot ids)", "name")
    return name


# -- what a snapshot covers -----------------------------------------------------------------------------
def _images(engine: "DirectEngine", config: VMConfig) -> list[tuple[str, Path]]:
    """(QMP node, file) of every writable image: the disks, then the UEFI variables. Raw disks refused."""
    raw = [d for d in config.disks if not d.readonly and d.format != "qcow2"]
    if raw:
        names = ", ".join(f"{d.id} ({Path(d.path).name})" for d in raw)
        fix = " ; ".join(f"thalunix vm disk {config.name!r} convert {d.id} qcow2" for d in raw)
        raise SnapshotUnsupportedError(
            f"{config.label}: disk{'s' if len(raw) > 1 else ''} {names} {'are' if len(raw) > 1 else 'is'} raw, "
            f"which cannot hold snapshots; convert {'them' if len(raw) > 1 else 'it'} to qcow2 first: {fix}",
            [d.id for d in raw], fix)
    images = [(d.id, disks.disk_path(engine, d)) for d in config.disks if not d.readonly]
    vars_file = engine.data.vm_path(config.id, "firmware", "vars.qcow2")
    if config.firmware != "bios" and vars_file.is_file():
        images.append((FW_NODE, vars_file))
    if not images:
        raise SnapshotError(f"{config.label} has no writable disk to snapshot; add a disk first")
    return images


def _meta_path(engine: "DirectEngine", config: VMConfig) -> Path:
    return engine.data.vm_path(config.id, META_NAME)


def _state_dir(engine: "DirectEngine", config: VMConfig, name: str) -> Path:
    return engine.data.vm_path(config.id, STATE_FOLDER, name)


def _load(engine: "DirectEngine", config: VMConfig) -> dict[str, Any]:
    meta = engine.data.read_json(_meta_path(engine, config), None)
    if not isinstance(meta, dict) or not isinstance(meta.get("snapshots"), dict):
        meta = {"current": None, "snapshots": {}}
    return meta


def _save(engine: "DirectEngine", config: VMConfig, meta: dict[str, Any]) -> None:
    atomic_write_json(_meta_path(engine, config), meta)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _tpm_hook(name: str) -> Any:
    try:
        import thalunix.tpm as tpm
    except ImportError:
        return None
    return getattr(tpm, name, None)


def _save_tpm(engine: "DirectEngine", config: VMConfig, name: str) -> str:
    """Keep the TPM state with the snapshot; returns a note for the result."""
    source = engine.data.vm_path(config.id, "tpm")
    target = _state_dir(engine, config, name) / "tpm"
    hook = _tpm_hook("save_state")
    if hook is not None:
        target.mkdir(parents=True, exist_ok=True)
        hook(engine.data, config, target)
        return "TPM state saved"
    if not source.is_dir() or not any(source.iterdir()):
        return "no TPM state"
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target)
    return "TPM state copied"


def _restore_tpm(engine: "DirectEngine", config: VMConfig, name: str) -> str:
    saved = _state_dir(engine, config, name) / "tpm"
    if not saved.is_dir():
        return "no TPM state kept with this snapshot"
    target = engine.data.vm_path(config.id, "tpm")
    hook = _tpm_hook("restore_state")
    if hook is not None:
        hook(engine.data, config, saved)
        return "TPM state restored"
    staging = target.with_name(f".tpm-restore-{uuid.uuid4().hex[:6]}")
    shutil.copytree(saved, staging)
    old = target.with_name(f".tpm-old-{uuid.uuid4().hex[:6]}")
    if target.exists():
        target.replace(old)
    staging.replace(target)
    shutil.rmtree(old, ignore_errors=True)
    return "TPM state restored"


# -- listing --------------------------------------------------------------------------------------------
def list_snapshots(engine: "DirectEngine", config: VMConfig) -> dict[str, Any]:
    """Every snapshot (name, description, date, live, size, parent) and the same as a tree."""
    meta = _load(engine, config)
    found: dict[str, dict[str, Any]] = {}
    try:
        images = _images(engine, config)
    except SnapshotError:
        images = [(d.id, disks.disk_path(engine, d)) for d in config.disks if d.format == "qcow2"]
    img = disks.qemu_img(engine)
    for node, path in images:
        if not path.is_file():
            continue
        for snap in img.snapshots(path):
            entry = found.setdefault(snap["name"], {"images": [], "vm_state_size": 0, "date_sec": snap["date-sec"]})
            entry["images"].append(node)
            entry["vm_state_size"] += int(snap.get("vm-state-size", 0))
    rows = []
    names = list(meta["snapshots"]) + [name for name in found if name not in meta["snapshots"]]
    for name in names:
        record = meta["snapshots"].get(name, {})
        facts = found.get(name)
        date = record.get("created") or (
            datetime.datetime.fromtimestamp(facts["date_sec"]).astimezone().isoformat(timespec="seconds")
            if facts else None)
        tpm_dir = _state_dir(engine, config, name) / "tpm"
        tpm_size = sum(f.stat().st_size for f in tpm_dir.rglob("*") if f.is_file()) if tpm_dir.is_dir() else 0
        rows.append({
            "name": name, "description": record.get("description", ""), "created": date,
            "parent": record.get("parent"), "live": bool(facts and facts["vm_state_size"]) or record.get("live", False),
            "size": (facts["vm_state_size"] if facts else 0) + tpm_size,
            "images": facts["images"] if facts else [],
            # Kept in metadata but in no image the VM uses now (e.g. left in a base image under linked clones).
            "available": facts is not None, "current": name == meta.get("current")})
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    known = {row["name"] for row in rows}
    for row in rows:
        parent = row["parent"] if row["parent"] in known else None
        by_parent.setdefault(parent, []).append(row)

    def tree(parent: str | None, depth: int = 0) -> list[dict[str, Any]]:
        if depth > 256:
            return []
        return [{**row, "children": tree(row["name"], depth + 1)} for row in by_parent.get(parent, [])]
    return {"vm": config.name, "current": meta.get("current"), "snapshots": rows, "tree": tree(None)}


def render_tree(listing: dict[str, Any]) -> str:
    """The tree as text, for the CLI: ``├─ name  date  size  description``, current marked."""
    lines: list[str] = []

    def walk(nodes: list[dict[str, Any]], prefix: str) -> None:
        for index, node in enumerate(nodes):
            last = index == len(nodes) - 1
            mark = " ← current" if node["current"] else ""
            live = " [RAM]" if node["live"] else ""
            gone = " (not available)" if not node["available"] else ""
            size = f"  {node['size'] >> 20} MiB" if node["size"] >= 1 << 20 else ""
            description = f"  {node['description']}" if node["description"] else ""
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{node['name']}{live}  {node['created'] or ''}"
                         f"{size}{description}{gone}{mark}")
            walk(node["children"], prefix + ("   " if last else "│  "))
    walk(listing["tree"], "")
    return "\n".join(lines) if lines else "No snapshots yet."


# -- create ---------------------------------------------------------------------------------------------
def create_snapshot(engine: "DirectEngine", config: VMConfig, name: str, description: str = "",
                    live: bool | None = None) -> dict[str, Any]:
    """Snapshot the VM: live with RAM when it runs (or ``live=True`` demands it), else offline."""
    validate_snapshot_name(name)
    if len(description) > 1000:
        raise ValidationError("description: at most 1000 characters", "description")
    config = disks.reload(engine, config)
    running = disks.is_running(engine, config)
    live = running if live is None else live
    if live and not running:
        raise ConflictError(f"{config.label} is not running; a snapshot with memory state needs a running VM "
                            "(start it, or take an offline snapshot)")
    if not live and running:
        raise ConflictError(f"{config.label} is running; stop it for an offline snapshot, or take a live one "
                            "(--live) which also keeps its memory")
    images = _images(engine, config)
    meta = _load(engine, config)
    img = disks.qemu_img(engine)
    existing = {s["name"] for _, path in images for s in img.snapshots(path)}
    if name in meta["snapshots"] or name in existing:
        raise ConflictError(f"{config.label} already has a snapshot named {name!r}; pick another name or delete it")
    parent = meta.get("current")
    if live:
        _live_job(engine, config, "snapshot-save", name, images)
        note = "memory state saved (the TPM state is part of it)"
    else:
        done: list[Path] = []
        try:
            for _, path in images:
                img.snapshot("create", path, name)
                done.append(path)
            note = _save_tpm(engine, config, name)
        except BaseException:
            for path in done:
                try:
                    img.snapshot("delete", path, name)
                except ThalunixError:
                    pass
            shutil.rmtree(_state_dir(engine, config, name), ignore_errors=True)
            raise
    meta["snapshots"][name] = {"name": name, "description": description, "created": _now(), "parent": parent,
                               "live": live}
    meta["current"] = name
    _save(engine, config, meta)
    engine.supervisor.vm_log(config, f"snapshot {name!r} taken ({'live' if live else 'offline'}; {note})")
    return {"name": name, "live": live, "parent": parent, "images": [node for node, _ in images], "note": note}


def _live_job(engine: "DirectEngine", config: VMConfig, command: str, name: str,
              images: list[tuple[str, Path]]) -> None:
    """Run a QMP snapshot job and wait (by event) for it to conclude; raise with QEMU's error if it failed."""
    job_id = f"thalunix-{command}-{uuid.uuid4().hex[:8]}"
    arguments: dict[str, Any] = {"job-id": job_id, "tag": name, "devices": [node for node, _ in images]}
    if command != "snapshot-delete":
        arguments["vmstate"] = images[0][0]
    supervisor = engine.supervisor
    with disks.qmp_events(engine, config) as events:
        supervisor.qmp(config, command, arguments)
        concluded = disks.await_event(
            events, lambda e: e.get("event") == "JOB_STATUS_CHANGE" and e.get("data", {}).get("id") == job_id
            and e["data"].get("status") in ("concluded", "null"), LIVE_TIMEOUT)
    error = None
    for job in supervisor.qmp(config, "query-jobs"):
        if job.get("id") == job_id:
            error = job.get("error")
    try:
        supervisor.qmp(config, "job-dismiss", {"id": job_id})
    except ThalunixError:
        pass
    if concluded is None:
        raise SnapshotError(f"{config.label}: QEMU's {command} of {name!r} did not finish in {LIVE_TIMEOUT:.0f} s")
    if error:
        raise SnapshotError(f"{config.label}: {command} {name!r} failed: {error}")


# -- revert ---------------------------------------------------------------------------------------------
def revert_snapshot(engine: "DirectEngine", config: VMConfig, name: str) -> dict[str, Any]:
    """Go back to a snapshot: live (``snapshot-load``) while running, offline (``qemu-img snapshot -a``) when stopped."""
    validate_snapshot_name(name)
    config = disks.reload(engine, config)
    listing = {row["name"]: row for row in list_snapshots(engine, config)["snapshots"]}
    row = listing.get(name)
    if row is not None:
        disks.refuse_if_linked(engine, config, f"revert to snapshot {name!r}")
    images = _images(engine, config)
    if row is None or not row["available"]:
        known = ", ".join(n for n, r in listing.items() if r["available"]) or "none"
        raise NotFoundError(f"{config.label} has no snapshot {name!r}; its snapshots: {known}")
    missing = [node for node, _ in images if node not in row["images"]]
    if missing:
        raise SnapshotError(f"{config.label}: snapshot {name!r} does not cover {', '.join(missing)} (added after "
                            "it was taken?); remove those disks first, or revert them by hand")
    running = disks.is_running(engine, config)
    if running:
        if not row["live"]:
            raise ConflictError(f"{config.label} is running and snapshot {name!r} has no memory state; stop the VM "
                                "first, then revert")
        _live_job(engine, config, "snapshot-load", name, images)
        note = "memory state loaded: the VM continues from that moment"
    else:
        img = disks.qemu_img(engine)
        for _, path in images:
            img.snapshot("apply", path, name)
        note = _restore_tpm(engine, config, name)
        if row["live"]:
            note += "; the disks are back but the memory state is not (the VM boots afresh); revert while it " \
                    "runs to resume where it was"
    meta = _load(engine, config)
    meta["current"] = name
    _save(engine, config, meta)
    engine.supervisor.vm_log(config, f"reverted to snapshot {name!r} ({note})")
    return {"name": name, "live": running, "note": note}


# -- delete ---------------------------------------------------------------------------------------------
def delete_snapshot(engine: "DirectEngine", config: VMConfig, name: str) -> dict[str, Any]:
    validate_snapshot_name(name)
    config = disks.reload(engine, config)
    meta = _load(engine, config)
    listing = {row["name"]: row for row in list_snapshots(engine, config)["snapshots"]}
    row = listing.get(name)
    if row is None:
        raise NotFoundError(f"{config.label} has no snapshot {name!r}; its snapshots: "
                            f"{', '.join(listing) or 'none'}")
    if not row["available"] and disks.linked_clones_of(engine, config):
        disks.refuse_if_linked(engine, config, f"delete snapshot {name!r} (it lives in the image they share)")
    images = [(node, path) for node, path in _images(engine, config) if node in row["images"]]
    if images:
        if disks.is_running(engine, config):
            _live_job(engine, config, "snapshot-delete", name, images)
        else:
            img = disks.qemu_img(engine)
            for _, path in images:
                img.snapshot("delete", path, name)
    record = meta["snapshots"].pop(name, {})
    for other in meta["snapshots"].values():
        if other.get("parent") == name:
            other["parent"] = record.get("parent")
    if meta.get("current") == name:
        meta["current"] = record.get("parent")
    _save(engine, config, meta)
    shutil.rmtree(_state_dir(engine, config, name), ignore_errors=True)
    engine.supervisor.vm_log(config, f"snapshot {name!r} deleted")
    return {"deleted": name}
