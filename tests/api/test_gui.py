"""The real window: pywebview (GTK/WebKit) under Xvfb, screenshotted; the page it shows reaches the API; the
native file dialog opens from the page; closing with a running VM asks, and either answer is honoured.
Without a display, ``thalunix`` serves instead and says why."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from thalunix.engine import CreateOptions, DirectEngine
from thalunix.qemu import process

from . import png

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
DRIVER = Path(__file__).resolve().parent / "gui_driver.py"


def _require(tool: str) -> None:
    if not shutil.which(tool):
        pytest.fail(f"{tool} is not installed; run `python3 build.py test`")


@pytest.fixture
def display() -> Iterator[str]:
    """A fresh Xvfb server (no window manager); its display name."""
    for tool in ("Xvfb", "import", "xdotool"):
        _require(tool)
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                              pass_fds=(write,), stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()   # Xvfb writes the display number once it accepts clients
    assert number, "Xvfb did not start"
    try:
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(10)


def gui_env(display: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("WAYLAND_DISPLAY", "THALUNIX_DATA")}
    env["DISPLAY"] = display
    env["PYTHONPATH"] = str(REPO)
    env["GSETTINGS_BACKEND"] = "memory"   # no session bus under bare Xvfb: keep GTK's settings in memory
    return env


def screenshot(display: str) -> bytes:
    return subprocess.run(["import", "-display", display, "-window", "root", "png24:-"], capture_output=True,
                          check=True, timeout=60).stdout


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    """Poll ``check`` (a screen or window query: X has no event to wait on from here) until it is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def visible_windows(display: str) -> list[dict[str, Any]]:
    listed = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", ""], env={"DISPLAY": display},
                            capture_output=True, text=True, timeout=30).stdout.split()
    windows = []
    for window in listed:
        shape = subprocess.run(["xdotool", "getwindowgeometry", "--shell", window], env={"DISPLAY": display},
                               capture_output=True, text=True, timeout=30).stdout
        name = subprocess.run(["xdotool", "getwindowname", window], env={"DISPLAY": display},
                              capture_output=True, text=True, timeout=30).stdout.strip()
        values = dict(line.split("=", 1) for line in shape.split() if "=" in line)
        if values:
            windows.append({"id": window, "name": name, **{key.lower(): int(values[key])
                                                           for key in ("X", "Y", "WIDTH", "HEIGHT")}})
    return windows


def window_ids(display: str) -> set[str]:
    return {window["id"] for window in visible_windows(display)}


def new_dialog(display: str, before: set[str]) -> dict[str, Any] | None:
    """A dialog that appeared since ``before``: a new visible window of a real size."""
    for window in visible_windows(display):
        if window["id"] not in before and window["width"] > 200 and window["height"] > 80:
            return window
    return None


class Driver:
    """tests/api/gui_driver.py in its own process; its JSON lines, one at a time."""

    def __init__(self, display: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), *args], cwd=REPO, env=gui_env(display),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def expect(self, step: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            pytest.fail(f"the window process ended before {step!r}: {self.proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        report = json.loads(line)
        assert report["step"] == step, report
        return report

    def finish(self) -> None:
        assert self.proc.wait(60) == 0, self.proc.stderr.read()[-3000:]  # type: ignore[union-attr]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def save(name: str, data: bytes) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(data)
    return path


def rendered(display: str) -> bytes | None:
    shot = screenshot(display)
    return shot if len(png.colours(shot)) >= 20 else None   # a page, not bare Xvfb black or a blank view


def test_thalunix_without_command_opens_the_window(display: str, data_dir: Path) -> None:
    engine = DirectEngine.open(data_dir)
    engine.create(CreateOptions(name="web server", ram="64M", cpus=1, firmware="bios", tpm="off"))
    engine.close()
    window = subprocess.Popen([sys.executable, "-m", "thalunix", "--data-dir", str(data_dir)], cwd=REPO,
                              env=gui_env(display), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        shot = wait_for("the window to show its page", lambda: rendered(display))
        time.sleep(1.5)   # let the page finish its first fetches before the picture is kept
        shot = screenshot(display)
        save("gui-window.png", shot)
        assert len(png.colours(shot)) >= 20
        titled = [w for w in visible_windows(display) if w["name"] == "Thalunix"]
        assert titled and titled[0]["width"] >= 640, visible_windows(display)
        window.send_signal(signal.SIGTERM)   # leaves like a closed window with no VM running
        out, err = window.communicate(timeout=30)
        assert window.returncode == 0, err[-3000:]
        assert "no window" not in err and out == ""
    finally:
        if window.poll() is None:
            window.kill()
            window.wait(10)


def test_the_page_reaches_the_api_and_opens_the_native_file_dialog(display: str, data_dir: Path) -> None:
    engine = DirectEngine.open(data_dir)
    engine.create(CreateOptions(name="alpha", ram="64M", cpus=1, firmware="bios", tpm="off"))
    engine.close()
    driver = Driver(display, "probe", str(data_dir))
    try:
        page = driver.expect("page")
        # The window opened the token link; the page then works by the cookie, which scripts cannot read.
        assert page["status"] == 200 and page["names"] == ["alpha"], page
        assert "token" not in page["href"] and page["href"].startswith("http://127.0.0.1:")
        assert page["cookie"] == "" and page["bridge"] == "function"
        before = window_ids(display)
        driver.go()
        driver.expect("file-dialog")
        dialog = wait_for("the file dialog", lambda: new_dialog(display, before))
        assert dialog["name"] == "Open file", dialog
        save("gui-file-dialog.png", screenshot(display))
        centre = (dialog["x"] + dialog["width"] // 2, dialog["y"] + dialog["height"] // 2)
        subprocess.run(["xdotool", "mousemove", str(centre[0]), str(centre[1]), "key", "Escape"],
                       env={"DISPLAY": display}, check=True, timeout=30)
        assert driver.expect("picked")["path"] is None   # cancelled: the page gets null
        dropped = driver.expect("dropped")
        assert dropped["page"] == dropped["bus"] == ["/srv/isos/debian 12.iso"]
        assert driver.expect("closed")["stopped_vms"] is False
        driver.finish()
    finally:
        driver.kill()


@pytest.mark.qemu
def test_closing_with_a_running_vm_asks_and_honours_the_answer(display: str, data_dir: Path, guest) -> None:
    engine = DirectEngine.open(data_dir)
    engine.create(CreateOptions(name="kept", iso=str(guest.iso), ram="256M", cpus=1, firmware="bios", tpm="off"))
    vm_id = engine.get("kept").id
    engine.close()
    state_file = data_dir / "vms" / vm_id / "run" / "state.json"
    pid = None
    try:
        # First window: the VM is started, then the window closed; "Cancel" leaves it running.
        driver = Driver(display, "close", str(data_dir), "kept", "--start")
        try:
            driver.expect("booted")
            shown = driver.expect("shown")
            pid = shown["pid"]
            assert shown["state"] == "running" and shown["attached"] is True
            before = window_ids(display)
            driver.go()
            driver.expect("closing")
            dialog = wait_for("the question about running VMs", lambda: new_dialog(display, before))
            save("gui-close-question.png", screenshot(display))
            subprocess.run(["xdotool", "mousemove", str(dialog["x"] + dialog["width"] // 2),
                            str(dialog["y"] + dialog["height"] // 2), "key", "Escape"],
                           env={"DISPLAY": display}, check=True, timeout=30)
            assert driver.expect("closed")["stopped_vms"] is False
            driver.finish()
        finally:
            driver.kill()
        assert process.is_alive(pid), "Cancel must leave the VM running"

        # Second window: it re-attaches to the VM; "OK" stops it, by the guest's own shutdown.
        driver = Driver(display, "close", str(data_dir), "kept")
        try:
            shown = driver.expect("shown")
            assert (shown["state"], shown["attached"], shown["pid"]) == ("running", True, pid)
            before = window_ids(display)
            driver.go()
            driver.expect("closing")
            dialog = wait_for("the question about running VMs", lambda: new_dialog(display, before))
            # OK is the right-hand button of GTK's OK/Cancel row, at the dialog's bottom edge.
            subprocess.run(["xdotool", "mousemove", str(dialog["x"] + dialog["width"] * 3 // 4),
                            str(dialog["y"] + dialog["height"] - 16), "click", "1"],
                           env={"DISPLAY": display}, check=True, timeout=30)
            assert driver.expect("closed")["stopped_vms"] is True
            driver.finish()
        finally:
            driver.kill()
        assert not process.is_alive(pid), "OK must stop the VM"
        assert not state_file.exists()
        last_exit = json.loads((state_file.parent / "last-exit.json").read_text())
        assert last_exit["state"] == "stopped"
        events = (data_dir / "vms" / vm_id / "logs" / "events.log").read_text()
        assert "re-attached" in events and "pressing the ACPI power button" in events
    finally:
        if state_file.exists():
            record = json.loads(state_file.read_text())
            process.kill(int(record["pid"]), str(record.get("token", "")))


def test_without_a_display_it_serves_and_says_why(data_dir: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["PYTHONPATH"] = str(REPO)
    served = subprocess.Popen([sys.executable, "-m", "thalunix", "--data-dir", str(data_dir)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert served.stdout is not None
        link = served.stdout.readline().strip()
        assert link.startswith("http://127.0.0.1:") and "/?token=" in link
        browser = requests.Session()
        assert browser.get(link, timeout=30).status_code == 200
        assert browser.get(link.split("/?")[0] + "/api/vms", timeout=30).json() == []
        served.send_signal(signal.SIGTERM)
        out, err = served.communicate(timeout=30)
        assert served.returncode == 0
        assert out == ""   # the link was the only line
        assert "no window: no graphical display" in err and "serving the interface instead" in err
    finally:
        if served.poll() is None:
            served.kill()
            served.wait(10)
