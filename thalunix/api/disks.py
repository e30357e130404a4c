"""The routes for a VM's disks, snapshots, clones, export/import, and the long-operation jobs behind them.

Each route is a thin call into an engine verb (``disks``, ``disk_add``/``remove``/``resize``/``convert``/
``check``, ``snapshots``, ``snapshot_create``/``revert``/``delete``, ``clone``, ``export``, ``import_vm``,
``jobs_list``, ``job``, ``job_cancel``). Long operations (convert, clone, export, import) answer ``202``
with the job at once; their progress reaches clients as ``job.progress`` events on ``/api/events``
(kinds ``disk.convert``, ``vm.clone``, ``vm.export``, ``vm.import``), never by polling.

Paths come from the user's own computer (the API listens on 127.0.0.1 behind the launch token), so
export may write into any folder the user picks, but: a path must be absolute (the server's working
folder means nothing to a person), must not hold control characters or over-long names, and an
export never lands inside the data folder's own working areas (``vms/``, ``tmp/``, the runtime and
caches), where Thalunix itself would trip over it. Errors leave as JSON with the ``field`` at fault.

:func:`add_routes` is called by :func:`thalunix.api.app.create_app`; :func:`openapi_paths` and
:func:`openapi_schemas` are merged into :func:`thalunix.api.openapi.openapi_document`.

Example::

    POST /api/vms/web/snapshots {"name": "before-upgrade", "description": "clean"}   → 201 {"name": …}
    POST /api/vms/web/clone {"name": "web-2", "linked": true, "tpm": "fresh"}      → 202 {"id": …, "kind": "vm.clone"}
    POST /api/vms/web/export {"file": "/home/me/web.7z"}                            → 202 {"id": …, "kind": "vm.export"}
    POST /api/jobs/3f2a…/cancel                                                     → 200 {"state": "running", …}
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import bottle

from thalunix.api.app import _json_response, _query_bool, api, body_fields, read_body
from thalunix.api.openapi import NAME, NAME_SCHEMA, _body, _json, _operation, _ref
from thalunix.engine import DirectEngine
from thalunix.errors import ValidationError
from thalunix.jobs import JOB_STATES
from thalunix.model import DISK_BUSES, DISK_FORMATS, validate_name

#: The names a snapshot may have: the library's rule (thalunix.snapshots) as one pattern; a test keeps them equal.
SNAPSHOT_PATTERN = r"^(?![0-9]+$)[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
DESCRIPTION_MAX = 1000
PATH_MAX = 4096
#: One folder or file name; longer ones make the OS fail with ENAMETOOLONG.
PATH_PART_MAX = 255
REPAIRS = ("leaks", "all")
TPM_CHOICES = ("fresh", "copy")
_OPTIONAL_TEXT = typing.Optional[str]


def user_path(text: str, field: str, what: str) -> Path:
    """A path typed or picked by the user: absolute, printable, of lengths the OS takes; normalised."""
    text = text.strip()
    if not text:
        raise ValidationError(f"{field}: give the full path of {what}", field)
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise ValidationError(f"{field}: the path of {what} holds a control character; type it again", field)
    if len(text) > PATH_MAX or any(len(part) > PATH_PART_MAX for part in Path(text).parts):
        raise ValidationError(f"{field}: the path of {what} is too long for this system (at most {PATH_MAX} "
                              f"characters, {PATH_PART_MAX} per name)", field)
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise ValidationError(f"{field}: {text!r} is not a full path; give the whole path of {what}, starting at "
                              f"{'a drive letter' if os.name == 'nt' else '/'}", field)
    return Path(os.path.normpath(path))


def _internal_folders(engine: DirectEngine) -> list[Path]:
    """Where the data folder keeps what Thalunix itself manages; an export is never written there."""
    data = engine.data
    return [Path(os.path.realpath(folder)) for folder in
            (data.vms_dir, data.tmp_dir, data.runtime_dir, data.cache_dir, data.downloads_dir)]


def export_target(engine: DirectEngine, text: str) -> Path:
    """Where an export may be written: a new ``.7z`` file in an existing folder outside the data folder's internals."""
    path = user_path(text, "file", "the export file")
    if path.suffix.lower() != ".7z":
        raise ValidationError(f"file: {path.name!r} must end in .7z (an export is one 7z archive)", "file")
    folder = Path(os.path.realpath(path.parent))
    for internal in _internal_folders(engine):
        if folder == internal or internal in folder.parents:
            raise ValidationError(f"file: {path.parent} is one of the folders Thalunix manages itself ({internal}); "
                                  "pick another folder for the export, such as your home folder or "
                                  f"{engine.data.root}", "file")
    return path


def snapshot_support(engine: DirectEngine, name: str) -> dict[str, Any] | None:
    """Why the VM cannot take snapshots now (raw disks, and the convert that fixes it), or None when it can."""
    config = engine.get(name)
    raw = [disk for disk in config.disks if not disk.readonly and disk.format != "qcow2"]
    if not raw:
        return None
    names = ", ".join(f"{disk.id} ({Path(disk.path).name})" for disk in raw)
    return {"reason": "raw", "disks": [disk.id for disk in raw],
            "message": f"{'Disks' if len(raw) > 1 else 'Disk'} {names} {'are' if len(raw) > 1 else 'is'} raw, which "
                       "cannot hold snapshots; convert to qcow2 first"}


def add_routes(app: bottle.Bottle, engine: DirectEngine) -> None:
    """Register the disk, snapshot, clone, export/import and job routes on ``app``."""

    # -- disks ----------------------------------------------------------------------------------------
    @app.get("/api/vms/<name>/disks")
    @api
    def list_disks(name: str) -> Any:
        return engine.disks(name)

    @app.post("/api/vms/<name>/disks")
    @api
    def add_disk(name: str) -> Any:
        body = body_fields(read_body(required=True), {"size": str, "path": str, "format": str, "bus": str,
                                                  "readonly": bool}, (), "adding a disk")
        if "size" in body and "path" in body:
            raise ValidationError("give either size (a new empty disk) or path (an existing image), not both", "path")
        if "size" not in body and "path" not in body:
            raise ValidationError("size: give the size of a new empty disk (e.g. 8G), or the path of an existing "
                                  "image", "size")
        for key, choices in (("format", DISK_FORMATS), ("bus", DISK_BUSES)):
            if key in body and body[key] not in choices:
                raise ValidationError(f"{key}: {body[key]!r} is unknown; choose one of {', '.join(choices)}", key)
        path = str(user_path(body["path"], "path", "the disk image")) if "path" in body else None
        if path is not None and not Path(path).is_file():
            raise ValidationError(f"path: {path} is not a file on this computer; check the path", "path")
        row = engine.disk_add(name, size=body.get("size"), path=path, format=body.get("format", "qcow2"),
                              bus=body.get("bus", "virtio"), readonly=body.get("readonly", False))
        return _json_response(201, row)

    @app.delete("/api/vms/<name>/disks/<disk>")
    @api
    def remove_disk(name: str, disk: str) -> Any:
        return engine.disk_remove(name, disk, delete_file=_query_bool("delete_file"))

    @app.post("/api/vms/<name>/disks/<disk>/resize")
    @api
    def resize_disk(name: str, disk: str) -> Any:
        body = body_fields(read_body(required=True), {"size": str, "force_shrink": bool}, ("size",), "a resize")
        return engine.disk_resize(name, disk, body["size"], force_shrink=body.get("force_shrink", False))

    @app.post("/api/vms/<name>/disks/<disk>/convert")
    @api
    def convert_disk(name: str, disk: str) -> Any:
        body = body_fields(read_body(required=True), {"format": str}, ("format",), "a convert")
        return _json_response(202, engine.disk_convert(name, disk, body["format"]))

    @app.post("/api/vms/<name>/disks/<disk>/check")
    @api
    def check_disk(name: str, disk: str) -> Any:
        body = body_fields(read_body(required=False), {"repair": _OPTIONAL_TEXT}, (), "a check")
        repair = body.get("repair")
        if repair is not None and repair not in REPAIRS:
            raise ValidationError(f"repair: {repair!r} is not a repair mode; choose leaks or all (or leave it out "
                                  "to only check)", "repair")
        return engine.disk_check(name, disk, repair=repair)

    # -- snapshots ------------------------------------------------------------------------------------
    @app.get("/api/vms/<name>/snapshots")
    @api
    def list_snapshots(name: str) -> Any:
        return {**engine.snapshots(name), "unsupported": snapshot_support(engine, name)}

    @app.post("/api/vms/<name>/snapshots")
    @api
    def create_snapshot(name: str) -> Any:
        body = body_fields(read_body(required=True), {"name": str, "description": str, "live": typing.Optional[bool]},
                       ("name",), "a snapshot")
        description = body.get("description", "")
        if len(description) > DESCRIPTION_MAX:
            raise ValidationError(f"description: at most {DESCRIPTION_MAX} characters", "description")
        return _json_response(201, engine.snapshot_create(name, body["name"], description=description,
                                                          live=body.get("live")))

    @app.post("/api/vms/<name>/snapshots/<snapshot>/revert")
    @api
    def revert_snapshot(name: str, snapshot: str) -> Any:
        if read_body(required=False):
            raise ValidationError("revert takes no body")
        return engine.snapshot_revert(name, snapshot)

    @app.delete("/api/vms/<name>/snapshots/<snapshot>")
    @api
    def delete_snapshot(name: str, snapshot: str) -> Any:
        return engine.snapshot_delete(name, snapshot)

    # -- clone, export, import ------------------------------------------------------------------------
    @app.post("/api/vms/<name>/clone")
    @api
    def clone_vm(name: str) -> Any:
        body = body_fields(read_body(required=True), {"name": str, "linked": bool, "tpm": str}, ("name",), "a clone")
        tpm = body.get("tpm", "fresh")
        if tpm not in TPM_CHOICES:
            raise ValidationError(f"tpm: {tpm!r}; choose fresh (a new, empty TPM) or copy (the source's TPM state)",
                                  "tpm")
        return _json_response(202, engine.clone(name, body["name"], linked=body.get("linked", False), tpm=tpm))

    @app.post("/api/vms/<name>/export")
    @api
    def export_vm(name: str) -> Any:
        body = body_fields(read_body(required=True), {"file": str}, ("file",), "an export")
        return _json_response(202, engine.export(name, str(export_target(engine, body["file"]))))

    @app.post("/api/import")
    @api
    def import_vm() -> Any:
        body = body_fields(read_body(required=True), {"file": str, "name": _OPTIONAL_TEXT}, ("file",), "an import")
        path = user_path(body["file"], "file", "the export file")
        if not path.is_file():
            raise ValidationError(f"file: {path} is not a file on this computer; check the path", "file")
        name = body.get("name")
        if name is not None:
            validate_name(name)   # here, not in the job: a bad name is the request's fault, refused at once
        return _json_response(202, engine.import_vm(str(path), name=name))

    @app.get("/api/folders")
    @api
    def folders() -> Any:
        home = Path.home()
        return {"home": str(home), "data": str(engine.data.root), "export": str(home), "separator": os.sep}

    # -- jobs -----------------------------------------------------------------------------------------
    @app.get("/api/jobs")
    @api
    def list_jobs() -> Any:
        return engine.jobs_list()

    @app.get("/api/jobs/<job_id>")
    @api
    def get_job(job_id: str) -> Any:
        return engine.job(job_id)

    @app.post("/api/jobs/<job_id>/cancel")
    @api
    def cancel_job(job_id: str) -> Any:
        if read_body(required=False):
            raise ValidationError("cancel takes no body")
        return engine.job_cancel(job_id)


# -- the contract -----------------------------------------------------------------------------------------
DISK = {"name": "disk", "in": "path", "required": True, "description": "the disk's id (disk0) or file name",
        "schema": {"type": "string", "minLength": 1}}
SNAPSHOT = {"name": "snapshot", "in": "path", "required": True, "description": "the snapshot's name",
            "schema": {"type": "string", "minLength": 1}}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "description": "the job's id (GET /api/jobs)",
          "schema": {"type": "string", "minLength": 1}}
_TEXT = {"type": "string"}
_NULLABLE_TEXT = {"type": "string", "nullable": True}
_OBJECT = {"type": "object", "additionalProperties": True}


def openapi_paths() -> dict[str, Any]:
    job_accepted = _json(_ref("Job"), "The job, running: progress comes as job.progress events")
    disk_ok = _json(_ref("DiskInfo"), "The disk, as listed")
    vm_disk = [NAME, DISK]
    return {
        "/api/vms/{name}/disks": {
            "parameters": [NAME],
            "get": _operation("list_disks", "The VM's disks: file, size, allocation, format, bus, snapshots",
                              _json({"type": "array", "items": _ref("DiskInfo")}, "The disks, in boot order")),
            "post": _operation("add_disk", "Add a new empty disk (size) or an existing image (path); plugged in "
                                           "at once while the VM runs", disk_ok, status="201",
                               body=_body(_ref("DiskAdd"))),
        },
        "/api/vms/{name}/disks/{disk}": {"delete": _operation(
            "remove_disk", "Take a disk off the VM (unplugged while it runs); delete_file also erases an image in "
                           "the VM's folder",
            _json(_ref("DiskRemoved"), "The disk is off the VM"),
            parameters=[*vm_disk, {"name": "delete_file", "in": "query", "required": False,
                                   "description": "also delete the image (only one in the VM's own folder)",
                                   "schema": {"type": "boolean", "default": False}}])},
        "/api/vms/{name}/disks/{disk}/resize": {"post": _operation(
            "resize_disk", "Grow a disk (also while the VM runs); shrinking is refused unless force_shrink, and "
                           "only while stopped", _json(_ref("DiskResized"), "The disk at its new size"),
            parameters=vm_disk, body=_body(_ref("DiskResize")))},
        "/api/vms/{name}/disks/{disk}/convert": {"post": _operation(
            "convert_disk", "Convert a stopped VM's disk between raw and qcow2 (a job; the old image goes once the "
                            "new one is in place)", job_accepted, status="202", parameters=vm_disk,
            body=_body(_ref("DiskConvert")))},
        "/api/vms/{name}/disks/{disk}/check": {"post": _operation(
            "check_disk", "qemu-img check of a stopped VM's qcow2 disk, optionally repairing leaks or all",
            _json(_ref("DiskCheck"), "The check's report"), parameters=vm_disk,
            body=_body(_ref("DiskCheckOptions"), required=False))},
        "/api/vms/{name}/snapshots": {
            "parameters": [NAME],
            "get": _operation("list_snapshots", "The VM's snapshots as a list and as a tree (name, description, "
                                                "date, size, with or without memory state)",
                              _json(_ref("SnapshotListing"), "The snapshots")),
            "post": _operation("create_snapshot", "Take a snapshot: with memory state while the VM runs (live), "
                                                  "disks only while it is stopped",
                               _json(_ref("SnapshotTaken"), "The snapshot"), status="201",
                               body=_body(_ref("SnapshotCreate"))),
        },
        "/api/vms/{name}/snapshots/{snapshot}/revert": {"post": _operation(
            "revert_snapshot", "Go back to a snapshot (live while running, if it has memory state)",
            _json(_ref("SnapshotReverted"), "The VM is back at the snapshot"), parameters=[NAME, SNAPSHOT])},
        "/api/vms/{name}/snapshots/{snapshot}": {"delete": _operation(
            "delete_snapshot", "Delete a snapshot (its children move up to its parent)",
            _json({"type": "object", "required": ["deleted"], "properties": {"deleted": _TEXT}}, "It is gone"),
            parameters=[NAME, SNAPSHOT])},
        "/api/vms/{name}/clone": {"post": _operation(
            "clone_vm", "Clone a stopped VM: full copy, or linked (qcow2 overlays on its disks); new id and MACs, "
                        "a fresh or copied TPM", job_accepted, status="202", parameters=[NAME],
            body=_body(_ref("CloneRequest")))},
        "/api/vms/{name}/export": {"post": _operation(
            "export_vm", "Write a stopped VM to one .7z file in a folder the user picks", job_accepted, status="202",
            parameters=[NAME], body=_body(_ref("ExportRequest")))},
        "/api/import": {"post": _operation(
            "import_vm", "Import a .7z export as a new VM (every file checked against its manifest first; renamed "
                         "when the name is taken)", job_accepted, status="202", body=_body(_ref("ImportRequest")))},
        "/api/folders": {"get": _operation(
            "folders", "Folders to offer in file fields: the user's home, the data folder, where exports go by "
                       "default", _json(_ref("Folders"), "The folders"))},
        "/api/jobs": {"get": _operation(
            "list_jobs", "Long operations of this session (running and recently finished)",
            _json({"type": "array", "items": _ref("Job")}, "The jobs, oldest first"))},
        "/api/jobs/{job_id}": {"get": _operation("get_job", "One job, with its result or error when finished",
                                                 _json(_ref("Job"), "The job"), parameters=[JOB_ID])},
        "/api/jobs/{job_id}/cancel": {"post": _operation(
            "cancel_job", "Cancel a running job: it stops at its next step and removes what it made",
            _json(_ref("Job"), "The job (its state turns cancelled shortly, with a job.progress event)"),
            parameters=[JOB_ID])},
    }


def openapi_schemas() -> dict[str, Any]:
    size_text = {"type": "string", "minLength": 1, "description": "a size with a unit: 512M, 20G, 1T"}
    path_text = {"type": "string", "minLength": 1, "maxLength": PATH_MAX,
                 "description": "a full path on this computer"}
    snapshot_row = {
        "name": _TEXT, "description": _TEXT, "created": _NULLABLE_TEXT, "parent": _NULLABLE_TEXT,
        "live": {"type": "boolean", "description": "holds the memory state (taken while running)"},
        "size": {"type": "integer", "minimum": 0, "description": "bytes of memory and TPM state it keeps"},
        "images": {"type": "array", "items": _TEXT, "description": "disks (and fw-vars) that hold it"},
        "available": {"type": "boolean", "description": "false: kept in metadata but in no image the VM uses now"},
        "current": {"type": "boolean", "description": "the VM's disks descend from this snapshot"}}
    return {
        "DiskInfo": {"type": "object", "required": ["id", "path", "format", "bus", "file", "exists"], "properties": {
            "id": _TEXT, "path": {"type": "string", "description": "as stored in vm.json"},
            "format": {"type": "string", "enum": list(DISK_FORMATS)}, "bus": {"type": "string", "enum": list(DISK_BUSES)},
            "readonly": {"type": "boolean"}, "file": {"type": "string", "description": "the image's full path"},
            "exists": {"type": "boolean"},
            "virtual_size": {"type": "integer", "nullable": True, "description": "bytes the guest sees"},
            "actual_size": {"type": "integer", "nullable": True, "description": "bytes used on the host"},
            "size": {"type": "string", "description": "virtual size in words (8 GiB)"},
            "detected_format": _NULLABLE_TEXT,
            "backing_file": {**_NULLABLE_TEXT, "description": "set for a linked clone's or a source's overlay"},
            "snapshots": {"type": "array", "items": _TEXT}, "error": _TEXT}},
        "DiskAdd": {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
            "size": {**size_text, "description": "size of a new empty disk (8G); give this or path"},
            "path": {**path_text, "description": "an existing image to attach; give this or size"},
            "format": {"type": "string", "enum": list(DISK_FORMATS), "default": "qcow2",
                       "description": "format of a new disk"},
            "bus": {"type": "string", "enum": list(DISK_BUSES), "default": "virtio",
                    "description": "while running only virtio, scsi and nvme can be plugged in"},
            "readonly": {"type": "boolean", "default": False}}},
        "DiskRemoved": {"type": "object", "required": ["removed", "file_deleted"], "properties": {
            "removed": _TEXT, "path": _TEXT, "file_deleted": {"type": "boolean"}}},
        "DiskResize": {"type": "object", "required": ["size"], "additionalProperties": False, "properties": {
            "size": {**size_text, "description": "the new size (20G); smaller than now only with force_shrink"},
            "force_shrink": {"type": "boolean", "default": False,
                             "description": "cut the disk's end off (the guest must have shrunk its partitions)"}}},
        "DiskResized": {"allOf": [_ref("DiskInfo"), {"type": "object", "required": ["changed"], "properties": {
            "changed": {"type": "boolean"}, "previous_size": {"type": "integer"}}}]},
        "DiskConvert": {"type": "object", "required": ["format"], "additionalProperties": False, "properties": {
            "format": {"type": "string", "enum": list(DISK_FORMATS)}}},
        "DiskCheckOptions": {"type": "object", "additionalProperties": False, "properties": {
            "repair": {"type": "string", "nullable": True, "enum": [*REPAIRS, None],
                       "description": "leave out to only check"}}},
        "DiskCheck": {"type": "object", "required": ["disk", "clean", "report"], "properties": {
            "disk": _TEXT, "clean": {"type": "boolean"}, "report": _OBJECT,
            "allocated": {"type": "integer", "nullable": True}}},
        "SnapshotRow": {"type": "object", "required": ["name", "live", "available", "current"],
                        "properties": snapshot_row},
        "SnapshotNode": {"type": "object", "required": ["name", "children"], "properties": {
            **snapshot_row, "children": {"type": "array", "items": _ref("SnapshotNode")}}},
        "SnapshotListing": {"type": "object", "required": ["vm", "snapshots", "tree"], "properties": {
            "vm": _TEXT, "current": _NULLABLE_TEXT,
            "snapshots": {"type": "array", "items": _ref("SnapshotRow")},
            "tree": {"type": "array", "items": _ref("SnapshotNode")},
            "unsupported": {"type": "object", "nullable": True, "description": "why no snapshot can be taken now",
                            "properties": {"reason": _TEXT, "disks": {"type": "array", "items": _TEXT},
                                           "message": _TEXT}}}},
        "SnapshotCreate": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "pattern": SNAPSHOT_PATTERN, "description":
                     "letters, digits, '.', '_', '-' (up to 63; starting with a letter or digit; not only digits)"},
            "description": {"type": "string", "maxLength": DESCRIPTION_MAX},
            "live": {"type": "boolean", "nullable": True,
                     "description": "null: live when the VM runs, else offline; true demands a running VM"}}},
        "SnapshotTaken": {"type": "object", "required": ["name", "live"], "properties": {
            "name": _TEXT, "live": {"type": "boolean"}, "parent": _NULLABLE_TEXT,
            "images": {"type": "array", "items": _TEXT}, "note": _TEXT}},
        "SnapshotReverted": {"type": "object", "required": ["name", "live", "note"], "properties": {
            "name": _TEXT, "live": {"type": "boolean"}, "note": _TEXT}},
        "CloneRequest": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
            "name": {**NAME_SCHEMA, "description": "the clone's name"},
            "linked": {"type": "boolean", "default": False,
                       "description": "qcow2 overlays on the source's disks (fast, small; the source then cannot "
                                      "be deleted while the clone exists)"},
            "tpm": {"type": "string", "enum": list(TPM_CHOICES), "default": "fresh"}}},
        "ExportRequest": {"type": "object", "required": ["file"], "additionalProperties": False, "properties": {
            "file": {**path_text, "description": "full path of the new .7z file (its folder must exist; not inside "
                                                 "the data folder's vms/, tmp/, runtime or caches)"}}},
        "ImportRequest": {"type": "object", "required": ["file"], "additionalProperties": False, "properties": {
            "file": {**path_text, "description": "full path of a .7z made by export"},
            "name": {**NAME_SCHEMA, "nullable": True, "description": "the new VM's name (default: the exported "
                                                                    "one, renamed if taken)"}}},
        "Folders": {"type": "object", "required": ["home", "data", "export", "separator"], "properties": {
            "home": _TEXT, "data": _TEXT, "export": _TEXT, "separator": {"type": "string", "enum": ["/", "\\"]}}},
        "Job": {"type": "object", "required": ["id", "kind", "state", "percent"], "properties": {
            "id": _TEXT, "kind": _TEXT, "vm": _NULLABLE_TEXT, "vm_name": _NULLABLE_TEXT, "title": _TEXT,
            "state": {"type": "string", "enum": list(JOB_STATES)},
            "percent": {"type": "number", "minimum": 0, "maximum": 100}, "message": _TEXT,
            "result": {"description": "what the job made, once done (null before)"},
            "error": _NULLABLE_TEXT, "error_code": _NULLABLE_TEXT, "created": _TEXT,
            "finished": _NULLABLE_TEXT}},
    }


__all__ = ["add_routes", "openapi_paths", "openapi_schemas", "export_target", "user_path"]
