"""Runs the real Thalunix window (``thalunix.gui.run_window``) for test_gui.py and reports what it saw.

The test runs this under Xvfb and plays the user with xdotool; this side reports on stdout, one
JSON object a line: ``{"step": ...}``. Modes:

* ``probe DATA_DIR`` — once the page loaded: what the page itself can reach (the API through the
  cookie, the JS bridge), then ``pick_file`` from the page, which opens the native file dialog
  (the test cancels it); then a drop as pywebview reports it (page event + bus); then the window closes.
* ``close DATA_DIR NAME [--start]`` — optionally start VM NAME and wait for its guest; open the
  window; close it as the window manager's close button does; the question appears (the test
  answers it); report whether the VMs were stopped.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from thalunix.engine import DirectEngine
from thalunix.gui import _on_drop, run_window


def say(step: str, **facts: Any) -> None:
    print(json.dumps({"step": step, **facts}), flush=True)


def wait_for_go() -> None:
    """The test notes which windows exist before a dialog is opened; it says "go" when it has."""
    sys.stdin.readline()


def wait_js(window: Any, expression: str, timeout: float = 60) -> Any:
    """Evaluate until the expression is not null (a promise result stored by the page)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = window.evaluate_js(expression)
        if value is not None:
            return value
        time.sleep(0.2)
    raise TimeoutError(expression)


def probe(window: Any, engine: DirectEngine) -> None:
    window.events.loaded.wait(60)
    window.evaluate_js("""
        window.__probe = null;
        fetch('/api/vms').then(r => r.json().then(rows => { window.__probe = {
            status: r.status, names: rows.map(row => row.name), href: location.href,
            cookie: document.cookie, bridge: typeof window.pywebview.api.pick_file}; }));
    """)
    facts = wait_js(window, "window.__probe")
    say("page", **facts)
    wait_for_go()
    window.evaluate_js("""
        window.__picked = null;
        window.pywebview.api.pick_file('iso').then(path => { window.__picked = {path: path}; });
    """)
    say("file-dialog")
    picked = wait_js(window, "window.__picked", timeout=120)
    say("picked", **picked)
    # A drop as pywebview reports it once GTK gave the full path (a real drag needs an XDND source,
    # which xdotool cannot be): the page hears it as a DOM event, other fronts on the bus.
    window.evaluate_js("window.__dropped = null; "
                       "window.addEventListener('thalunix-drop', e => { window.__dropped = e.detail.paths; });")
    with engine.bus.subscribe(accept=lambda event: event["type"] == "ui.drop") as drops:
        _on_drop(window, engine.bus, {"type": "drop", "dataTransfer": {"files": [
            {"name": "debian 12.iso", "pywebviewFullPath": "/srv/isos/debian 12.iso"},
            {"name": "no-path.txt"}]}})
        published = drops.get(timeout=10)
    say("dropped", page=wait_js(window, "window.__dropped"), bus=published["paths"] if published else None)
    window.destroy()


def close(window: Any, engine: DirectEngine, name: str) -> None:
    window.events.loaded.wait(60)
    status = engine.status(name)
    say("shown", state=status["state"], attached=status["attached"], pid=status["pid"])
    wait_for_go()
    window.destroy()     # what the close button does: GTK's delete-event, pywebview's closing event
    say("closing")


def main() -> None:
    mode, data_dir = sys.argv[1], sys.argv[2]
    engine = DirectEngine.open(data_dir)
    if mode == "probe":
        stopped = run_window(engine, on_shown=lambda window: threading.Thread(
            target=probe, args=(window, engine), daemon=True).start())
    else:
        name = sys.argv[3]
        if "--start" in sys.argv:
            engine.start(name)
            assert engine.supervisor.wait_serial(engine.get(name), b"THALUNIX-GUEST-READY", 180)
            say("booted")
        stopped = run_window(engine, on_shown=lambda window: threading.Thread(
            target=close, args=(window, engine, name), daemon=True).start())
    say("closed", stopped_vms=stopped)
    sys.stdout.flush()
    os._exit(0)   # pywebview can leave a non-daemon thread behind


if __name__ == "__main__":
    main()
