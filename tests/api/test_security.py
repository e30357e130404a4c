"""The guard of the local API against the real server: token, Host (DNS rebinding), Origin (CSRF), no CORS,
loopback only. Each refusal is also checked for having changed nothing."""

from __future__ import annotations

import errno
import http.client
import socket
from pathlib import Path

import requests

from thalunix.api import ApiServer
from thalunix.engine import DirectEngine

from .conftest import Api

CREATE = {"name": "victim", "ram": "64M", "cpus": 1, "firmware": "bios", "tpm": "off"}


def raw_request(api: Api, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> http.client.HTTPResponse:
    """A request with exactly these headers (requests would fill in Host and others)."""
    connection = http.client.HTTPConnection("127.0.0.1", api.server.port, timeout=30)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    if body:
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body or None)
    response = connection.getresponse()
    response.read()
    connection.close()
    response.status_code = response.status  # type: ignore[attr-defined]  # as requests calls it
    return response


def own_host(api: Api) -> str:
    return f"127.0.0.1:{api.server.port}"


def vm_names(api: Api) -> list[str]:
    return [row["name"] for row in api.get("/api/vms").json()]


def test_no_token_is_refused_everywhere(api: Api) -> None:
    for path in ("/api/vms", "/api/events", "/api/openapi.json", "/api/doctor", "/api/vms/x/screenshot"):
        answer = requests.get(api.url + path, timeout=30)
        assert answer.status_code == 401, path
        assert answer.json()["error"] == "unauthorized"
        assert "token" in answer.json()["message"]
    page = requests.get(api.url + "/", timeout=30)
    assert page.status_code == 401 and "text/html" in page.headers["Content-Type"]
    assert "link" in page.text and "<script" not in page.text
    assert requests.post(api.url + "/api/vms", json=CREATE, timeout=30).status_code == 401
    assert vm_names(api) == []


def test_wrong_token_is_refused_in_every_form(api: Api) -> None:
    wrong = api.token[:-2] + ("AA" if not api.token.endswith("AA") else "BB")
    assert requests.get(api.url + "/api/vms", headers={"Authorization": f"Bearer {wrong}"},
                        timeout=30).status_code == 401
    assert requests.get(api.url + "/api/vms", headers={"Authorization": f"Basic {api.token}"},
                        timeout=30).status_code == 401
    cookie = {f"thalunix_{api.server.port}": wrong}
    assert requests.get(api.url + "/api/vms", cookies=cookie, timeout=30).status_code == 401
    # The right token under another port's cookie name is another server's cookie.
    assert requests.get(api.url + "/api/vms", cookies={"thalunix_1": api.token}, timeout=30).status_code == 401
    answer = requests.get(f"{api.url}/?token={wrong}", allow_redirects=False, timeout=30)
    assert answer.status_code == 401 and "Set-Cookie" not in answer.headers
    assert requests.post(api.url + "/api/vms", json=CREATE, headers={"Authorization": f"Bearer {wrong}"},
                         timeout=30).status_code == 401
    assert vm_names(api) == []


def test_link_token_becomes_a_strict_httponly_cookie_and_leaves_the_url(api: Api) -> None:
    browser = requests.Session()
    first = browser.get(f"{api.url}/?token={api.token}&tab=vms", allow_redirects=False, timeout=30)
    assert first.status_code == 303
    assert first.headers["Location"] == "/?tab=vms"
    cookie = first.headers["Set-Cookie"]
    assert cookie.startswith(f"thalunix_{api.server.port}={api.token};")
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in cookie
    assert first.headers["Referrer-Policy"] == "no-referrer"
    page = browser.get(api.url + first.headers["Location"], timeout=30)
    assert page.status_code == 200 and "Thalunix" in page.text
    # The cookie alone opens the API and the event stream (EventSource cannot send headers).
    assert browser.get(api.url + "/api/vms", timeout=30).json() == []
    with browser.get(api.url + "/api/events", stream=True, timeout=30) as stream:
        assert stream.status_code == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")


def test_token_in_the_url_does_not_authorize_a_post(api: Api) -> None:
    answer = requests.post(f"{api.url}/api/vms?token={api.token}", json=CREATE, timeout=30)
    assert answer.status_code == 401
    assert vm_names(api) == []


def test_foreign_host_is_refused(api: Api) -> None:
    port = api.server.port
    bearer = {"Authorization": f"Bearer {api.token}"}
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1",
                 f"localhost.evil.example:{port}", f"127.0.0.2:{port}", f"[::1]:{port}", ""):
        answer = raw_request(api, "GET", "/api/vms", {"Host": host, **bearer})
        assert answer.status_code == 403, host
    body = b'{"name": "victim", "ram": "64M", "cpus": 1, "firmware": "bios", "tpm": "off"}'
    answer = raw_request(api, "POST", "/api/vms", {"Host": f"evil.example:{port}", "Content-Type": "application/json",
                                                   **bearer}, body)
    assert answer.status_code == 403
    assert vm_names(api) == []
    # Both spellings of loopback with the right port are this server.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        assert raw_request(api, "GET", "/api/vms", {"Host": host, **bearer}).status == 200, host


def test_foreign_origin_is_refused_before_anything_changes(api: Api) -> None:
    port = api.server.port
    for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}", "null",
                   f"http://localhost:{port}.evil.example"):
        answer = api.post("/api/vms", json=CREATE, headers={"Origin": origin})
        assert answer.status_code == 403, origin
        assert answer.json()["error"] == "foreign-origin"
    assert vm_names(api) == []
    # A page of another origin that sends no Origin header is still known by Sec-Fetch-Site.
    assert api.post("/api/vms", json=CREATE, headers={"Sec-Fetch-Site": "same-site"}).status_code == 403
    assert api.post("/api/vms", json=CREATE, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert vm_names(api) == []
    created = api.post("/api/vms", json=CREATE, headers={"Origin": f"http://127.0.0.1:{port}",
                                                         "Sec-Fetch-Site": "same-origin"})
    assert created.status_code == 201, created.text
    assert vm_names(api) == ["victim"]
    assert api.delete("/api/vms/victim", headers={"Origin": "http://evil.example"}).status_code == 403
    assert api.patch("/api/vms/victim", json={"cpus": 1}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert vm_names(api) == ["victim"]


def test_form_posts_are_not_json_and_are_refused(api: Api) -> None:
    # What a plain HTML form on another page could send without a CORS preflight.
    answer = api.post("/api/vms", data="name=victim", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 415
    answer = api.post("/api/vms", data='{"name": "victim"}', headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415
    assert vm_names(api) == []


def test_no_cors_anywhere(api: Api) -> None:
    preflight = requests.options(api.url + "/api/vms", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"}, timeout=30)
    assert preflight.status_code == 403
    own = api.session.options(api.url + "/api/vms", headers={"Origin": f"http://127.0.0.1:{api.server.port}"},
                              timeout=30)
    assert own.status_code == 405
    answers = [preflight, own, api.get("/api/vms"), api.get("/api/openapi.json"),
               api.get("/api/vms", headers={"Origin": f"http://127.0.0.1:{api.server.port}"}),
               requests.get(api.url + "/api/vms", timeout=30)]
    for answer in answers:
        assert not [name for name in answer.headers if name.lower().startswith("access-control-")], answer.headers


def test_security_headers_on_every_answer(api: Api) -> None:
    for answer in (api.get("/"), api.get("/api/vms"), api.get("/api/vms/none"), requests.get(api.url + "/", timeout=30)):
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
    assert api.get("/api/vms").headers["Cache-Control"] == "no-store"


def test_each_launch_has_its_own_token(engine: DirectEngine, api: Api) -> None:
    other = ApiServer(engine).start()
    try:
        assert other.token != api.token and len(other.token) >= 40
        assert requests.get(other.url + "/api/vms", headers={"Authorization": f"Bearer {api.token}"},
                            timeout=30).status_code == 401
        assert requests.get(other.url + "/api/vms", headers={"Authorization": f"Bearer {other.token}"},
                            timeout=30).status_code == 200
    finally:
        other.stop()


def _listeners_on(port: int) -> list[str]:
    """Local addresses of the sockets listening on ``port`` (IPv4 and IPv6), from /proc/net."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":   # 0A = LISTEN
                found.append(address)
    return found


def test_listens_on_loopback_only(api: Api) -> None:
    port = api.server.port
    assert api.server.url == f"http://127.0.0.1:{port}"
    # 0100007F is 127.0.0.1 in /proc's byte order; a 0.0.0.0 or :: listener would show as zeros.
    assert _listeners_on(port) == ["0100007F"]
    # Other addresses of this machine do not answer: another loopback address (it would, were the
    # server bound to 0.0.0.0) and IPv6 loopback.
    for family, address in ((socket.AF_INET, ("127.0.0.2", port)), (socket.AF_INET6, ("::1", port))):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(5)
            try:
                result = probe.connect_ex(address)
            except OSError as error:   # no IPv6 on this host at all
                result = error.errno
        assert result in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EAFNOSUPPORT), address


def test_path_traversal_in_static_files_is_refused(engine: DirectEngine, tmp_path: Path) -> None:
    web = tmp_path / "web"
    (web / "node_modules" / "novnc").mkdir(parents=True)
    (web / "index.html").write_text("<!doctype html><title>UI</title>")
    (web / "node_modules" / "novnc" / "rfb.js").write_text("export default 1;")
    (tmp_path / "secret.txt").write_text("SECRET")
    server = ApiServer(engine, web_root=web).start()
    try:
        bearer = {"Authorization": f"Bearer {server.token}", "Host": f"127.0.0.1:{server.port}"}
        api = Api(server, requests.Session())
        assert requests.get(server.url + "/vendor/novnc/rfb.js", headers=bearer, timeout=30).text == "export default 1;"
        for path in ("/../secret.txt", "/vendor/../../secret.txt", "/%2e%2e/secret.txt", "/vendor/%2e%2e/%2e%2e/secret.txt",
                     "/..%2fsecret.txt"):
            answer = raw_request(api, "GET", path, bearer)
            assert answer.status_code in (400, 403, 404), path
    finally:
        server.stop()
