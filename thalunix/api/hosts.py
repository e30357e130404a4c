"""The libvirt hosts' routes: the host list, and the VM routes again under ``/api/hosts/{host}/vms/…``.

``GET /api/hosts`` asks every host in parallel (each connect in its own thread, with a timeout) and answers
each host's VMs or its connection error with the cause (``unreachable``, ``authentication``, ``permission``,
``no-qemu``, ``missing``): one host that hangs never holds up the others. The portable folder's own VMs stay at
``/api/vms/…`` as before. Moves run as jobs (``job.progress`` events, kind ``vm.move``).

:func:`add_routes` is called by :func:`thalunix.api.app.create_app`; :func:`openapi_paths` and
:func:`openapi_schemas` are merged into :func:`thalunix.api.openapi.openapi_document`.

Example::

    POST /api/hosts {"name": "lab", "uri": "qemu+ssh://root@lab/system"}   → 201 {"name": "lab", …}
    GET  /api/hosts                      → [{"name": "lab", "state": "connected", "vms": […]}, …]
    POST /api/hosts/lab/vms/web/start    → {"state": "running", "host": "lab", …}
    POST /api/vms/web/move {"to": "lab"} → 202 {"id": "…", "kind": "vm.move", "state": "running", …}
    POST /api/hosts/lab/vms/web/move {}  → 202 … back into the portable folder
"""

from __future__ import annotations

import typing
from dataclasses import asdict
from typing import Any

import bottle

from thalunix.api.app import (VM_VERBS, _json_response, _query_bool, api, body_fields, create_options, read_body,
                              run_verb)
from thalunix.api.openapi import NAME, NAME_SCHEMA, _body, _json, _operation, _ref
from thalunix.engine import DirectEngine
from thalunix.errors import ValidationError
from thalunix.libvirt.hosts import CAUSES, HostManager

HOST = {"name": "host", "in": "path", "required": True, "description": "the host's name (`GET /api/hosts`)",
        "schema": {"type": "string", "minLength": 1, "maxLength": 32, "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"}}
SNAPSHOT = {"name": "snapshot", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1,
                                                                          "maxLength": 64}}
URI_PATTERN = r"^qemu(\+(ssh|tcp|tls|unix|libssh|libssh2|ext))?://\S*$"


def add_routes(app: bottle.Bottle, engine: DirectEngine) -> HostManager:
    """Register the host routes on ``app``; the :class:`HostManager` holds one connection per host."""
    manager = HostManager(engine.data, engine.bus)

    @app.get("/api/hosts")
    @api
    def list_hosts() -> Any:
        return manager.overview()

    @app.post("/api/hosts")
    @api
    def add_host() -> Any:
        body = body_fields(read_body(required=True), {"name": str, "uri": str, "network": typing.Optional[str],
                                                  "pool": typing.Optional[str]}, ("name", "uri"), "a host")
        host = manager.hosts.add(body["name"], body["uri"], network=body.get("network"), pool=body.get("pool"))
        return _json_response(201, asdict(host))

    @app.delete("/api/hosts/<host>")
    @api
    def remove_host(host: str) -> Any:
        removed = manager.hosts.remove(host)
        manager.forget(removed.name)
        return {"removed": removed.name}

    @app.get("/api/hosts/<host>/vms")
    @api
    def host_vms(host: str) -> Any:
        return manager.engine(host).list()

    @app.post("/api/hosts/<host>/vms")
    @api
    def host_create(host: str) -> Any:
        options = create_options(read_body(required=True))
        target = manager.engine(host)
        config = target.create(options)
        return _json_response(201, target.describe(config.id))

    @app.get("/api/hosts/<host>/vms/<name>")
    @api
    def host_vm(host: str, name: str) -> Any:
        return manager.engine(host).describe(name)

    @app.route("/api/hosts/<host>/vms/<name>", method="PATCH")
    @api
    def host_edit(host: str, name: str) -> Any:
        changes = read_body(required=True)
        if not changes:
            raise ValidationError("nothing to change; send the vm.json fields to change")
        target = manager.engine(host)
        return target.describe(target.edit(name, changes).id)

    @app.delete("/api/hosts/<host>/vms/<name>")
    @api
    def host_delete(host: str, name: str) -> Any:
        target = manager.engine(host)
        config = target.get(name)
        target.delete(config.id, keep_disks=_query_bool("keep_disks"))
        return {"deleted": config.name}

    def action(verb: str) -> Any:
        @api
        def run(host: str, name: str) -> Any:
            return run_verb(manager.engine(host), verb, name, read_body(required=False))
        run.__name__ = f"host_{verb}_vm"
        return run

    for verb in VM_VERBS:
        app.post(f"/api/hosts/<host>/vms/<name>/{verb}", callback=action(verb))

    @app.get("/api/hosts/<host>/vms/<name>/screenshot")
    @api
    def host_screenshot(host: str, name: str) -> Any:
        return bottle.HTTPResponse(manager.engine(host).screenshot(name), 200,
                                   {"Content-Type": "image/png", "Cache-Control": "no-store"})

    @app.get("/api/hosts/<host>/vms/<name>/console")
    @api
    def host_console(host: str, name: str) -> Any:
        data = manager.engine(host).serial_output(name)[-64 * 1024:]
        return {"text": data.decode("utf-8", errors="replace"), "size": len(data)}

    @app.post("/api/hosts/<host>/vms/<name>/console")
    @api
    def host_type(host: str, name: str) -> Any:
        text = body_fields(read_body(required=True), {"data": str}, ("data",), "console input")["data"]
        payload = text.encode("utf-8", errors="replace")
        manager.engine(host).send_serial(name, payload)
        return {"sent": len(payload)}

    @app.get("/api/hosts/<host>/vms/<name>/vnc")
    @api
    def host_vnc(host: str, name: str) -> Any:
        return manager.engine(host).vnc_info(name)

    @app.get("/api/hosts/<host>/vms/<name>/snapshots")
    @api
    def host_snapshots(host: str, name: str) -> Any:
        return manager.engine(host).snapshots(name)

    @app.post("/api/hosts/<host>/vms/<name>/snapshots")
    @api
    def host_snapshot(host: str, name: str) -> Any:
        body = body_fields(read_body(required=True), {"name": str, "description": str, "live": typing.Optional[bool]},
                       ("name",), "a snapshot")
        row = manager.engine(host).snapshot_create(name, body["name"], description=body.get("description", ""),
                                                   live=body.get("live"))
        return _json_response(201, row)

    @app.post("/api/hosts/<host>/vms/<name>/snapshots/<snapshot>/revert")
    @api
    def host_revert(host: str, name: str, snapshot: str) -> Any:
        return manager.engine(host).snapshot_revert(name, snapshot)

    @app.delete("/api/hosts/<host>/vms/<name>/snapshots/<snapshot>")
    @api
    def host_snapshot_delete(host: str, name: str, snapshot: str) -> Any:
        return manager.engine(host).snapshot_delete(name, snapshot)

    @app.post("/api/hosts/<host>/vms/<name>/move")
    @api
    def move_home(host: str, name: str) -> Any:
        from thalunix.libvirt.move import move_to_local
        body = body_fields(read_body(required=False), {"keep_source": bool}, (), "a move")
        job = move_to_local(manager.engine(host), name, engine, keep_source=body.get("keep_source", False))
        return _json_response(202, job)

    @app.post("/api/vms/<name>/move")
    @api
    def move_away(name: str) -> Any:
        from thalunix.libvirt.move import move_to_host
        body = body_fields(read_body(required=True), {"to": str, "keep_source": bool}, ("to",), "a move")
        job = move_to_host(engine, name, manager.engine(body["to"]), keep_source=body.get("keep_source", False))
        return _json_response(202, job)

    return manager


def openapi_paths() -> dict[str, Any]:
    vm = [HOST, NAME]
    status_ok = _json(_ref("VMStatus"), "The VM's state after the action")
    job_ok = _json({"type": "object", "additionalProperties": True}, "The move job (progress as job.progress events)")
    actions = {f"/api/hosts/{{host}}/vms/{{name}}/{verb}": {"post": _operation(
        f"host_{verb}_vm", f"{verb.capitalize()} a VM on a libvirt host", status_ok, parameters=vm,
        body=_body(_ref("StopOptions"), required=False) if verb == "stop" else None)}
        for verb in ("start", "stop", "pause", "resume", "reset")}
    return {
        "/api/hosts": {
            "get": _operation("list_hosts", "Every libvirt host with its VMs, or its connection error and cause "
                                            "(hosts are asked in parallel, each with a timeout)",
                              _json({"type": "array", "items": _ref("HostOverview")}, "The hosts")),
            "post": _operation("add_host", "Add a libvirt host to the list (nothing is connected yet)",
                               _json(_ref("Host"), "The host"), status="201", body=_body(_ref("HostAdd"))),
        },
        "/api/hosts/{host}": {"delete": _operation(
            "remove_host", "Take a host off the list (its VMs stay on it)",
            _json({"type": "object", "properties": {"removed": {"type": "string"}}}, "Removed"), parameters=[HOST])},
        "/api/hosts/{host}/vms": {
            "parameters": [HOST],
            "get": _operation("host_list_vms", "The host's VMs (also those other tools defined)",
                              _json({"type": "array", "items": _ref("VMSummary")}, "The VMs, by name")),
            "post": _operation("host_create_vm", "Create a VM on the host (its disk a volume in the host's pool)",
                               _json(_ref("VMDetail"), "The VM"), status="201", body=_body(_ref("CreateOptions"))),
        },
        "/api/hosts/{host}/vms/{name}": {
            "parameters": vm,
            "get": _operation("host_get_vm", "A VM's settings and state; `xml` and `unmodeled` show what Thalunix "
                                             "keeps but does not model", _json(_ref("VMDetail"), "The VM")),
            "patch": _operation("host_edit_vm", "Change a stopped VM's settings (its XML edited in place)",
                                _json(_ref("VMDetail"), "The VM"), body=_body(_ref("VMChanges"))),
            "delete": _operation("host_delete_vm", "Delete a stopped VM and the volumes Thalunix made for it",
                                 _json(_ref("Deleted"), "The VM is gone"),
                                 parameters=[{"name": "keep_disks", "in": "query", "required": False,
                                              "schema": {"type": "boolean", "default": False}}]),
        },
        **actions,
        "/api/hosts/{host}/vms/{name}/screenshot": {"get": _operation(
            "host_screenshot_vm", "The VM's screen now", parameters=vm,
            ok={"description": "PNG image", "content": {"image/png": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}})},
        "/api/hosts/{host}/vms/{name}/console": {
            "parameters": vm,
            "get": _operation("host_read_console", "Recent serial console output (libvirt console stream)",
                              _json(_ref("ConsoleOutput"), "The last bytes of the serial console")),
            "post": _operation("host_type_console", "Type text into the serial line",
                               _json(_ref("ConsoleSent"), "What was sent"), body=_body(_ref("ConsoleInput"))),
        },
        "/api/hosts/{host}/vms/{name}/vnc": {"get": _operation(
            "host_vnc_vm", "Where the VM's VNC websocket is (on the host's loopback; a tunnel for remote hosts)",
            _json({"type": "object", "additionalProperties": True}, "The VNC endpoint"), parameters=vm)},
        "/api/hosts/{host}/vms/{name}/snapshots": {
            "parameters": vm,
            "get": _operation("host_list_snapshots", "The VM's libvirt snapshots",
                              _json({"type": "object", "additionalProperties": True}, "The snapshots")),
            "post": _operation("host_create_snapshot", "Take a snapshot (with memory when the VM runs)",
                               _json({"type": "object", "additionalProperties": True}, "The snapshot"),
                               status="201", body=_body(_ref("HostSnapshot"))),
        },
        "/api/hosts/{host}/vms/{name}/snapshots/{snapshot}/revert": {"post": _operation(
            "host_revert_snapshot", "Revert to a snapshot",
            _json({"type": "object", "additionalProperties": True}, "Reverted"), parameters=[*vm, SNAPSHOT])},
        "/api/hosts/{host}/vms/{name}/snapshots/{snapshot}": {"delete": _operation(
            "host_delete_snapshot", "Delete a snapshot",
            _json({"type": "object", "additionalProperties": True}, "Deleted"), parameters=[*vm, SNAPSHOT])},
        "/api/hosts/{host}/vms/{name}/move": {"post": _operation(
            "move_vm_home", "Move a stopped VM from the host into the portable folder (disks downloaded, "
                            "checksums compared; the host's copy goes only after)", job_ok, status="202",
            parameters=vm, body=_body(_ref("MoveHome"), required=False))},
        "/api/vms/{name}/move": {"post": _operation(
            "move_vm", "Move a stopped portable VM to a libvirt host (disks uploaded as volumes, checksums "
                       "compared; the portable copy goes only after)", job_ok, status="202", parameters=[NAME],
            body=_body(_ref("MoveAway")))},
    }


def openapi_schemas() -> dict[str, Any]:
    host = {"name": {"type": "string", "pattern": HOST["schema"]["pattern"], "minLength": 1, "maxLength": 32},
            "uri": {"type": "string", "pattern": URI_PATTERN, "description": "qemu:///system, qemu+ssh://user@h/system"},
            "network": {"type": "string", "nullable": True, "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"},
            "pool": {"type": "string", "nullable": True, "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"}}
    return {
        "Host": {"type": "object", "required": ["name", "uri"], "properties": host},
        "HostAdd": {"type": "object", "required": ["name", "uri"], "additionalProperties": False, "properties": host},
        "HostOverview": {"type": "object", "required": ["name", "uri", "state"], "properties": {
            **host, "state": {"type": "string", "enum": ["connected", "error", "connecting"]},
            "vms": {"type": "array", "items": _ref("VMSummary")},
            "error": {"type": "string", "nullable": True},
            "cause": {"type": "string", "nullable": True, "enum": [*CAUSES, None]},
            "version": {"type": "object", "additionalProperties": True}}},
        "HostSnapshot": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64}, "description": {"type": "string"},
            "live": {"type": "boolean", "nullable": True}}},
        "MoveAway": {"type": "object", "required": ["to"], "additionalProperties": False, "properties": {
            "to": {"type": "string", "description": "a host name"}, "keep_source": {"type": "boolean"}}},
        "MoveHome": {"type": "object", "additionalProperties": False, "properties": {"keep_source": {"type": "boolean"}}},
    }


__all__ = ["add_routes", "openapi_paths", "openapi_schemas", "NAME_SCHEMA"]
