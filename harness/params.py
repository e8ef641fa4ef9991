"""Typed parameters: dataclasses parsed and checked from TOML tables.

Methods and metrics declare their parameters as a dataclass; ``help`` in a field's
metadata documents it. :func:`parse` turns a TOML table into that dataclass, naming the
field and the expected type on a mismatch and suggesting the closest name for a typo.
A dataclass may define ``check(self)`` raising ``ValueError`` for range checks; a
message that starts with a field's name is reported against that field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, Union, get_args, get_origin

from .errors import did_you_mean


class ParamError(ValueError):
    """A parameter that does not fit its declared type or range: ``field: message``."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def param(default: Any = MISSING, *, help: str = "", default_factory: Any = MISSING) -> Any:
    """A dataclass field with a help text (shown by ``moebench methods``)."""
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class NoParams:
    """For methods and metrics without parameters."""


def parse(cls: type, table: dict[str, Any]) -> Any:
    """Build the parameter dataclass ``cls`` from a TOML table, checking names, types and ranges."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in table:
        if key not in known:
            raise ParamError(key, f"unknown parameter{did_you_mean(key, known)}; expected one of {', '.join(known) or 'none'}")
    values = {}
    for name, f in known.items():
        if name in table:
            values[name] = coerce(table[name], hints[name], name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ParamError(name, f"required parameter missing (type {type_name(hints[name])})")
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ParamError:
            raise
        except ValueError as exc:
            # by convention a check message starts with the field it is about
            words = str(exc).split()
            name = words[0] if words and words[0] in known else "params"
            raise ParamError(name, str(exc)) from None
    return obj


def coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` as type ``hint`` (ints widen to floats, lists to tuples), else a ParamError."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ParamError as exc:
                errors.append(exc)
        raise ParamError(name, f"expected {type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ParamError(name, f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}{did_you_mean(value, map(str, args))}")
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamError(name, f"expected a list ({type_name(hint)}), got {value!r}")
        item = args[0] if args else Any
        items = [coerce(v, item, name) for v in value]
        return tuple(items) if (origin or hint) is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ParamError(name, f"expected a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return parse(hint, value)
    else:
        return value
    raise ParamError(name, f"expected {type_name(hint)}, got {value!r}")


def type_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{type_name(args[0]) if args else 'any'}]"
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def is_list_type(hint: Any) -> bool:
    """Whether a field's type is itself a list (so a TOML list is a value, not a grid axis)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(is_list_type(a) for a in get_args(hint) if a is not type(None))
    return origin in (list, tuple) or hint in (list, tuple)


def describe(cls: type) -> list[dict[str, str]]:
    """One row per parameter: name, type, default, help (for ``moebench methods``)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in fields(cls):
        if f.default is not MISSING:
            default = repr(f.default)
        elif f.default_factory is not MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append({"name": f.name, "type": type_name(hints[f.name]), "default": default, "help": f.metadata.get("help", "")})
    return rows


def to_dict(obj: Any) -> dict[str, Any]:
    """Parameters as plain JSON-able values (for records and run ids)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}
