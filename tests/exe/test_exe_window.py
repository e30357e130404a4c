"""The exe's window on Linux: it uses the system's GTK/WebKit where they are (a real window under Xvfb), and where
they are not (the bare Debian) it serves the interface instead and says why."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from exe.conftest import REPO, Chroot

pytestmark = [pytest.mark.exe, pytest.mark.timeout(2400)]


def read_line(stream, timeout: float) -> str:
    """One line from a pipe, or "" after ``timeout`` (the exe may print nothing when it fails)."""
    import selectors
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    if not selector.select(timeout):
        return ""
    return stream.readline()


def test_without_gtk_it_serves_and_says_why(exe: Path, chroot: Chroot) -> None:
    chroot.install(exe, "/opt/nogtk/thalunix")
    command = chroot.command("/opt/nogtk/thalunix")
    command.insert(command.index("chroot"), "DISPLAY=:42")   # a display is set; GTK/WebKit are what is missing
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        why = read_line(proc.stderr, 120)
        assert "no window: GTK WebKit is missing" in why and "serving the interface instead" in why, why
        url = read_line(proc.stdout, 60).strip()
        assert url.startswith("http://127.0.0.1:") and "token=" in url
        # The link carries a one-time token the server swaps for a cookie (and a redirect): keep cookies.
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(url, timeout=10) as answer:
            # the real interface, served from the runtime unpacked into the data folder (not a placeholder)
            assert answer.status == 200 and answer.read() == (REPO / "web" / "index.html").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_with_the_systems_gtk_the_window_opens(exe: Path, tmp_path: Path) -> None:
    for tool in ("Xvfb", "xdotool"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing; run `python3 build.py setup`")
    display = f":{60 + os.getpid() % 30}"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THALUNIX_", "VIRTUAL_ENV", "PYTHON"))}
    env["DISPLAY"] = display
    stick = tmp_path / "stick"
    stick.mkdir()
    shutil.copy2(exe, stick / "thalunix")
    app = None
    try:
        deadline = time.monotonic() + 30
        while not Path(f"/tmp/.X11-unix/X{display[1:]}").exists():
            assert time.monotonic() < deadline and xvfb.poll() is None, "Xvfb did not start"
            time.sleep(0.05)
        app = subprocess.Popen([str(stick / "thalunix")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        found = subprocess.run(["xdotool", "search", "--sync", "--name", "^Thalunix"], env=env,
                               capture_output=True, text=True, timeout=180)
        assert found.returncode == 0 and found.stdout.strip(), found.stderr
        assert app.poll() is None
    finally:
        if app is not None:
            app.send_signal(signal.SIGTERM)   # the window closes, leaving VMs (none here) running
            try:
                _, errors = app.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                app.kill()
                _, errors = app.communicate()
            assert "no window" not in errors, errors
        xvfb.terminate()
        xvfb.wait(10)
