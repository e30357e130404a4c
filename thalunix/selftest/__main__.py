"""Reassemble ``selftest.asm`` with nasm and rewrite the embedded bytes in ``__init__.py``.

Developer tool only; the runtime never needs nasm.

Example::

    python -m thalunix.selftest            # rewrites thalunix/selftest/__init__.py
    python -m thalunix.selftest --check    # exits 1 if the embedded bytes are stale
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASM = HERE / "selftest.asm"
INIT = HERE / "__init__.py"


def assemble(asm: Path = ASM) -> bytes:
    """Assemble ``asm`` with nasm into a flat binary and return its bytes."""
    nasm = shutil.which("nasm")
    if nasm is None:
        raise SystemExit("nasm was not found on PATH: install it (apt-get install nasm) to regenerate the image")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "selftest.bin"
        subprocess.run([nasm, "-f", "bin", "-o", str(out), str(asm)], check=True)
        return out.read_bytes()


def literal(image: bytes) -> str:
    """The ``_SELFTEST_B64 = (...)`` block for ``__init__.py``."""
    lines = textwrap.wrap(base64.b64encode(image).decode("ascii"), 76)
    body = "\n".join(f'    "{line}"' for line in lines)
    return f"_SELFTEST_B64 = (\n{body}\n)\n"


def main(argv: list[str]) -> int:
    image = assemble()
    if len(image) != 512 or image[-2:] != b"\x55\xaa":
        print(f"selftest.asm assembled to {len(image)} bytes without a boot signature: it must be exactly 512")
        return 1
    text = INIT.read_text(encoding="utf-8")
    pattern = re.compile(r"(# BEGIN SELFTEST_IMAGE\n).*?(# END SELFTEST_IMAGE)", re.S)
    new_text = pattern.sub(lambda m: m.group(1) + literal(image) + m.group(2), text)
    if "--check" in argv:
        if new_text != text:
            print("thalunix/selftest/__init__.py is stale: run python -m thalunix.selftest")
            return 1
        return 0
    INIT.write_text(new_text, encoding="utf-8")
    print(f"wrote {len(image)} bytes into {INIT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
