"""qemu-img, wrapped: create, inspect, resize, convert (with live progress), check and snapshot images.

Every method raises :class:`ImageError` carrying qemu-img's own words and the file's
name. Writes that produce a new file go to a temporary name beside it and are renamed
into place when complete, so a crash never leaves a half-written image under the real name.

Example::

    img = QemuImg(runtime.require_qemu_img())
    img.create(Path("disk.qcow2"), 20 << 30)
    img.info(Path("disk.qcow2"))["virtual-size"]
    img.convert(Path("disk.img"), Path("disk.qcow2"), "qcow2", progress=lambda pct: print(pct))
    img.check(Path("disk.qcow2"))["check-errors"]          # 0
    img.snapshot("create", Path("disk.qcow2"), "before-upgrade")
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from thalunix.errors import ThalunixError, ValidationError

#: ``qemu-img convert -p`` prints ``    (12.34/100%)`` followed by a carriage return.
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
SNAPSHOT_ACTIONS = {"create": "-c", "apply": "-a", "delete": "-d"}


class ImageError(ThalunixError):
    """qemu-img refused or failed; the message carries its words."""

    code = "image"
    http_status = 400


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # A qemu-img whose Thalunix was killed must not keep writing into a folder about to be swept.
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)   # PR_SET_PDEATHSIG, SIGKILL
    except Exception:  # noqa: BLE001 - best effort
        pass


def qcow2_backing_file(path: Path) -> str | None:
    """The backing file name written in a qcow2 header (as stored: often relative), or None.

    Read straight from the header so scanning every VM's disks for linked clones costs no qemu-img runs.
    """
    try:
        with open(path, "rb") as handle:
            header = handle.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not size or size > 4096:
                return None
            handle.seek(offset)
            return handle.read(size).decode("utf-8", errors="replace")
    except OSError:
        return None


class QemuImg:
    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def _run(self, *args: str, what: str, timeout: float = 600, ok_codes: tuple[int, ...] = (0,)) -> str:
        try:
            done = subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, errors="replace")
        except OSError as error:
            raise ImageError(f"{what}: cannot run {self.binary}: {error}") from None
        except subprocess.TimeoutExpired:
            raise ImageError(f"{what}: qemu-img did not finish in {timeout:.0f} s") from None
        if done.returncode not in ok_codes:
            raise ImageError(f"{what}: {self._words(done.stderr or done.stdout)}")
        return done.stdout

    def _words(self, output: str) -> str:
        lines = [line.replace(f"{self.binary}: ", "").replace("qemu-img: ", "") for line in output.strip().splitlines()]
        return "; ".join(line for line in lines if line) or "qemu-img failed without a message"

    def create(self, path: Path, size: int | None, fmt: str = "qcow2", backing: str | None = None,
               backing_format: str | None = None) -> None:
        """Create a new image (an overlay when ``backing`` is given); refuses to overwrite a file."""
        if path.exists():
            raise ValidationError(f"disk image {path} already exists; pick another name or attach it as is", "disk")
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.creating")
        args = ["create", "-q", "-f", fmt]
        if backing:
            # -u: the backing path may be relative to the overlay's final folder, not to where it is made.
            args += ["-u", "-b", backing, "-F", backing_format or "qcow2"]
        args.append(str(temp))
        if size is not None:
            args.append(str(size))
        try:
            self._run(*args, what=f"creating disk {path.name}")
            temp.replace(path)
        finally:
            temp.unlink(missing_ok=True)

    def convert(self, source: Path, target: Path, target_format: str, source_format: str | None = None,
                compress: bool = False, progress: Callable[[float], None] | None = None,
                track: Callable[[subprocess.Popen], None] | None = None) -> None:
        """Copy ``source`` into a new image ``target`` (flattening any backing chain), zeros left unallocated.

        ``progress`` gets 0–100 as qemu-img reports it; ``track`` gets the process (to kill it on cancel).
        """
        temp = target.with_name(f".{target.name}.converting")
        args = ["convert", "-p", "-O", target_format]
        if source_format:
            args += ["-f", source_format]
        if compress and target_format == "qcow2":
            args.append("-c")
        try:
            self._run_progress([*args, str(source), str(temp)], f"converting {source.name}", progress, track)
            temp.replace(target)
        finally:
            temp.unlink(missing_ok=True)

    def _run_progress(self, args: list[str], what: str, progress: Callable[[float], None] | None,
                      track: Callable[[subprocess.Popen], None] | None) -> None:
        kwargs: dict[str, Any] = {}
        if sys.platform.startswith("linux"):
            kwargs["preexec_fn"] = _die_with_parent
        try:
            proc = subprocess.Popen([str(self.binary), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, **kwargs)
        except OSError as error:
            raise ImageError(f"{what}: cannot run {self.binary}: {error}") from None
        if track:
            track(proc)
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read() if proc.stderr else b""),
                                  daemon=True)
        reader.start()
        assert proc.stdout is not None
        pending = b""
        while True:
            chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(64)
            if not chunk:
                break
            pending += chunk
            matches = list(_PROGRESS.finditer(pending))
            if matches:
                if progress:
                    progress(float(matches[-1].group(1)))
                pending = pending[matches[-1].end():]
            pending = pending[-256:]
        code = proc.wait()
        reader.join(5)
        if code != 0:
            if code < 0:
                raise ImageError(f"{what}: qemu-img was stopped (signal {-code})")
            raise ImageError(f"{what}: {self._words(b''.join(errors).decode('utf-8', 'replace'))}")

    def info(self, path: Path, backing_chain: bool = False) -> dict[str, Any]:
        # -U: readable while a running VM holds the image's write lock.
        args = ["info", "-U", "--output=json"]
        if backing_chain:
            args.append("--backing-chain")
        return json.loads(self._run(*args, str(path), what=f"reading {path.name}"))

    def resize(self, path: Path, size: int, fmt: str, shrink: bool = False) -> None:
        args = ["resize", "-q", "-f", fmt]
        if shrink:
            args.append("--shrink")
        self._run(*args, str(path), str(size), what=f"resizing {path.name}")

    def check(self, path: Path, fmt: str = "qcow2", repair: str | None = None) -> dict[str, Any]:
        """``qemu-img check`` as a dict (``check-errors``, ``leaks``, ``corruptions`` …); ``repair``: leaks|all."""
        args = ["check", "--output=json", "-f", fmt]
        if repair:
            if repair not in ("leaks", "all"):
                raise ValidationError(f"repair {repair!r}: choose leaks or all", "repair")
            args += ["-r", repair]
        # Exit 2: corruptions, 3: leaked clusters; both still print the report.
        output = self._run(*args, str(path), what=f"checking {path.name}", ok_codes=(0, 2, 3))
        try:
            report = json.loads(output)
        except ValueError:
            raise ImageError(f"checking {path.name}: qemu-img printed no report ({output.strip()[:200]})") from None
        report.setdefault("check-errors", 0)
        report.setdefault("leaks", 0)
        report.setdefault("corruptions", 0)
        return report

    def snapshot(self, action: str, path: Path, name: str) -> None:
        """Create, apply (revert to) or delete an internal snapshot of a stopped VM's image."""
        self._run("snapshot", SNAPSHOT_ACTIONS[action], name, str(path),
                  what=f"{action} snapshot {name!r} of {path.name}")

    def snapshots(self, path: Path) -> list[dict[str, Any]]:
        return list(self.info(path).get("snapshots", []))

    def rebase_unsafe(self, path: Path, backing: str, backing_format: str) -> None:
        """Point an overlay at another (identical) backing file path without touching data."""
        self._run("rebase", "-u", "-b", backing, "-F", backing_format, str(path), what=f"rebasing {path.name}")


def allocated_size(path: Path) -> int:
    """Bytes the file really occupies on disk (sparse files count only their data)."""
    with contextlib.suppress(OSError, AttributeError):
        return os.stat(path).st_blocks * 512
    with contextlib.suppress(OSError):
        return os.stat(path).st_size
    return 0
