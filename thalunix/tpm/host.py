"""The helper host: a small detached process that owns one VM's helper micro-VM and its bridge.

QEMU keeps running after the Thalunix that started it exits (``thalunix vm start``
returns at once), and its TPM must keep working: so the bridge cannot live inside
Thalunix. This process boots the helper, serves the bridge's control socket, and
ends on its own when its VM's session ends (QEMU closes the control channel), when
no VM connects in time, when told to (SIGTERM), or when the helper dies; in every
case the helper is stopped first (cleanly: swtpm's state is synced). The helper is
its child and gets SIGKILL if this process is killed, so nothing is orphaned.

It reports on stdout, one JSON object a line: ``{"event": "log", "line": ...}`` for
each helper console line, then ``{"event": "ready", ...}`` or ``{"event": "error",
"message": ...}``, and ``{"event": "exit", "reason": ...}``. Once its reader has gone
(Thalunix exited) it keeps writing only to its log file.

Example (what :mod:`thalunix.tpm.manager` runs, in the VM's ``run/`` folder)::

    python -m thalunix.tpm.host '{"qemu": "/usr/bin/qemu-system-x86_64", "image": "...",
        "state_disk": "../tpm/helper-state.img", "socket": "tpm.sock", "log_file": "../logs/tpm-helper.log",
        "accel": "tcg", "accept_timeout": 120}'
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from thalunix.errors import ThalunixError
from thalunix.tpm.bridge import Bridge
from thalunix.tpm.helper import HOST, HelperImage, HelperVM

_out_lock = threading.Lock()
_out_open = True


def emit(event: str, **fields: Any) -> None:
    """One JSON line to whoever started us; silently nothing once they have gone."""
    global _out_open
    if not _out_open:
        return
    with _out_lock:
        try:
            sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, OSError, ValueError):
            _out_open = False
            # Python would complain about the broken pipe again at exit.
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), sys.stdout.fileno())


def run(spec: dict[str, Any]) -> int:
    image = HelperImage.load(Path(spec["image"]))
    helper = HelperVM(Path(spec["qemu"]), image, Path(spec["state_disk"]),
                      log=lambda line: emit("log", line=line), accel=spec.get("accel", "tcg"),
                      ram_mib=spec.get("ram_mib"), ports=tuple(spec["ports"]) if spec.get("ports") else None,
                      machines=spec.get("machines"), data_dir=spec.get("data_dir", ""),
                      log_file=Path(spec["log_file"]) if spec.get("log_file") else None,
                      ready_timeout=float(spec.get("ready_timeout", 60)), name=spec.get("name", "TPM helper"))
    bridge: Bridge | None = None
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        if bridge is not None:
            bridge.close()
        else:
            raise KeyboardInterrupt   # still booting: abandon the start

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        helper.start()
    except ThalunixError as error:
        emit("error", message=str(error))
        return 1
    except KeyboardInterrupt:
        helper.kill()
        emit("exit", reason="stopped while booting")
        return 1
    bridge = Bridge(spec["socket"], HOST, helper.data_port, helper.ctrl_port, log=lambda line: emit("log", line=line))
    try:
        bridge.listen()
    except OSError as error:
        helper.stop()
        emit("error", message=f"cannot create the TPM control socket {spec['socket']}: {error}")
        return 1

    def watch_helper() -> None:
        assert helper.proc
        helper.proc.wait()
        if not stopping.is_set():
            emit("log", line="the TPM helper VM stopped unexpectedly; the VM's TPM no longer answers")
            stopping.set()
            bridge.close()

    threading.Thread(target=watch_helper, name="watch-helper", daemon=True).start()
    emit("ready", data_port=helper.data_port, ctrl_port=helper.ctrl_port, helper_pid=helper.proc.pid if helper.proc
         else 0, ready_seconds=round(helper.ready_seconds, 3))
    reason = bridge.serve(float(spec.get("accept_timeout", 120)))
    stopping.set()
    bridge.close()
    clean = helper.stop()
    emit("exit", reason=reason, clean=clean, commands=bridge.commands)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    return run(json.loads(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
