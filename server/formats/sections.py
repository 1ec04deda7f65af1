"""Typed config sections: a TOML/JSON table checked against a frozen dataclass.

``build_section(cls, data, where)`` returns ``cls(**data)`` after pydantic has checked every
key and value with JSON's strict rules: a string is never read as a bool or a number, a float
field takes an int, a tuple field takes a list, a ``Path`` field takes a string. Errors are a
``ConfigError`` naming the section, the key, the expected type and the value given.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key."""


@functools.cache
def _adapter(cls: type[Any]) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(cls)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _holds_built(value: Any) -> bool:
    """True for objects the caller already built (dataclass instances, also inside tuples)."""
    if dataclasses.is_dataclass(value):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_built(v) for v in value)
    return False


def _describe(err: Mapping[str, Any], where: str) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    key = f"{where} {loc}".strip() if loc else where
    if err.get("type") == "missing":
        return f"{key}: required key is missing"
    if err.get("type") == "unexpected_keyword_argument":
        return f"{key}: unknown key"
    given = err.get("input")
    return f"{key}: {err.get('msg', 'invalid value')} (got {given!r})"


def build_section(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """``cls`` built from ``data`` (one config table), every value type-checked.

    Unknown keys are an error listing the allowed ones; values that are already built objects
    (nested dataclasses the caller constructed) are passed through untouched.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    built = {k: v for k, v in data.items() if _holds_built(v)}
    plain = {k: _jsonable(v) for k, v in data.items() if k not in built}
    errors = []
    checked: dict[str, Any] = {}
    for name, value in plain.items():
        hint = _field_type(cls, name)
        try:
            checked[name] = _adapter(hint).validate_json(json.dumps(value), strict=True)
        except pydantic.ValidationError as e:
            errors += [_describe({**err, "loc": (name, *err["loc"])}, where) for err in e.errors()]
        except pydantic.PydanticSchemaGenerationError:
            checked[name] = data[name]  # a type pydantic cannot describe: the dataclass checks it
    if errors:
        raise ConfigError("; ".join(errors))
    try:
        return cls(**checked, **built)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _field_type(cls: type[Any], name: str) -> Any:
    return typing.get_type_hints(cls)[name]
