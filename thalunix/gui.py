"""The Thalunix window: a pywebview window around the local API's page, with native file dialogs.

The page talks only to the API (same as in a browser); the window adds what a browser cannot:
``window.pywebview.api.pick_file(kind)`` / ``pick_folder()`` open the system's file dialog and
return the full path, and files dropped on the page arrive with their full path as a
``thalunix-drop`` DOM event (``event.detail.paths``). Closing the window while VMs run asks
whether to stop them or leave them running; left running, the next Thalunix re-attaches.

Example::

    reason = window_unavailable_reason()       # None where a window can open
    if reason is None:
        run_window(engine)                     # blocks until the window is closed
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

from thalunix.api import ApiServer
from thalunix.engine import DirectEngine

log = logging.getLogger("thalunix.gui")

TITLE = "Thalunix"
FILE_TYPES = {
    "iso": ("Disc images (*.iso;*.img)", "All files (*.*)"),
    "disk": ("Disk images (*.qcow2;*.img;*.raw;*.vmdk;*.vdi;*.vhdx;*.vhd)", "All files (*.*)"),
    "export": ("Thalunix exports (*.7z)", "All files (*.*)"),
    "any": ("All files (*.*)",),
}
#: States in which closing the window has something to ask about.
ACTIVE_STATES = ("starting", "running", "paused", "stopping")


def window_unavailable_reason() -> str | None:
    """None when a window can open here; otherwise why not, in words for the user."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no graphical display (DISPLAY is not set)"
    try:
        import webview  # noqa: F401
    except ImportError:
        return "pywebview is not installed (pip install 'thalunix[gui]')"
    if sys.platform.startswith("linux"):
        try:
            import gi
            gi.require_version("Gtk", "3.0")
            try:
                gi.require_version("WebKit2", "4.1")
            except ValueError:
                gi.require_version("WebKit2", "4.0")
            from gi.repository import Gtk, WebKit2  # noqa: F401
        except (ImportError, ValueError) as error:
            return f"GTK WebKit is missing ({error}); install gir1.2-webkit2-4.1 (Debian/Ubuntu)"
    return None


class Bridge:
    """What the page may call as ``window.pywebview.api.*``. Only public methods are exposed."""

    def __init__(self) -> None:
        # Underscored: pywebview exposes public attributes to the page, and the window must not be one.
        self._window: Any = None

    def pick_file(self, kind: str = "any") -> str | None:
        """Open the system's file dialog; the chosen file's full path, or None if cancelled."""
        import webview
        chosen = self._window.create_file_dialog(webview.FileDialog.OPEN, allow_multiple=False,
                                                 file_types=FILE_TYPES.get(kind, FILE_TYPES["any"]))
        return str(chosen[0]) if chosen else None

    def pick_folder(self) -> str | None:
        import webview
        chosen = self._window.create_file_dialog(webview.FileDialog.FOLDER)
        return str(chosen[0]) if chosen else None


def running_vms(engine: DirectEngine) -> list[str]:
    """Names of the VMs this process drives that are still up."""
    return sorted(session.config.name for session in list(engine.supervisor.sessions.values())
                  if not session.exited.is_set() and session.state in ACTIVE_STATES)


def close_question(names: list[str]) -> tuple[str, str]:
    """Title and text of the question asked when the window closes with ``names`` running."""
    listed = ", ".join(repr(name) for name in names)
    many = len(names) > 1
    them = "them" if many else "it"
    # GTK shows only the text, not the title: the text asks the whole question.
    return ("Stop the running VMs?" if many else "Stop the running VM?",
            f"{listed} {'are' if many else 'is'} still running. Stop {them} before closing?\n\n"
            f"OK stops {them} now (each guest is asked to shut down first).\n"
            f"Cancel leaves {them} running; Thalunix finds {them} again the next time it opens.")


class CloseGuard:
    """Decides what closing the window means for running VMs; asks once, off the GUI thread.

    pywebview runs the ``closing`` handler on the GUI thread and a dialog needs that thread free, so
    the first close is cancelled, the question asked from a worker, and the window closed again
    with the answer known.
    """

    def __init__(self, engine: DirectEngine, ask: Callable[[list[str]], bool],
                 close: Callable[[], None]) -> None:
        self.engine = engine
        self.ask = ask
        self.close = close
        #: None until decided; True = stop the VMs, False = leave them running.
        self.stop_vms: bool | None = None
        self._asking = threading.Lock()

    def on_closing(self) -> bool | None:
        if self.stop_vms is not None:
            return None
        names = running_vms(self.engine)
        if not names:
            self.stop_vms = False
            return None
        if self._asking.acquire(blocking=False):
            threading.Thread(target=self._decide, args=(names,), name="thalunix-close", daemon=True).start()
        return False   # not yet: the answer closes the window again

    def _decide(self, names: list[str]) -> None:
        try:
            self.stop_vms = bool(self.ask(names))
        except Exception:  # noqa: BLE001 - a failed dialog must not trap the user in the window
            log.exception("asking about running VMs failed; leaving them running")
            self.stop_vms = False
        self.close()


def _on_drop(window: Any, bus: Any, event: dict[str, Any]) -> None:
    files = (event.get("dataTransfer") or {}).get("files") or []
    paths = [item["pywebviewFullPath"] for item in files if item.get("pywebviewFullPath")]
    if not paths:
        return
    bus.publish("ui.drop", paths=paths)
    window.evaluate_js("window.dispatchEvent(new CustomEvent('thalunix-drop', {detail: {paths: %s}}))"
                       % json.dumps(paths))


def _attach_drop(window: Any, bus: Any) -> None:
    from webview.dom import DOMEventHandler
    document = window.dom.document
    # dragover must be cancelled or the page never gets the drop.
    document.events.dragover += DOMEventHandler(lambda event: None, prevent_default=True, debounce=500)
    document.events.drop += DOMEventHandler(lambda event: _on_drop(window, bus, event), prevent_default=True,
                                            stop_propagation=True)


class FolderProblemBridge(Bridge):
    """The page of :func:`ask_for_another_folder`: choose a folder, or quit."""

    def __init__(self) -> None:
        super().__init__()
        self._chosen: str | None = None

    def choose(self) -> str | None:
        chosen = self.pick_folder()
        if chosen:
            self._chosen = chosen
            threading.Thread(target=self._window.destroy, daemon=True).start()
        return chosen

    def quit(self) -> None:
        threading.Thread(target=self._window.destroy, daemon=True).start()


def folder_problem_page(message: str) -> str:
    import html
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{TITLE}</title></head>"
            "<body style='font-family:sans-serif;margin:1.5em;line-height:1.4'>"
            "<h2>Thalunix cannot use its data folder</h2>"
            f"<p id='message'>{html.escape(message)}</p>"
            "<p>Thalunix keeps its VMs, disks and settings in one folder. Choose a writable folder for them "
            "(it is used for this run; start Thalunix with <code>--data-dir</code> to use it again).</p>"
            "<button id='choose' onclick='window.pywebview.api.choose()'>Choose another folder…</button> "
            "<button id='quit' onclick='window.pywebview.api.quit()'>Quit</button></body></html>")


def ask_for_another_folder(message: str) -> str | None:
    """The data folder cannot be used (a read-only stick, a full disk): say so in a small window with a folder
    picker. Returns the folder chosen, or None when the user quit."""
    import webview
    bridge = FolderProblemBridge()
    window = webview.create_window(TITLE, html=folder_problem_page(message), js_api=bridge, width=680,
                                   height=320)
    bridge._window = window
    webview.start(private_mode=True)
    return bridge._chosen


def run_window(engine: DirectEngine, server: ApiServer | None = None, width: int = 1200, height: int = 800,
               on_shown: Callable[[Any], None] | None = None) -> bool:
    """Serve the API, open the window on it, block until it closes; returns whether VMs were stopped.

    VMs an earlier Thalunix left running are re-attached first. The caller leaves the process
    with ``os._exit`` afterwards: pywebview can leave a non-daemon thread behind on quit.
    """
    import webview

    engine.attach_running()
    own_server = server is None
    server = server or ApiServer(engine).start()
    bridge = Bridge()
    window = webview.create_window(TITLE, server.launch_url, js_api=bridge, width=width, height=height,
                                   min_size=(640, 480))
    bridge._window = window
    guard = CloseGuard(engine, ask=lambda names: bool(window.create_confirmation_dialog(*close_question(names))),
                       close=window.destroy)
    window.events.closing += guard.on_closing
    window.events.loaded += lambda: _attach_drop(window, engine.bus)
    if on_shown is not None:
        window.events.shown += lambda: on_shown(window)

    def leave(*_: Any) -> None:
        # SIGTERM or Ctrl+C: nobody is there to answer a question, so VMs are left running.
        if guard.stop_vms is None:
            guard.stop_vms = False
        threading.Thread(target=window.destroy, daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, signal.SIGINT):
            previous[number] = signal.signal(number, leave)
    try:
        webview.start(private_mode=True)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        stop = bool(guard.stop_vms)
        engine.close(stop_vms=stop)
        if own_server:
            server.stop()
    return stop
