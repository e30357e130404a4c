"""Plumbing shared by every model object: dict round-trips with clear type errors.

Each device family is a dataclass deriving from :class:`ModelObject`. Fields are
declared once (name, type, default); ``from_dict`` checks types and unknown keys
and names the exact field path in its error, so a hand-edited ``vm.json`` with a
typo says ``disks[1].bus: expected a string, got 3``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from thalunix.errors import ValidationError

T = TypeVar("T", bound="ModelObject")


class ModelObject:
    """Mixin for model dataclasses: ``to_dict``, ``from_dict``, ``set_defaults``."""

    def set_defaults(self, context: "Any" = None) -> None:  # pragma: no cover - trivial
        """Fill fields left empty with values that suit the VM (overridden per device)."""

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            result[field.name] = _to_plain(getattr(self, field.name))
        return result

    @classmethod
    def from_dict(cls: type[T], data: Any, where: str = "") -> T:
        label = where or cls.__name__
        if not isinstance(data, dict):
            raise ValidationError(f"{label}: expected an object, got {type(data).__name__}", where or None)
        hints, known = _class_info(cls)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValidationError(
                f"{label}: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"known fields are {', '.join(sorted(known))}", _join(where, unknown[0]))
        missing = [f.name for f in known.values() if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValidationError(f"{label}: missing required field {missing[0]!r}", _join(where, missing[0]))
        kwargs = {}
        for name, value in data.items():
            kwargs[name] = _from_plain(value, hints[name], _join(where, name))
        return cls(**kwargs)


@functools.lru_cache(maxsize=None)
def _class_info(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    # get_type_hints evaluates every string annotation anew; listing 500 VMs spent most of its time here.
    return get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _to_plain(value: Any) -> Any:
    if isinstance(value, ModelObject):
        return value.to_dict()
    if isinstance(value, list):
        return [_to_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    return value


_TYPE_NAMES = {str: "a string", int: "a whole number", bool: "true or false", float: "a number"}


def _from_plain(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _from_plain(value, option, where)
            except ValidationError as error:
                errors.append(str(error))
        raise ValidationError(errors[0] if errors else f"{where}: bad value {value!r}", where)
    if origin is list:
        if not isinstance(value, list):
            raise ValidationError(f"{where}: expected a list, got {type(value).__name__}", where)
        (item_hint,) = get_args(hint)
        return [_from_plain(item, item_hint, f"{where}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValidationError(f"{where}: expected an object, got {type(value).__name__}", where)
        _, item_hint = get_args(hint)
        return {str(key): _from_plain(item, item_hint, f"{where}.{key}") for key, item in value.items()}
    if isinstance(hint, type) and issubclass(hint, ModelObject):
        return hint.from_dict(value, where)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int in Python; a JSON true must not pass as a vCPU count.
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        wanted = _TYPE_NAMES.get(hint, hint.__name__)
        raise ValidationError(f"{where}: expected {wanted}, got {value!r}", where)
    return value


def choice(value: str, allowed: typing.Iterable[str], field: str, what: str) -> str:
    """Check ``value`` is one of ``allowed``; the error lists the choices."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValidationError(f"{field}: {value!r} is not a valid {what}; choose one of {', '.join(allowed)}",
                              field)
    return value
