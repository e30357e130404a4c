"""The OpenAPI 3.0 document of the local API, served at ``GET /api/openapi.json``.

The VM config schemas are generated from the model's dataclasses and choice lists, so the
document cannot drift from what ``vm.json`` holds; the routes are listed here by hand, next to
one another, as the contract the UI is built against.

Example::

    document = openapi_document()
    document["paths"]["/api/vms"]["post"]["requestBody"]   # CreateOptions
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, get_args, get_origin, get_type_hints

from thalunix import __version__
from thalunix.engine import LOG_KINDS, CreateOptions
from thalunix.model import (ACCELERATORS, BOOT_DEVICES, CDROM_BUSES, DISK_BUSES, DISK_FORMATS, DISPLAYS,
                            FIRMWARES, MACHINES, NIC_MODELS, NIC_MODES, OS_HINTS, TPM_MODES, VGA_MODELS, CDRom,
                            Disk, Display, Nic, PortForward, VMConfig)
from thalunix.model.network import PROTOCOLS
from thalunix.model.vm import MAX_CPUS, MIN_RAM_MIB, NAME_MAX
from thalunix.qemu.runner import STATES

#: Event types the stream carries.
EVENT_TYPES = ("vm.state", "vm.serial", "vm.log", "vm.config", "job.progress")
STOP_TIMEOUT_MAX = 3600
CONSOLE_INPUT_MAX = 64 * 1024
LOG_TAIL_MAX = 8 << 20

# Fields whose value is one of a fixed list; "" where set_defaults fills the field in.
_CHOICES: dict[tuple[type, str], tuple[str, ...]] = {
    (VMConfig, "os"): OS_HINTS, (VMConfig, "machine"): MACHINES, (VMConfig, "firmware"): FIRMWARES,
    (VMConfig, "accel"): ACCELERATORS, (VMConfig, "tpm"): TPM_MODES, (VMConfig, "boot_order"): BOOT_DEVICES,
    (Disk, "format"): ("", *DISK_FORMATS), (Disk, "bus"): ("", *DISK_BUSES), (CDRom, "bus"): ("", *CDROM_BUSES),
    (Nic, "mode"): NIC_MODES, (Nic, "model"): NIC_MODELS, (PortForward, "protocol"): PROTOCOLS,
    (Display, "kind"): DISPLAYS, (Display, "vga"): VGA_MODELS,
    (CreateOptions, "os"): OS_HINTS, (CreateOptions, "machine"): MACHINES,
    (CreateOptions, "firmware"): FIRMWARES, (CreateOptions, "accel"): ACCELERATORS,
    (CreateOptions, "tpm"): TPM_MODES, (CreateOptions, "display"): DISPLAYS,
    (CreateOptions, "disk_format"): DISK_FORMATS, (CreateOptions, "disk_bus"): DISK_BUSES,
    (CreateOptions, "boot"): BOOT_DEVICES,
}
_MODELS = (VMConfig, Disk, CDRom, Nic, PortForward, Display)
_PRIMITIVES = {str: {"type": "string"}, int: {"type": "integer"}, bool: {"type": "boolean"},
               float: {"type": "number"}}


def _schema_of_hint(hint: Any, owner: type, name: str) -> dict[str, Any]:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in get_args(hint) if option is not type(None)]
        nullable = len(options) < len(get_args(hint))
        if len(options) == 1:
            schema = _schema_of_hint(options[0], owner, name)
        else:
            schema = {"anyOf": [_schema_of_hint(option, owner, name) for option in options]}
        if not nullable:
            return schema
        schema = {**schema, "nullable": True}
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]   # OpenAPI 3.0: nullable with an enum needs null listed
        return schema
    if origin is list:
        (item,) = get_args(hint)
        return {"type": "array", "items": _schema_of_hint(item, owner, name)}
    if isinstance(hint, type) and hint in _MODELS:
        return {"$ref": f"#/components/schemas/{hint.__name__}"}
    schema = dict(_PRIMITIVES[hint])
    choices = _CHOICES.get((owner, name))
    if choices is not None:
        schema["enum"] = list(choices)
    return schema


def dataclass_properties(cls: type) -> dict[str, dict[str, Any]]:
    """JSON schemas of a dataclass's fields, with the model's choice lists as enums."""
    hints = get_type_hints(cls)
    return {field.name: _schema_of_hint(hints[field.name], cls, field.name)
            for field in dataclasses.fields(cls)}


def _required(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]


def _model_schema(cls: type) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": dataclass_properties(cls)}
    required = _required(cls)
    if required:
        schema["required"] = required
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


NAME_SCHEMA = {"type": "string", "minLength": 1, "maxLength": NAME_MAX, "pattern": r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$",
               "description": "letters, digits, space, '.', '_', '-'; not ending with a dot or space"}
ERROR = _json(_ref("Error"), "An error: its code, a message a person can act on, and the field at fault")
NAME = {"name": "name", "in": "path", "required": True, "description": "the VM's name (or id)",
        "schema": {"type": "string", "minLength": 1}}


def _operation(operation_id: str, summary: str, ok: dict[str, Any], *, status: str = "200",
               parameters: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary,
                                 "responses": {status: ok, "default": ERROR}}
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = body
    return operation


def openapi_document() -> dict[str, Any]:
    # Imported here: the route module builds on this one's helpers.
    from thalunix.api.downloads import openapi_paths as download_paths, openapi_schemas as download_schemas
    from thalunix.api.hosts import openapi_paths as host_paths, openapi_schemas as host_schemas
    from thalunix.api.disks import openapi_paths as disk_paths, openapi_schemas as disk_schemas
    from thalunix.api.network import openapi_paths as net_paths, openapi_schemas as net_schemas
    vm_ok = _json(_ref("VMDetail"), "The VM's settings and state")
    status_ok = _json(_ref("VMStatus"), "The VM's state after the action")
    create_properties = dataclass_properties(CreateOptions)
    create_properties["ram"] = {"anyOf": [{"type": "string"}, {"type": "integer"}],
                                "description": "2G, 512M, or MiB as a number"}
    if create_properties["ram"].get("nullable") or type(None) in get_args(get_type_hints(CreateOptions)["ram"]):
        create_properties["ram"]["nullable"] = True
    create_properties["disk"] = {"type": "string", "nullable": True,
                                 "description": "size of a new disk (20G) or the path of an existing image"}
    create_properties["iso"] = {"type": "string", "nullable": True, "description": "full path of an ISO file"}
    create_properties["forwards"]["items"]["description"] = "tcp:HOSTPORT:GUESTPORT"
    create_properties["name"] = NAME_SCHEMA
    create_properties["cpus"] = {"type": "integer", "minimum": 1, "maximum": MAX_CPUS, "default": 2}
    changes = {"type": "object", "properties": dataclass_properties(VMConfig), "additionalProperties": False,
               "minProperties": 1, "description": "vm.json fields to change (the VM must be stopped)"}
    for fixed in ("id", "created", "schema"):
        changes["properties"].pop(fixed)
    changes["properties"]["name"] = NAME_SCHEMA
    changes["properties"]["cpus"] = {"type": "integer", "minimum": 1, "maximum": MAX_CPUS}
    changes["properties"]["ram_mib"] = {"type": "integer", "minimum": MIN_RAM_MIB}
    action_paths = {
        f"/api/vms/{{name}}/{verb}": {"post": _operation(
            f"{verb}_vm", text, status_ok, parameters=[NAME],
            body=_body(_ref("StopOptions"), required=False) if verb == "stop" else None)}
        for verb, text in (("start", "Start the VM; returns once QEMU answers"),
                           ("stop", "Shut the VM down: ACPI power button, wait, then quit (force: quit now)"),
                           ("pause", "Pause the VM"), ("resume", "Resume a paused VM"),
                           ("reset", "Hard-reset the VM"))}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Thalunix local API", "version": __version__,
                 "description": "JSON over HTTP on 127.0.0.1 only. Every request needs the launch token "
                                "(Authorization: Bearer, or the cookie set by opening the printed link); "
                                "requests from foreign origins or hosts are refused."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"cookie": []}],
        "paths": {
            "/api/vms": {
                "get": _operation("list_vms", "Every VM with its state",
                                  _json({"type": "array", "items": _ref("VMSummary")}, "The VMs, by name")),
                "post": _operation("create_vm", "Create a VM (and its new disk)", vm_ok, status="201",
                                   body=_body(_ref("CreateOptions"))),
            },
            "/api/vms/{name}": {
                "parameters": [NAME],
                "get": _operation("get_vm", "A VM's settings and state", vm_ok),
                "patch": _operation("edit_vm", "Change a stopped VM's settings", vm_ok,
                                    body=_body(_ref("VMChanges"))),
                "delete": _operation("delete_vm", "Delete a stopped VM and its disks",
                                     _json(_ref("Deleted"), "The VM is gone"),
                                     parameters=[{"name": "keep_disks", "in": "query", "required": False,
                                                  "description": "move its disks to disks-kept/ first",
                                                  "schema": {"type": "boolean", "default": False}}]),
            },
            **action_paths,
            "/api/vms/{name}/screenshot": {"get": _operation(
                "screenshot_vm", "The VM's screen now", parameters=[NAME],
                ok={"description": "PNG image", "content": {"image/png": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}})},
            "/api/vms/{name}/console": {
                "get": _operation("read_console", "Recent serial console output",
                                  _json(_ref("ConsoleOutput"), "The last bytes of the serial console"),
                                  parameters=[NAME, {"name": "tail", "in": "query", "required": False,
                                                     "description": "at most this many bytes (from the end)",
                                                     "schema": {"type": "integer", "minimum": 0,
                                                                "maximum": 256 * 1024}}]),
                "post": _operation("type_console", "Type text into the serial line",
                                   _json(_ref("ConsoleSent"), "What was sent"), parameters=[NAME],
                                   body=_body(_ref("ConsoleInput"))),
            },
            "/api/vms/{name}/vnc": {"get": _operation(
                "vnc_vm", "Where to connect noVNC, with this start's password",
                _json(_ref("VNCInfo"), "QEMU's websocket VNC endpoint"), parameters=[NAME])},
            "/api/vms/{name}/log": {"get": _operation(
                "read_log", "The end of one of the VM's logs", _json(_ref("LogText"), "The log's last bytes"),
                parameters=[NAME, {"name": "kind", "in": "query", "required": False,
                                   "schema": {"type": "string", "enum": list(LOG_KINDS), "default": "events"}},
                            {"name": "tail", "in": "query", "required": False,
                             "schema": {"type": "integer", "minimum": 0, "maximum": LOG_TAIL_MAX}}])},
            "/api/vms/{name}/firmware": {"get": _operation(
                "get_firmware", "The VM's firmware kind and its UEFI variable store",
                _json(_ref("FirmwareInfo"), "Firmware kind, variable store (null: none stored yet)"),
                parameters=[NAME])},
            "/api/vms/{name}/firmware/reset": {"post": _operation(
                "reset_firmware", "Forget the VM's UEFI settings (boot entries, enrolled keys); the VM must be "
                                  "stopped. The next start begins from the firmware's defaults",
                _json(_ref("FirmwareReset"), "What was reset; the old store is kept as a .prev file"),
                parameters=[NAME])},
            "/api/win11-setup": {"get": _operation(
                "win11_setup", "Whether this host can emulate a TPM, and the default of the Windows 11 setup option",
                _json(_ref("Win11Setup"), "The option's default here and why"))},
            **download_paths(),
            **host_paths(),
            **disk_paths(),
            **net_paths(),
            "/api/doctor": {"get": _operation(
                "doctor", "What Thalunix found on this host (QEMU, accelerators, firmware, data folder)",
                _json({"type": "object", "additionalProperties": True}, "The doctor's report"))},
            "/api/events": {"get": _operation(
                "events", "Server-sent events: " + ", ".join(EVENT_TYPES) + "; a comment every 15 s",
                {"description": "An endless text/event-stream; each event's data is a JSON object with "
                                "type, time and vm (the VM id) where it applies",
                 "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                parameters=[{"name": "types", "in": "query", "required": False,
                             "description": "comma-separated event types to receive (default: all)",
                             "schema": {"type": "string"}},
                            {"name": "vm", "in": "query", "required": False,
                             "description": "only this VM's events (name or id)", "schema": {"type": "string"}}])},
            "/api/openapi.json": {"get": _operation(
                "openapi", "This document", _json({"type": "object"}, "The OpenAPI document"))},
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "the token made at launch"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "thalunix_PORT",
                           "description": "set by opening the printed link once (?token=…)"},
            },
            "schemas": {
                **{cls.__name__: _model_schema(cls) for cls in _MODELS},
                "Error": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string", "description": "a short code: invalid, not-found, conflict, "
                                                               "locked, unauthorized, internal, …"},
                    "message": {"type": "string"}, "field": {"type": "string", "nullable": True}}},
                "VMSummary": {"type": "object", "required": ["id", "name", "state"], "properties": {
                    "id": {"type": "string"}, "name": {"type": "string", "nullable": True},
                    "state": {"type": "string", "enum": [*STATES, "broken"]},
                    "os": {"type": "string"}, "cpus": {"type": "integer"}, "ram_mib": {"type": "integer"},
                    "firmware": {"type": "string"}, "error": {"type": "string", "nullable": True}}},
                "VMStatus": {"type": "object", "required": ["state"], "properties": {
                    "state": {"type": "string", "enum": list(STATES)},
                    "pid": {"type": "integer", "nullable": True}, "accel": {"type": "string", "nullable": True},
                    "started_at": {"type": "string", "nullable": True},
                    "websocket_port": {"type": "integer", "nullable": True},
                    "attached": {"type": "boolean"}, "last_exit": {"type": "object"},
                    "tpm": {"type": "object", "nullable": True, "description": "the TPM backend a running VM uses",
                            "properties": {"backend": {"type": "string", "enum": ["native", "helper"]},
                                           "detail": {"type": "string"}}}}},
                "VMDetail": {"allOf": [_ref("VMConfig"), {"type": "object", "required": ["state", "status"],
                                                          "properties": {
                    "state": {"type": "string", "enum": list(STATES)}, "status": _ref("VMStatus"),
                    "folder": {"type": "string"}}}]},
                "VMChanges": changes,
                "CreateOptions": {"type": "object", "required": ["name"], "additionalProperties": False,
                                  "properties": create_properties},
                "StopOptions": {"type": "object", "additionalProperties": False, "properties": {
                    "force": {"type": "boolean", "default": False},
                    "timeout": {"type": "number", "exclusiveMinimum": True, "minimum": 0,
                                "maximum": STOP_TIMEOUT_MAX, "default": 60}}},
                "ConsoleOutput": {"type": "object", "required": ["text"], "properties": {
                    "text": {"type": "string"}, "size": {"type": "integer"}}},
                "ConsoleInput": {"type": "object", "required": ["data"], "additionalProperties": False,
                                 "properties": {"data": {"type": "string", "maxLength": CONSOLE_INPUT_MAX}}},
                "ConsoleSent": {"type": "object", "required": ["sent"], "properties": {"sent": {"type": "integer"}}},
                "VNCInfo": {"type": "object", "required": ["websocket_port", "password", "host"], "properties": {
                    "websocket_port": {"type": "integer"}, "password": {"type": "string"},
                    "host": {"type": "string", "enum": ["127.0.0.1"]}}},
                "LogText": {"type": "object", "required": ["kind", "text"], "properties": {
                    "kind": {"type": "string", "enum": list(LOG_KINDS)}, "text": {"type": "string"}}},
                "FirmwareInfo": {"type": "object", "required": ["vm", "firmware", "vars"], "properties": {
                    "vm": {"type": "string"}, "firmware": {"type": "string", "enum": list(FIRMWARES)},
                    "description": {"type": "string"}, "secure_boot": {"type": "boolean"},
                    "backup": {"type": "boolean", "description": "a previous store is kept as vars.qcow2.prev"},
                    "reset_command": {"type": "string"},
                    "vars": {"type": "object", "nullable": True, "properties": {
                        "path": {"type": "string"}, "size": {"type": "integer"}, "modified": {"type": "string"},
                        "template": {"type": "string"}, "made_for": {"type": "string"},
                        "current": {"type": "boolean"}}}}},
                "FirmwareReset": {"type": "object", "required": ["vm", "reset", "note"], "properties": {
                    "vm": {"type": "string"}, "reset": {"type": "boolean"},
                    "backup": {"type": "string", "nullable": True}, "note": {"type": "string"}}},
                "Win11Setup": {"type": "object", "required": ["tpm_emulation", "default"], "properties": {
                    "tpm_emulation": {"type": "boolean"}, "reason": {"type": "string"},
                    "default": {"type": "boolean"}, "about": {"type": "string"},
                    "keys": {"type": "array", "items": {"type": "string"}}}},
                **download_schemas(),
                **host_schemas(),
                **disk_schemas(),
                **net_schemas(),
                "Deleted": {"type": "object", "required": ["deleted"], "properties": {"deleted": {"type": "string"}}},
            },
        },
    }
