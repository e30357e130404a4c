"""Sizes with units, as people type them: ``2G``, ``512M``, ``2048``, ``1.5 GiB``.

Example::

    >>> parse_size("20G")
    21474836480
    >>> parse_ram_mib("2G"), parse_ram_mib("2048")
    (2048, 2048)
    >>> format_size(21474836480)
    '20 GiB'
"""

from __future__ import annotations

import re

from thalunix.errors import ValidationError

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
# Binary units throughout: that is what qemu-img and QEMU's -m mean by "G".
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, *, field: str = "size", default_unit: str = "") -> int:
    """Return a size in bytes; a bare number is in ``default_unit`` (bytes unless told)."""
    if isinstance(text, bool):
        raise ValidationError(f"{field}: expected a size like 20G, got {text!r}", field)
    if isinstance(text, int):
        value, unit = float(text), default_unit
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ValidationError(
                f"{field}: {text!r} is not a size; write a number with a unit, like 512M, 20G or 1T",
                field)
        value, unit = float(match.group(1)), match.group(2) or default_unit
    multiplier = _UNITS.get(unit.lower())
    if multiplier is None:
        raise ValidationError(f"{field}: unknown unit {unit!r} in {text!r}; use K, M, G or T", field)
    result = int(value * multiplier)
    if result <= 0:
        raise ValidationError(f"{field}: {text!r} is zero; give a size above zero", field)
    return result


def parse_ram_mib(text: str | int) -> int:
    """RAM in MiB: a bare number means MiB (``2048``), as in QEMU's ``-m``."""
    size = parse_size(text, field="ram", default_unit="M")
    if size % (1 << 20):
        raise ValidationError(f"ram: {text!r} is not a whole number of MiB", "ram")
    return size >> 20


def format_size(size: int) -> str:
    """Render bytes the short human way (``20 GiB``, ``1.5 GiB``, ``512 MiB``)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            value = size / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"
