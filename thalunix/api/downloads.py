"""The download center's routes: the ISO catalog, the ISO list with statuses, local ISOs, and download jobs.

Each route is a thin call into an engine verb (``catalog``, ``isos``, ``add_iso``, ``download_iso``,
``list_downloads``, ``download``, ``pause/resume/cancel_download``, ``remove_quarantined``). Progress is not polled: every
change of a download reaches clients as a ``job.progress`` event (``kind: "download"``) on
``/api/events``. Errors leave as JSON with the field at fault (``sha256`` when the typed hash is
missing, malformed or different, ``path``, ``source``, ``catalog_id``).

:func:`add_routes` is called by :func:`thalunix.api.app.create_app`; :func:`openapi_paths` and
:func:`openapi_schemas` are merged into :func:`thalunix.api.openapi.openapi_document`.

Example::

    POST /api/downloads {"source": "debian-netinst"}      → 202 {"id": "debian-netinst-1a2b3c4d", "state": …}
    POST /api/downloads/debian-netinst-1a2b3c4d/pause      → 200 {"state": "paused", …}
    POST /api/isos {"path": "/home/me/Win11.iso", "catalog_id": "windows-11"}  → 201 {"status": "ready", …}
"""

from __future__ import annotations

import typing
from typing import Any

import bottle

from thalunix.api.app import _json_response, api, body_fields, read_body
from thalunix.api.openapi import _body, _json, _operation, _ref
from thalunix.downloads.catalog import TRUST_LEVELS
from thalunix.downloads.queue import JOB_STATES
from thalunix.engine import DirectEngine
from thalunix.errors import ValidationError

#: What each status of an ISO means to a person (the UI shows the same words).
ISO_STATUSES = ("ready", "missing", "downloading", "verifying", "quarantined")
_OPTIONAL_TEXT = typing.Optional[str]


def add_routes(app: bottle.Bottle, engine: DirectEngine) -> None:
    """Register the catalog, ISO and download routes on ``app``."""

    @app.get("/api/catalog")
    @api
    def catalog() -> Any:
        return engine.catalog()

    @app.get("/api/isos")
    @api
    def isos() -> Any:
        return engine.isos()

    @app.post("/api/isos")
    @api
    def add_iso() -> Any:
        body = body_fields(read_body(required=True), {"path": str, "sha256": _OPTIONAL_TEXT, "copy": bool,
                                                  "catalog_id": _OPTIONAL_TEXT}, ("path",), "adding an ISO")
        path = body["path"].strip()
        if not path:
            raise ValidationError("path: give the full path of the ISO file", "path")
        row = engine.add_iso(path, sha256=(body.get("sha256") or "").strip() or None, copy=body.get("copy", False),
                             catalog_id=body.get("catalog_id") or None)
        return _json_response(201, _listed(engine, row))

    @app.get("/api/downloads")
    @api
    def list_downloads() -> Any:
        return engine.list_downloads()

    @app.post("/api/downloads")
    @api
    def start_download() -> Any:
        body = body_fields(read_body(required=True), {"source": str, "sha256": _OPTIONAL_TEXT}, ("source",),
                       "a download")
        job_id = engine.download_iso(body["source"], sha256=(body.get("sha256") or "").strip() or None)
        return _json_response(202, engine.download(job_id))

    @app.get("/api/downloads/<job_id>")
    @api
    def get_download(job_id: str) -> Any:
        return engine.download(job_id)

    def action(verb: str) -> Any:
        @api
        def run(job_id: str) -> Any:
            body = read_body(required=False)
            if body:
                raise ValidationError(f"{verb} takes no body", next(iter(body)))
            return getattr(engine, f"{verb}_download")(job_id)
        run.__name__ = f"{verb}_download"
        return run

    for verb in ("pause", "resume", "cancel"):
        app.post(f"/api/downloads/<job_id>/{verb}", callback=action(verb))

    @app.delete("/api/quarantine/<job_id>")
    @api
    def remove_quarantined(job_id: str) -> Any:
        return engine.remove_quarantined(job_id)


def _listed(engine: DirectEngine, row: dict[str, Any]) -> dict[str, Any]:
    """The row of GET /api/isos for a just-added ISO (with its status, users and catalog defaults)."""
    for item in engine.isos():
        if item.get("full_path") == row.get("full_path") and item.get("exists"):
            return item
    return {**row, "path": row.get("file"), "exists": True, "used_by": []}


# -- the contract -----------------------------------------------------------------------------------------
JOB_ID = {"name": "job_id", "in": "path", "required": True, "description": "the download's id (GET /api/downloads)",
          "schema": {"type": "string", "minLength": 1}}
_TEXT = {"type": "string"}
_NULLABLE_TEXT = {"type": "string", "nullable": True}


def openapi_paths() -> dict[str, Any]:
    download_ok = _json(_ref("Download"), "The download job")
    actions = {
        f"/api/downloads/{{job_id}}/{verb}": {"post": _operation(f"{verb}_download", text, download_ok,
                                                                 parameters=[JOB_ID])}
        for verb, text in (("pause", "Pause a download; its partial file stays and resumes later"),
                           ("resume", "Resume a paused or failed download from its partial file"),
                           ("cancel", "Cancel a download and remove its partial file"))}
    return {
        "/api/catalog": {"get": _operation(
            "catalog", "The operating systems Thalunix can download (and manual ones such as Windows)",
            _json({"type": "array", "items": _ref("CatalogEntry")}, "The catalog entries"))},
        "/api/isos": {
            "get": _operation("list_isos", "ISOs with their status: ready, missing, downloading, verifying, "
                                           "quarantined (with the reason); and those VMs use",
                              _json({"type": "array", "items": _ref("ISO")}, "ISO files and downloads, by name")),
            "post": _operation("add_iso", "Register a local ISO (hashed; refused if the SHA-256 given differs)",
                               _json(_ref("ISO"), "The ISO, ready"), status="201", body=_body(_ref("IsoAdd"))),
        },
        "/api/downloads": {
            "get": _operation("list_downloads", "The downloads of this session (running, paused, finished)",
                              _json({"type": "array", "items": _ref("Download")}, "Download jobs, oldest first")),
            "post": _operation("start_download", "Download a catalog entry or a URL (a URL needs its SHA-256); "
                                                 "progress comes as job.progress events",
                               _json(_ref("Download"), "The job, queued"), status="202",
                               body=_body(_ref("DownloadRequest"))),
        },
        "/api/downloads/{job_id}": {"get": _operation("get_download", "One download job", download_ok,
                                                      parameters=[JOB_ID])},
        "/api/quarantine/{job_id}": {"delete": _operation(
            "remove_quarantined", "Delete a quarantined download (its file, evidence and reason)",
            _json({"type": "object", "required": ["removed"], "properties": {"removed": _TEXT}}, "It is gone"),
            parameters=[{**JOB_ID, "description": "the quarantined download's job id (the ISO list's job)"}])},
        **actions,
    }


def openapi_schemas() -> dict[str, Any]:
    return {
        "CatalogEntry": {"type": "object", "required": ["id", "name", "kind", "trust"], "properties": {
            "id": _TEXT, "name": _TEXT, "family": _TEXT, "version": _TEXT, "arch": _TEXT,
            "kind": {"type": "string", "enum": ["image", "manual"]},
            "trust": {"type": "string", "enum": list(TRUST_LEVELS)},
            "fingerprints": {"type": "array", "items": _TEXT},
            "keys_present": {"type": "boolean", "description": "the publisher's key is in the keyring"},
            "defaults": {"type": "object", "additionalProperties": True,
                         "description": "settings for a new VM: os, ram, disk, firmware, tpm"},
            "page": _TEXT, "instructions": _TEXT, "notes": _TEXT,
            "size": {"type": "integer", "minimum": 0, "description": "approximate download size in bytes; 0: unknown"}}},
        "ISO": {"type": "object", "required": ["name", "status", "exists", "used_by"], "properties": {
            "path": {**_NULLABLE_TEXT, "description": "stored path of the file; null while downloading or quarantined"},
            "name": _TEXT, "full_path": _TEXT, "size": {"type": "integer", "nullable": True},
            "status": {"type": "string", "enum": list(ISO_STATUSES)},
            "exists": {"type": "boolean", "description": "a usable file (status ready)"},
            "used_by": {"type": "array", "items": _TEXT},
            "trust": {**_NULLABLE_TEXT, "description": "signed, checksum only, user hash, local"},
            "catalog_id": _NULLABLE_TEXT, "catalog_name": _TEXT,
            "defaults": {"type": "object", "nullable": True, "additionalProperties": True},
            "sha256": _NULLABLE_TEXT, "signer": _NULLABLE_TEXT,
            "job": {**_NULLABLE_TEXT, "description": "the download job (downloading, verifying, quarantined)"},
            "job_state": {"type": "string", "enum": list(JOB_STATES)},
            "bytes": {"type": "integer", "nullable": True}, "total": {"type": "integer", "nullable": True},
            "reason": {**_NULLABLE_TEXT, "description": "why a download was quarantined"},
            "error": _NULLABLE_TEXT}},
        "IsoAdd": {"type": "object", "required": ["path"], "additionalProperties": False, "properties": {
            "path": {"type": "string", "minLength": 1, "description": "full path of the ISO on this computer"},
            "sha256": {**_NULLABLE_TEXT, "description": "the expected SHA-256 (64 hex digits); refused if it differs"},
            "copy": {"type": "boolean", "default": False, "description": "copy it into the data folder's isos/"},
            "catalog_id": {**_NULLABLE_TEXT, "description": "the catalog entry this file is (e.g. windows-11)"}}},
        "DownloadRequest": {"type": "object", "required": ["source"], "additionalProperties": False, "properties": {
            "source": {"type": "string", "minLength": 1, "description": "a catalog id or an http(s) URL"},
            "sha256": {**_NULLABLE_TEXT, "description": "expected SHA-256: required for a URL and for a catalog "
                                                        "entry without a published checksum"}}},
        "Download": {"type": "object", "required": ["id", "kind", "source", "state"], "properties": {
            "id": _TEXT, "kind": {"type": "string", "enum": ["download"]}, "source": _TEXT,
            "catalog_id": _NULLABLE_TEXT, "filename": _TEXT, "state": {"type": "string", "enum": list(JOB_STATES)},
            "bytes": {"type": "integer"}, "total": {"type": "integer", "nullable": True},
            "percent": {"type": "number", "nullable": True}, "rate": {"type": "number", "description": "bytes/s"},
            "eta": {"type": "number", "nullable": True, "description": "seconds left"},
            "trust": _NULLABLE_TEXT, "signer": _NULLABLE_TEXT, "message": _TEXT, "error": _NULLABLE_TEXT,
            "error_code": _NULLABLE_TEXT, "result": {"type": "object", "nullable": True, "additionalProperties": True},
            "created": _TEXT, "revision": {"type": "integer", "description": "grows with every published "
                                                          "change; of two copies of a job, keep the higher"}}},
    }


__all__ = ["ISO_STATUSES", "add_routes", "openapi_paths", "openapi_schemas"]
