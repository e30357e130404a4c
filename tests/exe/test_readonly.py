"""A data folder on read-only media: the CLI says what failed and what to do and exits; started for the window,
Thalunix says so in a window that offers another folder (or quitting)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A read-only filesystem (root ignores file modes, so a mode would prove nothing)."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    point = tmp_path / "stick"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def thalunix(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thalunix", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_cli_names_the_folder_and_the_way_out(read_only: Path) -> None:
    done = thalunix("--data-dir", str(read_only / "thalunix-data"), "vm", "list")
    assert done.returncode == 1 and done.stdout == ""
    assert f"data folder {read_only / 'thalunix-data'} is not writable" in done.stderr
    assert "read-only" in done.stderr and "--data-dir" in done.stderr


def test_window_explains_and_offers_another_folder(read_only: Path, tmp_path: Path) -> None:
    for tool in ("Xvfb", "xdotool"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing; run `python3 build.py setup`")
    display = f":{30 + os.getpid() % 30}"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "DISPLAY": display}
    app = None
    try:
        deadline = time.monotonic() + 30
        while not Path(f"/tmp/.X11-unix/X{display[1:]}").exists():
            assert time.monotonic() < deadline and xvfb.poll() is None, "Xvfb did not start"
            time.sleep(0.05)
        app = subprocess.Popen([sys.executable, "-m", "thalunix", "--data-dir", str(read_only / "thalunix-data")],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        found = subprocess.run(["xdotool", "search", "--sync", "--onlyvisible", "--name", "^Thalunix$"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert found.returncode == 0, found.stderr
        window = found.stdout.split()[0]
        time.sleep(2)   # the page's script and its pywebview bridge are ready shortly after the window maps
        shot = tmp_path / "readonly-window.png"
        subprocess.run(["import", "-window", "root", str(shot)], env=env, check=False, timeout=30)
        # Keyboard only (no window manager): Tab to "Choose another folder…", Tab to "Quit", Enter.
        subprocess.run(["xdotool", "windowfocus", "--sync", window, "key", "--delay", "200", "Tab", "Tab",
                        "Return"], env=env, timeout=30)
        out, errors = app.communicate(timeout=60)
        assert app.returncode == 1, errors   # quit without a folder: nothing was started
        assert "no window" not in errors
    finally:
        if app is not None and app.poll() is None:
            app.kill()
            app.communicate()
        xvfb.terminate()
        xvfb.wait(10)
