"""Port forwards reach a service in a real guest on 127.0.0.1; a port already taken is refused before QEMU runs,
naming the port; restricted NAT keeps the forwards but cuts the guest's outbound access."""

from __future__ import annotations

import http.server
import socket
import threading
import urllib.request

import pytest

from thalunix.engine import DirectEngine
from thalunix.net import NetworkError

from .conftest import boot, free_port, nat_up, nat_vm, run  # noqa: F401 - nat_vm is a fixture


def _host_server() -> tuple[http.server.HTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"host-says-hello\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def test_forward_reaches_guest_httpd_and_restricted_blocks_outbound(engine: DirectEngine, nat_vm) -> None:
    port = free_port()
    nat_vm("web", forwards=[{"protocol": "tcp", "host_port": port, "guest_port": 80}])
    server, host_port = _host_server()
    try:
        boot(engine, "web")
        nat_up(engine, "web")
        out = run(engine, "web", "mkdir -p /www && echo guest-page-$((6*7)) > /www/index.html && "
                                 "httpd -p 80 -h /www && echo HTTPD")
        assert out.endswith("HTTPD"), out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=60) as response:
            assert response.read().decode().strip() == "guest-page-42"
        # Outbound: the host's loopback service is 10.0.2.2 for the guest.
        assert run(engine, "web", f"wget -q -O - http://10.0.2.2:{host_port}/") == "host-says-hello"
        engine.stop("web", force=True)

        nics = [n.to_dict() for n in engine.get("web").nics]
        nics[0]["mode"] = "restricted"
        engine.edit("web", {"nics": nics})
        boot(engine, "web")
        assert "restrict=on" in " ".join(engine.supervisor.sessions[engine.get("web").id].record.argv)
        nat_up(engine, "web")
        run(engine, "web", "mkdir -p /www && echo restricted-page > /www/index.html && httpd -p 80 -h /www")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=60) as response:
            assert response.read().decode().strip() == "restricted-page"
        out = run(engine, "web", f"timeout 15 wget -q -O - http://10.0.2.2:{host_port}/ || echo BLOCKED", timeout=120)
        assert out.endswith("BLOCKED") and "host-says-hello" not in out, out
    finally:
        server.shutdown()


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_forward_to_a_taken_port_is_refused_before_start(engine: DirectEngine, nat_vm, protocol: str) -> None:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", 0))
        if protocol == "tcp":
            taken.listen(1)
        port = taken.getsockname()[1]
        nat_vm("busy", forwards=[{"protocol": protocol, "host_port": 2222, "guest_port": 22},
                                 {"protocol": protocol, "host_port": port, "guest_port": 80}])
        with pytest.raises(NetworkError) as error:
            engine.start("busy")
        assert f"127.0.0.1:{port}" in str(error.value) and "in use" in str(error.value)
        assert protocol.upper() in str(error.value) and "VM 'busy'" in str(error.value)
    assert engine.status("busy")["state"] == "stopped"
    assert not list(engine.data.vm_path(engine.get("busy").id, "run").glob("state.json"))
    assert "=== argv" not in engine.read_log("busy", "qemu")   # QEMU was never run
