"""The routes of the local API (bottle): JSON over the engine's verbs, the event stream, the UI's files.

Every route is a thin call into :class:`thalunix.engine.Engine`. Errors leave as JSON
``{"error": code, "message": text, "field": name}`` with the status the error class names
(:attr:`ThalunixError.http_status`); anything unexpected is logged with its traceback and
answered with a generic 500, never a traceback. The contract is in :mod:`thalunix.api.openapi`.

Example::

    app = create_app(engine, closing=threading.Event())
    # served by thalunix.api.server.ApiServer behind thalunix.api.security.Guard
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, get_args, get_origin, get_type_hints

import bottle

from thalunix.api.openapi import (CONSOLE_INPUT_MAX, EVENT_TYPES, LOG_TAIL_MAX, STOP_TIMEOUT_MAX,
                                  openapi_document)
from thalunix.engine import CreateOptions, DirectEngine
from thalunix.errors import ThalunixError, ValidationError

log = logging.getLogger("thalunix.api")

BODY_MAX = 1 << 20
CONSOLE_TAIL_DEFAULT = 64 * 1024
HEARTBEAT_SECONDS = 15.0
#: Where the UI lives in a checkout (a frozen build passes its own folder).
# $THALUNIX_WEB: the portable exe serves the copy in its unpacked runtime (set by thalunix.bundle.prepare).
DEFAULT_WEB_ROOT = Path(os.environ.get("THALUNIX_WEB") or Path(__file__).resolve().parent.parent.parent / "web")

PLACEHOLDER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Thalunix</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
 header { background: #1d2330; color: #fff; padding: 14px 24px; font-size: 20px; }
 main { padding: 20px 24px; }
 table { border-collapse: collapse; background: #fff; min-width: 420px; }
 th, td { text-align: left; padding: 8px 14px; border-bottom: 1px solid #e3e6eb; }
 .state { font-weight: 600; } .running { color: #0a7d32; } .stopped { color: #666; } .crashed { color: #b3261e; }
 p.note { color: #555; }
</style></head>
<body><header>Thalunix</header><main>
<p class="note">The Thalunix interface is not installed in this build (no <code>web/index.html</code>);
the API is up: <a href="/api/openapi.json">/api/openapi.json</a>.</p>
<table><thead><tr><th>VM</th><th>State</th><th>CPUs</th><th>RAM</th></tr></thead>
<tbody id="vms"><tr><td colspan="4">Loading…</td></tr></tbody></table>
<script>
async function refresh() {
  const rows = await (await fetch('/api/vms')).json();
  const body = document.getElementById('vms');
  body.innerHTML = '';
  if (!rows.length) body.innerHTML = '<tr><td colspan="4">No VMs yet.</td></tr>';
  for (const vm of rows) {
    const tr = document.createElement('tr');
    for (const [text, cls] of [[vm.name || vm.id, ''], [vm.state, 'state ' + vm.state],
                               [vm.cpus ?? '', ''], [vm.ram_mib ? vm.ram_mib + ' MiB' : '', '']]) {
      const td = document.createElement('td'); td.textContent = text; td.className = cls; tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}
refresh();
const events = new EventSource('/api/events?types=vm.state,vm.config');
events.addEventListener('vm.state', refresh);
events.addEventListener('vm.config', refresh);
</script></main></body></html>
"""


class BodyError(ValidationError):
    """The request body is not what the route takes."""


class UnsupportedMediaError(ThalunixError):
    code = "unsupported-media-type"
    http_status = 415


class TooLargeError(ThalunixError):
    code = "too-large"
    http_status = 413


def _json_response(status: int, payload: Any) -> bottle.HTTPResponse:
    body = json.dumps(payload)
    return bottle.HTTPResponse(body, status, {"Content-Type": "application/json", "Cache-Control": "no-store"})


def error_payload(error: ThalunixError) -> dict[str, Any]:
    return {"error": error.code, "message": str(error), "field": getattr(error, "field", None)}


def api(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Run a route; its result is the JSON answer; errors become JSON with their status."""
    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = handler(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except ThalunixError as error:
            return _json_response(error.http_status, error_payload(error))
        except Exception:  # noqa: BLE001 - the one place that turns a bug into a clean 500
            log.exception("unexpected error in %s %s", bottle.request.method, bottle.request.path)
            return _json_response(500, {"error": "internal", "field": None,
                                        "message": "Thalunix hit an unexpected error; it is logged. Try again, "
                                                   "and report it with the log if it persists"})
        if isinstance(result, (bottle.HTTPResponse, types.GeneratorType)):
            return result
        return _json_response(200, result)
    return wrapper


def read_body(required: bool) -> dict[str, Any]:
    """The request's JSON object; ``{}`` for an empty body where that is allowed."""
    request = bottle.request
    if request.content_length > BODY_MAX:
        raise TooLargeError(f"the request body is {request.content_length} bytes; at most {BODY_MAX} are taken")
    raw = request.body.read(BODY_MAX + 1)
    if len(raw) > BODY_MAX:
        raise TooLargeError(f"the request body is over {BODY_MAX} bytes")
    if not raw.strip():
        if required:
            raise BodyError("the request needs a JSON object as its body")
        return {}
    if request.content_type.split(";")[0].strip().lower() != "application/json":
        # A form post from another page cannot send this type without a CORS preflight: one more CSRF wall.
        raise UnsupportedMediaError("send the body as JSON with 'Content-Type: application/json'")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise BodyError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise BodyError(f"the request body must be a JSON object, not {type(data).__name__}")
    return data


_TYPE_WORDS = {str: "a string", int: "a whole number", bool: "true or false", float: "a number",
               type(None): "null"}


def body_fields(body: dict[str, Any], allowed: dict[str, Any], required: tuple[str, ...],
                what: str) -> dict[str, Any]:
    """``body`` checked against ``allowed`` (name → type hint): no unknown field, each of its type.

    Example::

        fields = body_fields(read_body(True), {"name": str, "force": bool}, ("name",), "a clone")
    """
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ValidationError(f"unknown field {unknown[0]!r}; {what} takes {', '.join(allowed)}", unknown[0])
    for name in required:
        if name not in body:
            raise ValidationError(f"{name}: {what} needs it", name)
    return {name: _check_type(value, allowed[name], name) for name, value in body.items()}


VM_VERBS = ("start", "stop", "pause", "resume", "reset")


def run_verb(engine: Any, verb: str, name: str, body: dict[str, Any]) -> Any:
    """One of :data:`VM_VERBS` on a VM of ``engine`` (the local one or a libvirt host's), body checked first.

    ``stop`` takes ``{"force": bool, "timeout": seconds}``; the others take no body. Returns the VM's status.
    """
    if verb == "stop":
        fields = body_fields(body, {"force": bool, "timeout": typing.Union[int, float]}, (), "stop")
        timeout = fields.get("timeout", 60)
        if not (math.isfinite(timeout) and 0 < timeout <= STOP_TIMEOUT_MAX):
            raise ValidationError(f"timeout: give seconds above 0, at most {STOP_TIMEOUT_MAX}", "timeout")
        return engine.stop(name, force=fields.get("force", False), timeout=float(timeout))
    if body:
        raise ValidationError(f"{verb} takes no body", next(iter(body)))
    if verb == "start":
        return engine.start(name)
    getattr(engine, verb)(name)
    return engine.status(name)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _check_type(value, option, where)
            except ValidationError:
                continue
        wanted = " or ".join(_TYPE_WORDS.get(option, "a list") for option in get_args(hint))
        raise ValidationError(f"{where}: expected {wanted}, got {json.dumps(value)[:60]}", where)
    if origin is list:
        if not isinstance(value, list):
            raise ValidationError(f"{where}: expected a list, got {json.dumps(value)[:60]}", where)
        (item,) = get_args(hint)
        return [_check_type(entry, item, f"{where}[{index}]") for index, entry in enumerate(value)]
    if hint is type(None):
        if value is None:
            return None
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ValidationError(f"{where}: expected {_TYPE_WORDS.get(hint, hint)}, got {json.dumps(value)[:60]}", where)


def create_options(body: dict[str, Any]) -> CreateOptions:
    """A POST /api/vms body, checked field by field against :class:`CreateOptions`."""
    hints = get_type_hints(CreateOptions)
    known = {field.name for field in dataclasses.fields(CreateOptions)}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ValidationError(f"unknown field {unknown[0]!r}; known fields are {', '.join(sorted(known))}",
                              unknown[0])
    if "name" not in body:
        raise ValidationError("name: a VM needs a name", "name")
    fields = {key: _check_type(value, hints[key], key) for key, value in body.items()}
    return CreateOptions(**fields)


def _query_int(name: str, default: int, maximum: int) -> int:
    text = bottle.request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValidationError(f"{name}: {text!r} is not a whole number", name) from None
    if not 0 <= value <= maximum:
        raise ValidationError(f"{name}: {value} is out of range (0-{maximum})", name)
    return value


def _query_bool(name: str) -> bool:
    text = (bottle.request.query.get(name) or "").lower()
    if text in ("", "false", "0", "no"):
        return False
    if text in ("true", "1", "yes"):
        return True
    raise ValidationError(f"{name}: {text!r} is not true or false", name)


def create_app(engine: DirectEngine, closing: threading.Event, web_root: Path | None = None,
               heartbeat: float = HEARTBEAT_SECONDS) -> bottle.Bottle:
    """The bottle app over ``engine``; ``closing`` ends every event stream when the server stops."""
    app = bottle.Bottle(catchall=True)
    app.config["json.enable"] = False   # answers are JSON-encoded here, errors included
    web = Path(web_root) if web_root else DEFAULT_WEB_ROOT
    document = openapi_document()

    def default_error(res: bottle.HTTPError) -> str:
        # bottle's own refusals (no such route, wrong method) and anything that slipped past @api.
        if res.traceback:
            log.error("unexpected error in %s %s:\n%s", bottle.request.method, bottle.request.path, res.traceback)
        bottle.response.content_type = "application/json"
        bottle.response.set_header("Cache-Control", "no-store")
        status = res.status_code
        code = {404: "not-found", 405: "method-not-allowed", 413: "too-large"}.get(status, "internal"
                                                                                   if status >= 500 else "invalid")
        message = {404: f"there is no {bottle.request.path} here; see /api/openapi.json for the routes",
                   405: f"{bottle.request.method} is not allowed on {bottle.request.path}"}.get(
            status, "Thalunix hit an unexpected error; it is logged" if status >= 500 else str(res.body))
        return json.dumps({"error": code, "message": message, "field": None})

    app.default_error_handler = default_error  # type: ignore[method-assign]

    # -- VMs ------------------------------------------------------------------------------------------
    @app.get("/api/vms")
    @api
    def list_vms() -> Any:
        return engine.list()

    @app.post("/api/vms")
    @api
    def create_vm() -> Any:
        config = engine.create(create_options(read_body(required=True)))
        return _json_response(201, engine.describe(config.id))

    @app.get("/api/vms/<name>")
    @api
    def get_vm(name: str) -> Any:
        return engine.describe(name)

    @app.route("/api/vms/<name>", method="PATCH")
    @api
    def edit_vm(name: str) -> Any:
        changes = read_body(required=True)
        if not changes:
            raise BodyError("nothing to change; send the vm.json fields to change")
        config = engine.edit(name, changes)
        return engine.describe(config.id)

    @app.delete("/api/vms/<name>")
    @api
    def delete_vm(name: str) -> Any:
        config = engine.get(name)
        engine.delete(config.id, keep_disks=_query_bool("keep_disks"))
        return {"deleted": config.name}

    def action(verb: str) -> Callable[[str], Any]:
        @api
        def run(name: str) -> Any:
            return run_verb(engine, verb, name, read_body(required=False))
        run.__name__ = f"{verb}_vm"
        return run

    for verb in VM_VERBS:
        app.post(f"/api/vms/<name>/{verb}", callback=action(verb))

    @app.get("/api/vms/<name>/screenshot")
    @api
    def screenshot(name: str) -> Any:
        return bottle.HTTPResponse(engine.screenshot(name), 200,
                                   {"Content-Type": "image/png", "Cache-Control": "no-store"})

    @app.get("/api/vms/<name>/console")
    @api
    def read_console(name: str) -> Any:
        tail = _query_int("tail", CONSOLE_TAIL_DEFAULT, 256 * 1024)
        data = engine.serial_output(name)
        data = data[len(data) - tail:] if tail else b""
        return {"text": data.decode("utf-8", errors="replace"), "size": len(data)}

    @app.post("/api/vms/<name>/console")
    @api
    def type_console(name: str) -> Any:
        body = read_body(required=True)
        unknown = sorted(set(body) - {"data"})
        if unknown:
            raise ValidationError(f"unknown field {unknown[0]!r}; send {{\"data\": \"text\"}}", unknown[0])
        text = _check_type(body.get("data"), str, "data")
        if len(text) > CONSOLE_INPUT_MAX:
            raise ValidationError(f"data: at most {CONSOLE_INPUT_MAX} characters at a time", "data")
        payload = text.encode("utf-8", errors="replace")
        engine.send_serial(name, payload)
        return {"sent": len(payload)}

    @app.get("/api/vms/<name>/vnc")
    @api
    def vnc(name: str) -> Any:
        return engine.vnc_info(name)

    @app.get("/api/vms/<name>/log")
    @api
    def read_log(name: str) -> Any:
        kind = bottle.request.query.get("kind") or "events"
        tail = _query_int("tail", 1 << 20, LOG_TAIL_MAX)
        return {"kind": kind, "text": engine.read_log(name, kind, tail)}

    @app.get("/api/vms/<name>/firmware")
    @api
    def get_firmware(name: str) -> Any:
        return engine.firmware(name)

    @app.post("/api/vms/<name>/firmware/reset")
    @api
    def reset_firmware(name: str) -> Any:
        if read_body(required=False):
            raise ValidationError("firmware reset takes no body")
        return engine.firmware_reset(name)

    @app.get("/api/win11-setup")
    @api
    def win11_setup() -> Any:
        return engine.win11_setup_info()

    # -- the rest ---------------------------------------------------------------------------------------
    from thalunix.api import downloads   # catalog, ISOs, downloads (it imports this module's helpers)
    downloads.add_routes(app, engine)
    from thalunix.api import hosts   # libvirt hosts: /api/hosts, /api/hosts/{host}/vms/…, /api/vms/{name}/move
    hosts.add_routes(app, engine)
    from thalunix.api import disks   # disks, snapshots, clone, export/import, jobs
    disks.add_routes(app, engine)
    from thalunix.api import network   # custom networks, cards, forwards, USB, guest agent, shared folder
    network.add_routes(app, engine)

    @app.get("/api/doctor")
    @api
    def doctor() -> Any:
        from thalunix.doctor import diagnose
        return diagnose(engine)

    @app.get("/api/openapi.json")
    @api
    def openapi() -> Any:
        return document

    @app.get("/api/events")
    @api
    def events() -> Any:
        wanted = {part.strip() for part in (bottle.request.query.get("types") or "").split(",") if part.strip()}
        unknown = sorted(wanted - set(EVENT_TYPES))
        if unknown:
            raise ValidationError(f"types: {unknown[0]!r} is not an event type; choose from "
                                  f"{', '.join(EVENT_TYPES)}", "types")
        types_wanted = wanted or set(EVENT_TYPES)
        only_vm = bottle.request.query.get("vm")
        vm_id = engine.get(only_vm).id if only_vm else None
        bottle.response.content_type = "text/event-stream; charset=utf-8"
        bottle.response.set_header("Cache-Control", "no-store")
        bottle.response.set_header("X-Accel-Buffering", "no")
        return _stream(engine, closing, types_wanted, vm_id, heartbeat)

    # -- the UI's files ---------------------------------------------------------------------------------
    @app.get("/")
    def index() -> Any:
        page = web / "index.html"
        if page.is_file():
            return _static(page.name, web)
        bottle.response.content_type = "text/html; charset=utf-8"
        bottle.response.set_header("Cache-Control", "no-store")
        return PLACEHOLDER_PAGE

    @app.get("/vendor/<path:path>")
    def vendor(path: str) -> Any:
        return _static(path, web / "node_modules")

    # Not under /api/: an unknown API path must answer 404 (or 405 with the right Allow), not a file lookup.
    @app.get("/<path:re:(?!api/).*>")
    def static(path: str) -> Any:
        return _static(path, web)

    return app


#: The UI's own file types. Browsers refuse ES modules not served as JavaScript, and on Windows Python's
#: mimetypes takes .js from the registry, where other software may have set text/plain.
WEB_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
             ".svg": "image/svg+xml", ".json": "application/json", ".map": "application/json"}


def _static(path: str, root: Path) -> Any:
    # bottle.static_file refuses paths that leave root.
    answer = bottle.static_file(path, root=str(root), mimetype=WEB_TYPES.get(Path(path).suffix.lower(), "auto"))
    if isinstance(answer, bottle.HTTPError):
        return _json_response(answer.status_code, {"error": "not-found", "field": None,
                                                   "message": f"there is no file {path!r} in the interface"})
    answer.set_header("Cache-Control", "no-cache")
    return answer


def _stream(engine: DirectEngine, closing: threading.Event, wanted: set[str], vm_id: str | None,
            heartbeat: float) -> Iterator[str]:
    """The SSE body: a ``ready`` event once subscribed, then events as they come, a comment when quiet."""
    def accept(event: dict[str, Any]) -> bool:
        if event["type"] == "api.closing":
            return True
        return event["type"] in wanted and (vm_id is None or event.get("vm") == vm_id)

    with engine.bus.subscribe(accept=accept) as subscription:
        # A browser reconnects after 3 s if the stream breaks; the ready event tells a client it is subscribed.
        yield "retry: 3000\n\nevent: ready\ndata: {}\n\n"
        number = 0
        last = time.monotonic()
        while not closing.is_set():
            event = subscription.get(timeout=max(0.0, last + heartbeat - time.monotonic()))
            if event is None:
                last = time.monotonic()
                yield ": keep-alive\n\n"
                continue
            if event["type"] == "api.closing":
                return
            number += 1
            yield f"id: {number}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
