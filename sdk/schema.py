"""Request and response formats from Python types, and validation against them.

Rules:
- Dataclasses and TypedDicts become JSON-schema-like objects: {"type": "object", "title",
  "properties", "required", "additionalProperties": false} (load() refuses unknown fields);
  str, int, float, bool, None, list[T], dict[str, T], T | None and
  Any map to their JSON counterparts. These descriptions go into the registry.
- `load(tp, value)` checks a decoded JSON value against a type and builds it (dataclasses are
  instantiated); the first problem raises SchemaError naming the field path.
- `dump(value)` turns dataclasses back into plain JSON values.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Union, get_args, get_origin, get_type_hints, is_typeddict


class SchemaError(ValueError):
    """A value does not fit its type; str() names the field."""


_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def describe(tp: Any) -> dict[str, Any]:
    if tp is Any or tp is None or tp is type(None):  # `T | None` holds NoneType
        return {} if tp is Any else {"type": "null"}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    origin = get_origin(tp)
    if origin in (list, tuple, set, typing.List):  # noqa: UP006
        args = get_args(tp)
        return {"type": "array", "items": describe(args[0]) if args else {}}
    if origin is dict:
        args = get_args(tp)
        return {"type": "object", "additionalProperties": describe(args[1]) if args else {}}
    if origin in (Union, types.UnionType):
        return {"anyOf": [describe(a) for a in get_args(tp)]}
    if dataclasses.is_dataclass(tp) or is_typeddict(tp):
        hints = get_type_hints(tp)
        if dataclasses.is_dataclass(tp):
            required = [f.name for f in dataclasses.fields(tp)
                        if f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING]
        else:
            required = sorted(getattr(tp, "__required_keys__", hints))
        return {"type": "object", "title": tp.__name__,
                "properties": {k: describe(v) for k, v in hints.items()},
                "required": required, "additionalProperties": False}  # load() refuses them
    raise TypeError(f"cannot describe {tp!r}: use dataclasses, TypedDicts, str, int, float, "
                    "bool, list, dict or Optional")


@functools.lru_cache(maxsize=1024)
def _fields(tp: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(type hints, required names) of a dataclass or TypedDict, worked out once per type:
    get_type_hints on every request was a tenth of a small service's CPU."""
    return get_type_hints(tp), tuple(describe(tp)["required"])


def _kind(value: Any) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def load(tp: Any, value: Any, path: str = "") -> Any:
    here = path or "request"
    if tp is Any:
        return value
    if tp is None or tp is type(None):
        if value is not None:
            raise SchemaError(f"field {here!r}: expected null, got {_kind(value)}")
        return None
    if tp in _SCALARS:
        ok = type(value) is tp or (tp is float and type(value) is int)
        if not ok:
            raise SchemaError(f"field {here!r}: expected {_SCALARS[tp]}, got {_kind(value)}")
        return float(value) if tp is float else value
    origin = get_origin(tp)
    if origin in (list, tuple, set):
        if type(value) is not list:
            raise SchemaError(f"field {here!r}: expected array, got {_kind(value)}")
        args = get_args(tp)
        item = args[0] if args else Any
        return [load(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if type(value) is not dict:
            raise SchemaError(f"field {here!r}: expected object, got {_kind(value)}")
        args = get_args(tp)
        return {k: load(args[1] if args else Any, v, f"{path}.{k}" if path else k)
                for k, v in value.items()}
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return load(option, value, path)
            except SchemaError as exc:
                errors.append(str(exc))
        raise SchemaError(errors[0])
    if dataclasses.is_dataclass(tp) or is_typeddict(tp):
        if type(value) is not dict:
            raise SchemaError(f"field {here!r}: expected object, got {_kind(value)}")
        hints, required = _fields(tp)
        for name in required:
            if name not in value:
                raise SchemaError(f"field {(path + '.' if path else '') + name!r}: missing")
        unknown = [k for k in value if k not in hints]
        if unknown:
            raise SchemaError(f"field {(path + '.' if path else '') + unknown[0]!r}: unknown "
                              f"field (known: {', '.join(hints)})")
        built = {k: load(hints[k], v, f"{path}.{k}" if path else k) for k, v in value.items()}
        return tp(**built) if dataclasses.is_dataclass(tp) else built
    raise TypeError(f"unsupported type {tp!r}")


_PLAIN = frozenset({bytes, str, int, float, bool, type(None)})


def dump(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: dump(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [dump(v) for v in value]
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    return value
