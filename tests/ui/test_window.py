"""The real Thalunix window (pywebview on GTK/WebKit) under Xvfb, showing the real interface.

The window runs in a child process (this file run as a script) on its own Xvfb display: it creates a VM from
the test guest's ISO, starts it, opens the window, and checks from inside WebKit that the page went live
(its ES modules, noVNC's included, loaded), that the native file-dialog bridge is there, and that the
VM's screen reached the noVNC canvas. It screenshots the whole display at each step with ImageMagick's
``import``.

Run: .venv/bin/python -m pytest tests/ui/test_window.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"
RESULT_PREFIX = "WINDOW-RESULT "


def _xvfb() -> tuple[subprocess.Popen, str]:
    """A private X display; Xvfb picks a free number and tells it through -displayfd."""
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                              pass_fds=(write,), stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    if not number:
        server.kill()
        pytest.fail("Xvfb did not start")
    return server, f":{number}"


def test_window_shows_the_interface(guest, tmp_path: Path) -> None:
    for tool in ("Xvfb", "import"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing; run `python3 build.py setup` (xvfb, imagemagick)")
    from thalunix.gui import window_unavailable_reason
    server, display = _xvfb()
    try:
        env = {**os.environ, "DISPLAY": display, "NO_AT_BRIDGE": "1"}
        reason = subprocess.run([sys.executable, "-c", "from thalunix.gui import window_unavailable_reason as r; "
                                 "print(r() or '')"], env=env, capture_output=True, text=True).stdout.strip()
        assert not reason, f"no window possible: {reason}"
        SHOTS.mkdir(parents=True, exist_ok=True)
        child = subprocess.run([sys.executable, __file__, str(tmp_path / "data"), str(guest.iso), str(SHOTS)],
                               env=env, capture_output=True, text=True, timeout=420,
                               cwd=Path(__file__).resolve().parents[2])
    finally:
        server.kill()
        server.wait()
    lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert lines, f"the window process reported nothing (exit {child.returncode}):\n{child.stdout}\n{child.stderr[-3000:]}"
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    assert result.get("error") is None, result
    assert result["live"] and result["bridge"], result
    assert result["entry"] == "window-guest"
    assert result["colours"] > 1, result
    for name in ("window-form", "window-screen", "window-screen-dark"):
        assert (SHOTS / f"{name}.png").stat().st_size > 10_000
    print(f"\nwindow: page live after {result['live_seconds']:.1f} s; screen colours {result['colours']}")


# -- the child: runs the window ----------------------------------------------------------------------------
def _child(data_dir: str, iso: str, shots: str) -> None:
    import threading

    from thalunix.engine import CreateOptions, DirectEngine
    from thalunix.gui import run_window

    engine = DirectEngine.open(data_dir)
    engine.create(CreateOptions(name="window-guest", iso=iso, ram="256M", cpus=1, firmware="bios", tpm="off"))
    engine.start("window-guest")
    result: dict = {"error": None}

    def js(window, code: str):
        return window.evaluate_js(code)

    def wait(window, code: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if js(window, code):
                return True
            time.sleep(0.25)
        return False

    def shoot(name: str) -> None:
        # WebKit paints the X window a moment after the DOM changes (later still with a guest eating CPU).
        time.sleep(2)
        subprocess.run(["import", "-window", "root", str(Path(shots) / f"{name}.png")], check=True, timeout=60)

    def drive(window) -> None:
        try:
            opened = time.monotonic()
            result["live"] = wait(window, "document.querySelector('#connection')?.dataset.state === 'live' && "
                                          "!!document.querySelector('.vm-entry')", 60)
            result["live_seconds"] = time.monotonic() - opened
            result["entry"] = js(window, "document.querySelector('.vm-entry')?.dataset.name")
            wait(window, "!!window.pywebview?.api?.pick_file", 20)
            js(window, "location.hash = '#/new'")
            wait(window, "!!document.querySelector('#vm-form')", 20)
            result["bridge"] = js(window, "document.body.classList.contains('has-bridge') && "
                                          "getComputedStyle(document.querySelector('#pick-iso')).display !== 'none'")
            shoot("window-form")
            vm_id = js(window, "document.querySelector('.vm-entry').dataset.id")
            js(window, f"location.hash = '#/vm/{vm_id}/screen'")
            wait(window, "document.querySelector('#screen-status')?.dataset.state === 'connected'", 60)
            colours = """(() => { const c = document.querySelector('#screen canvas');
                if (!c || !c.width) return 0;
                const p = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, s = new Set();
                for (let i = 0; i < p.length && s.size < 50; i += 4 * 97) s.add((p[i] << 16) | (p[i + 1] << 8) | p[i + 2]);
                return s.size; })()"""
            wait(window, f"{colours} > 1", 180)
            # The thumbnail follows within a few seconds of the state change.
            wait(window, "!!document.querySelector('.vm-entry img.thumb')", 30)
            result["colours"] = js(window, colours)
            shoot("window-screen")
            js(window, "document.querySelector('#theme').value = 'dark';"
                       "document.querySelector('#theme').dispatchEvent(new Event('change'))")
            time.sleep(0.5)
            shoot("window-screen-dark")
        except Exception as error:  # noqa: BLE001 - reported to the test, which fails with it
            result["error"] = repr(error)
        finally:
            engine.stop("window-guest", force=True)   # so closing the window has nothing to ask
            print(RESULT_PREFIX + json.dumps(result), flush=True)
            window.destroy()

    run_window(engine, width=1280, height=800, on_shown=lambda window: threading.Thread(
        target=drive, args=(window,), daemon=True).start())
    os._exit(0)   # pywebview can leave a non-daemon thread behind on quit


if __name__ == "__main__":
    _child(*sys.argv[1:4])
