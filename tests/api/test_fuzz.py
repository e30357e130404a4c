"""Fuzz the real API from its own OpenAPI document (schemathesis): no 500s, answers as documented, and no
VM config left unreadable afterwards.

One server and data folder serve the whole module; two VMs exist from the start and the document's
``name`` parameters carry them as examples, so the fuzzer reaches real VMs as well as missing ones.
No guest is started: ``start`` is only fuzzed with generated names, and the stop timeout is capped
so a request can never wait long.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
import schemathesis
from schemathesis import checks as st_checks

from thalunix.api import ApiServer
from thalunix.api.openapi import openapi_document
from thalunix.engine import CreateOptions, DirectEngine
from thalunix.model import validate
from thalunix.qemu import process

MAX_EXAMPLES = 25
EXAMPLE_VMS = ("alpha", "beta")
#: The only folder whose files the fuzzer names (exports, imports, existing disk images); made by the fixture.
FILES = Path(tempfile.gettempdir()) / f"thalunix-fuzz-{os.getpid()}"


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("fuzz")
    iso = root / "small.iso"
    iso.write_bytes(b"\0" * 4096)
    FILES.mkdir(exist_ok=True)
    (FILES / "disk.img").write_bytes(b"\0" * (1 << 20))
    engine = DirectEngine.open(root / "data")
    server = ApiServer(engine).start()
    try:
        yield server
    finally:
        server.stop()
        engine.close(stop_vms=False)
        for state in (root / "data").glob("vms/*/run/state.json"):   # a VM the fuzzer managed to start
            record = json.loads(state.read_text())
            process.kill(int(record["pid"]), str(record.get("token", "")))
        shutil.rmtree(FILES, ignore_errors=True)


def _document() -> dict[str, Any]:
    """The served document, with the example VMs as examples of every ``name`` (but start's) and a short stop."""
    document = json.loads(json.dumps(openapi_document()))
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for parameter in operation if method == "parameters" else operation.get("parameters", []):
                if parameter["name"] == "name" and not path.endswith("/start"):
                    parameter["examples"] = {name: {"value": name} for name in EXAMPLE_VMS}
                if parameter["name"] == "disk":   # every example VM has a disk0
                    parameter["examples"] = {"disk0": {"value": "disk0"}}
    schemas = document["components"]["schemas"]
    schemas["StopOptions"]["properties"]["timeout"]["maximum"] = 3
    # Steer creation towards VMs this host can hold, so that some succeed; the rest of each body stays free.
    create = schemas["CreateOptions"]["properties"]
    create["ram"] = {"type": "string", "pattern": "^(64|96|128)M$", "nullable": bool(create["ram"].get("nullable"))}
    create["disk"] = {"type": "string", "pattern": "^([1-9]M)?$", "nullable": True}
    create["cpus"]["maximum"] = 2
    create["forwards"]["items"]["pattern"] = "^tcp:[1-9][0-9]{3}:[1-9][0-9]?$"
    # Downloads stay on this machine: a manual entry, unknown ids, or a URL on 127.0.0.1 where nothing listens.
    schemas["DownloadRequest"]["properties"]["source"]["pattern"] = (
        r"^(windows-11|no-such-[a-z]{1,6}|http://127\.0\.0\.1:9/[a-z]{1,6}\.iso)$")
    # Files only in FILES (so exports and imports meet each other), small new and grown disks.
    schemas["ExportRequest"]["properties"]["file"]["pattern"] = f"^{FILES}/[a-z]{{1,4}}\\.7z$"
    schemas["ImportRequest"]["properties"]["file"]["pattern"] = f"^{FILES}/[a-z]{{1,4}}\\.7z$"
    schemas["DiskAdd"]["properties"]["path"]["pattern"] = f"^{FILES}/(disk\\.img|[a-z]{{1,4}}\\.7z)$"
    for body in ("DiskAdd", "DiskResize"):
        schemas[body]["properties"]["size"]["pattern"] = "^[1-9]M$"
    return document


CONFIG = schemathesis.Config.from_dict({
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    "request-timeout": 60,
})
# The event stream never ends by design; it has its own tests.
schema = schemathesis.openapi.from_dict(_document(), config=CONFIG).exclude(path="/api/events")


def ensure_example_vms(engine: DirectEngine, iso: Path) -> None:
    """The fuzzer renames and deletes the example VMs; bring them back so every operation meets a real VM."""
    names = {row["name"] for row in engine.list()}
    for name in EXAMPLE_VMS:
        if name not in names:
            engine.create(CreateOptions(name=name, iso=str(iso), ram="64M", cpus=1, firmware="bios", tpm="off",
                                        disk="64M"))


#: (method, path template, status) of every fuzzed request, to show the fuzzer changed things.
ANSWERS: Counter[tuple[str, str, int]] = Counter()


@schema.parametrize()
def test_api_from_its_openapi_document(case: schemathesis.Case, fuzz_target: ApiServer) -> None:
    ensure_example_vms(fuzz_target.engine, fuzz_target.engine.data.root.parent / "small.iso")
    response = case.call_and_validate(base_url=fuzz_target.url,
                                      headers={"Authorization": f"Bearer {fuzz_target.token}"},
                                      excluded_checks=[st_checks.positive_data_acceptance])
    ANSWERS[(case.method, case.path, response.status_code)] += 1
    for job in fuzz_target.engine.jobs_list():   # one at a time: a clone or export must not outlive the module
        fuzz_target.engine.jobs.wait(job["id"], timeout=120)


def test_every_config_still_loads_after_fuzzing(fuzz_target: ApiServer) -> None:
    server = fuzz_target
    print(f"fuzzed {sum(ANSWERS.values())} requests, {sum(n for key, n in ANSWERS.items() if key[2] < 300)} accepted")
    # The fuzzer did change state: it made VMs, edited and deleted some.
    assert ANSWERS[("POST", "/api/vms", 201)] > 0, ANSWERS
    assert ANSWERS[("PATCH", "/api/vms/{name}", 200)] > 0, ANSWERS
    assert ANSWERS[("DELETE", "/api/vms/{name}", 200)] > 0, ANSWERS
    assert not [key for key in ANSWERS if key[2] >= 500], ANSWERS
    # … and reached the disk routes: disks added, clones, exports and imports started.
    for method, path, status in [("POST", "/api/vms/{name}/disks", 201),
                                 ("POST", "/api/vms/{name}/clone", 202), ("POST", "/api/vms/{name}/export", 202),
                                 ("POST", "/api/import", 202)]:
        assert ANSWERS[(method, path, status)] > 0, (method, path, status)
    data = server.engine.data
    entries = data.list_vms()
    for entry in entries:
        assert entry.config is not None, entry.error
        validate(entry.config, server.engine.host)
        raw = json.loads((data.vm_path(entry.id, "vm.json")).read_text())
        assert raw["id"] == entry.id
    leftovers = [path for path in Path(data.tmp_dir).iterdir() if not path.name.startswith(".")]
    assert leftovers == [], "half-made VM folders left in tmp/"
