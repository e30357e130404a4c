"""The guard in front of every request of the local API: secret token, Host header, Origin header.

A local HTTP server is reachable by every web page the user's browser opens, so:

* **token** — made at each launch (``secrets.token_urlsafe(32)``); accepted as
  ``Authorization: Bearer …``, as a cookie, or once as ``?token=`` on a page load, which sets
  the cookie (HttpOnly, SameSite=Strict) and redirects to the same URL without it, so the
  token does not linger in the address bar or history. EventSource cannot send headers; the
  cookie covers it.
* **Host** must be ``127.0.0.1:PORT`` or ``localhost:PORT``: a page on ``evil.example`` whose
  DNS later points at 127.0.0.1 (DNS rebinding) sends its own name and is refused.
* **Origin**, when sent, must be this server's own: a foreign page's request is refused
  before it does anything (no CSRF). No CORS header is ever sent.

Example::

    guard = Guard(app, token, port=lambda: server.port)
    waitress.create_server(guard, host="127.0.0.1", port=0)
"""

from __future__ import annotations

import hmac
import json
import secrets
import urllib.parse
from http.cookies import CookieError, SimpleCookie
from typing import Any, Callable, Iterable

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
COOKIE_PREFIX = "thalunix_"
#: Sent with every answer: no sniffing, no framing (clickjacking), no Referer carrying a URL out.
SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
]
_LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>Thalunix</title>
<body style="font-family:sans-serif;max-width:40em;margin:4em auto">
<h1>Thalunix needs its link</h1>
<p>This page only opens through the link Thalunix printed when it started (<code>thalunix serve</code>
prints it; the Thalunix window opens it by itself). The link carries a secret that changes at every
start, so other web pages cannot drive your virtual machines.</p></body>"""


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Guard:
    """WSGI middleware: refuses what fails the Host, Origin or token checks; adds security headers."""

    def __init__(self, app: WSGIApp, token: str, port: Callable[[], int]) -> None:
        self.app = app
        self.token = token
        self._port = port

    @property
    def cookie_name(self) -> str:
        # Cookies ignore ports: two Thalunix instances on one machine must not overwrite each other's.
        return f"{COOKIE_PREFIX}{self._port()}"

    def own_hosts(self) -> set[str]:
        port = self._port()
        return {f"127.0.0.1:{port}", f"localhost:{port}"}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            present = {name.lower() for name, _ in headers}
            extra = [(name, value) for name, value in SECURITY_HEADERS if name.lower() not in present]
            return start_response(status, headers + extra, exc_info) if exc_info else \
                start_response(status, headers + extra)

        path = environ.get("PATH_INFO", "") or "/"
        host = environ.get("HTTP_HOST", "").strip().lower()
        if host not in self.own_hosts():
            return _refuse(respond, "403 Forbidden", "bad-host",
                           f"the Host header {host or '(none)'!r} is not this Thalunix server "
                           f"(expected 127.0.0.1:{self._port()}); open the link Thalunix printed")
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and origin.strip().lower() not in {f"http://{own}" for own in self.own_hosts()}:
            return _refuse(respond, "403 Forbidden", "foreign-origin",
                           f"requests from the web page {origin!r} are refused; only the Thalunix page "
                           "itself may use this API")
        navigation = environ.get("REQUEST_METHOD") in ("GET", "HEAD") and \
            environ.get("HTTP_SEC_FETCH_MODE", "").lower() == "navigate"
        if environ.get("HTTP_SEC_FETCH_SITE", "").lower() in ("cross-site", "same-site") and not navigation:
            # Another page (even another port on 127.0.0.1) that managed to send no Origin. A plain
            # link followed to here is let through: it can only read, and only into a new page of ours.
            return _refuse(respond, "403 Forbidden", "foreign-origin",
                           "requests from other web pages are refused; only the Thalunix page itself may "
                           "use this API")
        query = urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        offered = [value for key, value in query if key == "token"]
        if offered and environ.get("REQUEST_METHOD") in ("GET", "HEAD") and self._matches(offered[-1]):
            # First page load: trade the URL's token for a cookie and drop it from the address bar.
            rest = urllib.parse.urlencode([(key, value) for key, value in query if key != "token"])
            location = urllib.parse.quote(path) + (f"?{rest}" if rest else "")
            cookie = f"{self.cookie_name}={self.token}; Path=/; HttpOnly; SameSite=Strict"
            respond("303 See Other", [("Location", location), ("Set-Cookie", cookie),
                                      ("Cache-Control", "no-store"), ("Content-Length", "0")])
            return [b""]
        if self._has_token(environ):
            return self.app(environ, respond)
        if path.startswith("/api/"):
            return _refuse(respond, "401 Unauthorized", "unauthorized",
                           "this request carries no valid Thalunix token; open the link Thalunix printed "
                           "at start, or send 'Authorization: Bearer TOKEN'")
        body = _LOGIN_PAGE.encode()
        respond("401 Unauthorized", [("Content-Type", "text/html; charset=utf-8"),
                                     ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [body]

    def _matches(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), self.token.encode())

    def _has_token(self, environ: dict[str, Any]) -> bool:
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and self._matches(value.strip()):
            return True
        raw = environ.get("HTTP_COOKIE", "")
        if raw:
            cookies: SimpleCookie = SimpleCookie()
            try:
                cookies.load(raw)
            except CookieError:
                return False
            morsel = cookies.get(self.cookie_name)
            if morsel is not None and self._matches(morsel.value):
                return True
        return False


def _refuse(respond: Callable[..., Any], status: str, code: str, message: str) -> list[bytes]:
    body = json.dumps({"error": code, "message": message, "field": None}).encode()
    respond(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                     ("Cache-Control", "no-store")])
    return [body]
