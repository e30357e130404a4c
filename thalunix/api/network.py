"""Routes for networks, USB, the guest agent and the shared folder: thin calls into the engine's verbs.

``/api/networks`` (custom private networks), ``/api/vms/{name}/nics`` and ``…/forwards`` (cards and port
forwards), ``/api/usb`` (the host's USB devices), ``/api/vms/{name}/usb`` (hot-plug), ``…/agent`` (guest
agent facts), ``…/copy-in`` and ``…/copy-out`` (jobs with ``job.progress`` events), ``…/share``.

:func:`add_routes` is called by :func:`thalunix.api.app.create_app`; :func:`openapi_paths` and
:func:`openapi_schemas` are merged into the OpenAPI document.

Example::

    POST /api/networks {"name": "lab"}                                   → 201 {"name": "lab", ...}
    POST /api/vms/web/nics {"mode": "private", "network": "lab"}         → 201 [{"card": 1, ...}, {"card": 2, ...}]
    POST /api/vms/web/forwards {"spec": "tcp:8080:80"}                   → 200 [...]
    POST /api/vms/web/usb {"device": "0781:5567", "remember": true}      → 200 {"device": "0781:5567", ...}
    POST /api/vms/web/copy-in {"host_file": "/tmp/a", "guest_path": "/root/a"}   → 202 {"id": ..., "state": ...}
"""

from __future__ import annotations

import typing
from typing import Any

import bottle

from thalunix.api.app import _json_response, _query_bool, _query_int, api, body_fields, read_body
from thalunix.api.openapi import NAME, _body, _json, _operation, _ref
from thalunix.engine import DirectEngine
from thalunix.errors import ValidationError
from thalunix.model import NIC_MODELS, NIC_MODES

_TEXT_OR_NULL = typing.Optional[str]


def add_routes(app: bottle.Bottle, engine: DirectEngine) -> None:
    @app.get("/api/networks")
    @api
    def networks() -> Any:
        return engine.networks()

    @app.post("/api/networks")
    @api
    def create_network() -> Any:
        body = body_fields(read_body(True), {"name": str, "description": str}, ("name",), "a network")
        return _json_response(201, engine.network_create(body["name"], body.get("description", "")))

    @app.delete("/api/networks/<network>")
    @api
    def delete_network(network: str) -> Any:
        engine.network_delete(network)
        return {"deleted": network}

    @app.get("/api/vms/<name>/nics")
    @api
    def nics(name: str) -> Any:
        return engine.nics(name)

    @app.post("/api/vms/<name>/nics")
    @api
    def add_nic(name: str) -> Any:
        body = body_fields(read_body(True), {"mode": str, "model": str, "network": str, "bridge": str, "tap": str,
                                         "mac": str, "forwards": list[str]}, (), "a network card")
        return _json_response(201, engine.nic_add(name, **body))

    @app.delete("/api/vms/<name>/nics/<card>")
    @api
    def remove_nic(name: str, card: str) -> Any:
        if not card.isdigit():
            raise ValidationError(f"card: {card!r} is not a card number (1 is the first)", "card")
        return engine.nic_remove(name, int(card))

    @app.post("/api/vms/<name>/forwards")
    @api
    def add_forward(name: str) -> Any:
        body = body_fields(read_body(True), {"spec": str, "card": int}, ("spec",), "a port forward")
        return engine.forward_add(name, body["spec"], body.get("card", 1))

    @app.delete("/api/vms/<name>/forwards")
    @api
    def remove_forward(name: str) -> Any:
        spec = bottle.request.query.get("spec") or ""
        if not spec:
            raise ValidationError("spec: give the forward's host port (?spec=tcp:8080)", "spec")
        card = _query_int("card", 0, 64)
        return engine.forward_remove(name, spec, card or None)

    @app.get("/api/usb")
    @api
    def usb_host() -> Any:
        return engine.usb_host_devices()

    @app.get("/api/vms/<name>/usb")
    @api
    def usb_list(name: str) -> Any:
        return engine.usb_devices(name)

    @app.post("/api/vms/<name>/usb")
    @api
    def usb_attach(name: str) -> Any:
        body = body_fields(read_body(True), {"device": str, "remember": bool}, ("device",), "plugging in a USB device")
        return engine.usb_attach(name, body["device"], remember=body.get("remember", False))

    @app.delete("/api/vms/<name>/usb/<device>")
    @api
    def usb_detach(name: str, device: str) -> Any:
        return engine.usb_detach(name, device, forget=not _query_bool("keep"))

    @app.get("/api/vms/<name>/agent")
    @api
    def agent_info(name: str) -> Any:
        return engine.agent_info(name)

    @app.post("/api/vms/<name>/copy-in")
    @api
    def copy_in(name: str) -> Any:
        body = body_fields(read_body(True), {"host_file": str, "guest_path": str}, ("host_file", "guest_path"),
                       "copying into the guest")
        return _json_response(202, engine.copy_in(name, body["host_file"], body["guest_path"]))

    @app.post("/api/vms/<name>/copy-out")
    @api
    def copy_out(name: str) -> Any:
        body = body_fields(read_body(True), {"guest_path": str, "host_file": str}, ("guest_path", "host_file"),
                       "copying out of the guest")
        return _json_response(202, engine.copy_out(name, body["guest_path"], body["host_file"]))

    @app.get("/api/vms/<name>/share")
    @api
    def share(name: str) -> Any:
        return engine.share_info(name)

    @app.put("/api/vms/<name>/share")
    @api
    def set_share(name: str) -> Any:
        body = body_fields(read_body(True), {"folder": _TEXT_OR_NULL}, ("folder",), "a shared folder")
        return engine.share_set(name, body["folder"] or None)


def openapi_paths() -> dict[str, Any]:
    nics_ok = _json({"type": "array", "items": _ref("NicRow")}, "The VM's network cards")
    job_ok = _json({"type": "object", "description": "the copy job (progress as job.progress events)"},
                   "The job, running")
    network = {"name": "network", "in": "path", "required": True, "description": "the network's name",
               "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"}}
    share_ok = _json(_ref("Share"), "The VM's shared folder")
    return {
        "/api/networks": {
            "get": _operation("list_networks", "Custom private networks, their VMs and switches",
                              _json({"type": "array", "items": _ref("Network")}, "The networks")),
            "post": _operation("create_network", "Define a private network VMs can join (no admin rights)",
                               _json(_ref("Network"), "The network"), status="201", body=_body(_ref("NetworkNew"))),
        },
        "/api/networks/{network}": {"delete": _operation(
            "delete_network", "Delete a network no VM uses", _json({"type": "object"}, "Deleted"),
            parameters=[network])},
        "/api/vms/{name}/nics": {
            "get": _operation("list_nics", "The VM's network cards", nics_ok, parameters=[NAME]),
            "post": _operation("add_nic", "Add a network card (the VM must be stopped)", nics_ok, status="201",
                               parameters=[NAME], body=_body(_ref("NicNew"))),
        },
        "/api/vms/{name}/nics/{card}": {"delete": _operation(
            "remove_nic", "Remove network card CARD (1 is the first)", nics_ok,
            parameters=[NAME, {"name": "card", "in": "path", "required": True,
                               "schema": {"type": "integer", "minimum": 1}}])},
        "/api/vms/{name}/forwards": {
            "post": _operation("add_forward", "Forward a host port (127.0.0.1 unless an address is given)", nics_ok,
                               parameters=[NAME], body=_body(_ref("ForwardNew"))),
            "delete": _operation("remove_forward", "Remove the forward of a host port", nics_ok, parameters=[
                NAME, {"name": "spec", "in": "query", "required": True, "schema": {"type": "string"},
                       "description": "the host port: 8080, tcp:8080 or the full spec"},
                {"name": "card", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}]),
        },
        "/api/usb": {"get": _operation("host_usb", "USB devices plugged into this host",
                                       _json({"type": "array", "items": _ref("UsbDevice")}, "The devices"))},
        "/api/vms/{name}/usb": {
            "get": _operation("vm_usb", "USB devices of the VM (plugged in, remembered)",
                              _json({"type": "array", "items": {"type": "object"}}, "The devices"),
                              parameters=[NAME]),
            "post": _operation("usb_attach", "Plug a host USB device (vendor:product) or usb-kbd/usb-mouse into "
                                             "the running VM", _json({"type": "object"}, "Plugged in"),
                               parameters=[NAME], body=_body(_ref("UsbAttach"))),
        },
        "/api/vms/{name}/usb/{device}": {"delete": _operation(
            "usb_detach", "Unplug a USB device (and forget it unless keep=true)", _json({"type": "object"}, "Done"),
            parameters=[NAME, {"name": "device", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "keep", "in": "query", "required": False, "schema": {"type": "boolean"}}])},
        "/api/vms/{name}/agent": {"get": _operation(
            "agent_info", "What the guest agent reports: OS, host name, interfaces and IP addresses",
            _json(_ref("AgentInfo"), "The guest's facts"), parameters=[NAME])},
        "/api/vms/{name}/copy-in": {"post": _operation(
            "copy_in", "Copy a host file into the guest through the guest agent (a job; SHA-256 checked)", job_ok,
            status="202", parameters=[NAME], body=_body(_ref("CopyIn")))},
        "/api/vms/{name}/copy-out": {"post": _operation(
            "copy_out", "Copy a guest file to the host through the guest agent (a job; SHA-256 checked)", job_ok,
            status="202", parameters=[NAME], body=_body(_ref("CopyOut")))},
        "/api/vms/{name}/share": {
            "get": _operation("get_share", "The VM's shared folder", share_ok, parameters=[NAME]),
            "put": _operation("set_share", "Share a host folder with the VM (null: none); at the next start",
                              share_ok, parameters=[NAME], body=_body(_ref("ShareSet"))),
        },
    }


def openapi_schemas() -> dict[str, Any]:
    text = {"type": "string"}
    return {
        "Network": {"type": "object", "properties": {
            "name": text, "description": text, "created": text, "vms": {"type": "array", "items": text},
            "switch": {"type": "object", "properties": {"running": {"type": "boolean"},
                                                        "port": {"type": "integer", "nullable": True},
                                                        "pid": {"type": "integer", "nullable": True}}}}},
        "NetworkNew": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"},
            "description": {"type": "string", "maxLength": 200}}},
        "NicRow": {"type": "object", "properties": {
            "card": {"type": "integer"}, "mode": {"type": "string", "enum": list(NIC_MODES)},
            "model": {"type": "string", "enum": list(NIC_MODELS)}, "mac": text, "network": text, "bridge": text,
            "tap": text, "target": text, "forwards": {"type": "array", "items": text}}},
        "NicNew": {"type": "object", "additionalProperties": False, "properties": {
            "mode": {"type": "string", "enum": list(NIC_MODES)}, "model": {"type": "string", "enum": list(NIC_MODELS)},
            "network": text, "bridge": text, "tap": text, "mac": text,
            "forwards": {"type": "array", "items": {"type": "string", "description": "tcp:HOSTPORT:GUESTPORT"}}}},
        "ForwardNew": {"type": "object", "required": ["spec"], "additionalProperties": False, "properties": {
            "spec": {"type": "string", "description": "[tcp|udp:][HOSTADDR:]HOSTPORT:GUESTPORT"},
            "card": {"type": "integer", "minimum": 1}}},
        "UsbDevice": {"type": "object", "properties": {
            "id": {"type": "string", "description": "vendor:product"}, "vendor_id": text, "product_id": text,
            "manufacturer": text, "product": text, "serial": text, "bus": {"type": "integer", "nullable": True},
            "address": {"type": "integer", "nullable": True}, "port": text, "speed": text, "class": text,
            "node": text}},
        "UsbAttach": {"type": "object", "required": ["device"], "additionalProperties": False, "properties": {
            "device": {"type": "string", "description": "vendor:product, usb-kbd, usb-mouse or usb-tablet"},
            "remember": {"type": "boolean"}}},
        "AgentInfo": {"type": "object", "properties": {
            "vm": text, "agent": {"type": "boolean"}, "agent_version": text, "os": {"type": "object"},
            "hostname": {"type": "string", "nullable": True}, "ips": {"type": "array", "items": text},
            "interfaces": {"type": "array", "items": {"type": "object"}}, "commands": {"type": "array", "items": text}}},
        "CopyIn": {"type": "object", "required": ["host_file", "guest_path"], "additionalProperties": False,
                   "properties": {"host_file": text, "guest_path": text}},
        "CopyOut": {"type": "object", "required": ["guest_path", "host_file"], "additionalProperties": False,
                    "properties": {"guest_path": text, "host_file": text}},
        "Share": {"type": "object", "properties": {
            "vm": text, "folder": {"type": "string", "nullable": True},
            "guest_url": {"type": "string", "nullable": True}, "serving": {"type": "boolean"},
            "requests": {"type": "integer"}}},
        "ShareSet": {"type": "object", "required": ["folder"], "additionalProperties": False,
                     "properties": {"folder": {"type": "string", "nullable": True}}},
    }
