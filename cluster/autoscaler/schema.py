"""Build frozen config dataclasses from parsed YAML, with errors that name the field's path.

``build(cls, data, path)`` checks that ``data`` is a mapping, that it has no key ``cls`` does
not declare and every field without a default, converts each value by the field's type
(int, float, str, bool, ``X | None``, ``tuple[str, ...]``, ``Mapping[str, int]``, nested
dataclasses), then constructs ``cls``. A ``ValueError`` from the class's own validation
(``"field: value, the limit"``) comes back prefixed with ``path``:
``scheduled.seasons[1].max_replicas: 0 is below min_replicas 1``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any


def where(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def check_keys(data: Any, path: str, known: list[str], required: list[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{path or 'the config'}: expected a mapping, got {type(data).__name__} {data!r}")
    for key in data:
        if key not in known:
            raise ValueError(f"{where(path, str(key))}: unknown key; known keys here: {', '.join(known)}")
    for key in required:
        if key not in data:
            raise ValueError(f"{where(path, key)}: missing (required)")
    return data


def convert(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(value, inner, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        (inner, _) = typing.get_args(hint)
        return tuple(convert(v, inner, where(path, i)) for i, v in enumerate(value))
    if origin in (Mapping, dict, typing.Mapping):
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return {convert(k, key_hint, path): convert(v, value_hint, where(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    raise TypeError(f"{path}: no conversion for {hint!r}")  # a field type this module does not know


def build(cls: type, data: Any, path: str, *, fixed: Mapping[str, Any] | None = None,
          custom: Mapping[str, Any] | None = None) -> Any:
    """``cls`` from ``data``. ``fixed``: fields set by the caller, not the file (a profile's
    name is its key). ``custom``: field -> function(value, path) for fields it converts."""
    fixed, custom = fixed or {}, custom or {}
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in fixed]
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    data = check_keys(data, path, [f.name for f in fields], required)
    kwargs = dict(fixed)
    for f in fields:
        if f.name in data:
            at = where(path, f.name)
            kwargs[f.name] = custom[f.name](data[f.name], at) if f.name in custom else convert(data[f.name], hints[f.name], at)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{path}.{exc}" if path else str(exc)) from None
