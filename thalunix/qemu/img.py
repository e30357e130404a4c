"""qemu-img, wrapped: create, inspect and convert images with errors a person can act on.

Example::

    img = QemuImg(runtime.require_qemu_img())
    img.create(Path("disk.qcow2"), 20 << 30)
    img.info(Path("disk.qcow2"))["virtual-size"]
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from thalunix.errors import ThalunixError, ValidationError


class ImageError(ThalunixError):
    """qemu-img refused or failed; the message carries its words."""

    code = "image"
    http_status = 400


class QemuImg:
    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def _run(self, *args: str, what: str, timeout: float = 600) -> str:
        try:
            done = subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, errors="replace")
        except OSError as error:
            raise ImageError(f"{what}: cannot run {self.binary}: {error}") from None
        except subprocess.TimeoutExpired:
            raise ImageError(f"{what}: qemu-img did not finish in {timeout:.0f} s") from None
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip().replace(f"{self.binary}: ", "")
            raise ImageError(f"{what}: {message}")
        return done.stdout

    def create(self, path: Path, size: int, fmt: str = "qcow2") -> None:
        """Create a new image; refuses to overwrite an existing file."""
        if path.exists():
            raise ValidationError(f"disk image {path} already exists; pick another name or attach it as is", "disk")
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.creating")
        try:
            self._run("create", "-q", "-f", fmt, str(temp), str(size), what=f"creating disk {path.name}")
            temp.replace(path)
        finally:
            temp.unlink(missing_ok=True)

    def convert(self, source: Path, target: Path, target_format: str, source_format: str | None = None) -> None:
        temp = target.with_name(f".{target.name}.converting")
        args = ["convert", "-O", target_format]
        if source_format:
            args += ["-f", source_format]
        try:
            self._run(*args, str(source), str(temp), what=f"converting {source.name}")
            temp.replace(target)
        finally:
            temp.unlink(missing_ok=True)

    def info(self, path: Path) -> dict[str, Any]:
        # -U: readable while a running VM holds the image's write lock.
        return json.loads(self._run("info", "-U", "--output=json", str(path), what=f"reading {path.name}"))
