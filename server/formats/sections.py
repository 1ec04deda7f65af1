"""Typed config sections: a TOML/JSON table checked against a frozen dataclass.

``build_section(cls, data, where)`` returns ``cls(**data)`` after pydantic has checked every
key and value with JSON's strict rules: a string is never read as a bool or a number, a float
field takes an int, a tuple field takes a list, a ``Path`` field takes a string. Errors are a
``ConfigError`` naming the section, the key, the expected type and the value given, e.g.
``[train] lr: Input should be a valid number (got 'fast')``. ``load_file`` reads a config file
and prefixes every error with its path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key."""


def type_hints(cls: Any) -> dict[str, Any]:
    """``cls``'s resolved annotations, resolved once per class (every section load and CLI
    option asks)."""
    return _type_hints(cls)


@functools.cache
def _type_hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _adapter(hint: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(hint)


_NAMES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    type(None): "none",
    Any: "any",
}


def type_name(hint: Any) -> str:
    """``hint`` as a config user reads it: ``number | none``, ``array of string``, ``"a" | "b"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _NAMES:
        return _NAMES[hint]
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (tuple, list, frozenset, set):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"array [{', '.join(type_name(a) for a in args)}]"
        return f"array of {type_name(args[0])}" if args else "array"
    if origin is not None and issubclass(origin, Mapping):
        return f"table of {type_name(args[1])}" if args else "table"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"table ({hint.__name__})"
    return getattr(hint, "__name__", str(hint))


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


def _key(where: str, name: str) -> str:
    return f"{where} {name}" if where else name


def _nested(key: str, loc: tuple[Any, ...]) -> str:
    return key + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _subsection(where: str, name: str) -> str:
    if where.startswith("[") and where.endswith("]"):
        return f"[{where[1:-1]}.{name}]"
    return f"[{name}]" if not where else f"{where} {name}"


def table_class(hint: Any) -> type[Any] | None:
    """The dataclass a field holds (``X`` or ``X | None``), built as a nested section."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def table_array_class(hint: Any) -> type[Any] | None:
    """The dataclass an array-of-tables field holds (``tuple[X, ...]``, or that ``| None``)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if len(args) != 1 or typing.get_origin(args[0]) is not tuple:
        return None
    item = typing.get_args(args[0])
    if len(item) == 2 and item[1] is Ellipsis:
        return table_class(item[0])
    return None


def default_of(f: dataclasses.Field[Any]) -> Any:
    """``f``'s default (its factory called), or ``dataclasses.MISSING`` when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _defaults(f: dataclasses.Field[Any] | None) -> dict[str, Any]:
    """The init fields of ``f``'s default when that is a dataclass instance; else empty."""
    if f is None:
        return {}
    value = default_of(f)
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return {}
    return {g.name: getattr(value, g.name) for g in dataclasses.fields(value) if g.init}


def _is_union(hint: Any) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) > 1


def check_value(hint: Any, value: Any, where: str) -> Any:
    """``value`` validated as ``hint`` (strict JSON rules) and converted; ``ConfigError`` naming
    ``where`` (the key), the expected type and the value otherwise."""
    try:
        text = json.dumps(_jsonable(value))
    except TypeError:  # a TOML date or time: no config key takes one
        expected = type_name(hint)
        raise ConfigError(f"{where}: Input should be {expected} (got {_shown(value)})") from None
    try:
        return _adapter(hint).validate_json(text, strict=True)
    except pydantic.PydanticSchemaGenerationError:
        return value  # a type pydantic cannot describe: the dataclass checks it
    except pydantic.ValidationError as e:
        if _is_union(hint):
            raise ConfigError(
                f"{where}: Input should be {type_name(hint)} (got {_shown(value)})"
            ) from None
        raise ConfigError("; ".join(_describe(err, where) for err in e.errors())) from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(err: Mapping[str, Any], where: str) -> str:
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "missing":
        if loc and isinstance(loc[-1], int):
            return f"{_nested(where, loc[:-1])}: too few items"
        return f"{_nested(where, loc)}: required key is missing"
    key = _nested(where, loc)
    return f"{key}: {err.get('msg', 'invalid value')} (got {_shown(err.get('input'))})"


def table(value: Any, where: str) -> dict[str, Any]:
    """``value`` as a dict when it is a table; ``ConfigError`` naming ``where`` otherwise."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a table (got {_shown(value)})")
    return dict(value)


def check_fields(
    cls: type[Any],
    data: Mapping[str, Any],
    where: str,
    *,
    extra: Mapping[str, Any] = {},
    exclude: Collection[str] = (),
) -> dict[str, Any]:
    """``data`` with each value checked against (and converted to) the type of ``cls``'s field of
    that name, or ``extra``'s type for keys that are not fields; unknown keys (``exclude``d
    fields too) are an error listing the allowed ones. Already built objects (nested
    dataclasses) pass through untouched; a table given for a dataclass field is built with
    ``build_section`` under the name ``[where.key]``, and each table of an array given for a
    ``tuple[dataclass, ...]`` field under ``[[where.key] #n]``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = table(data, where or "the top level")
    hints = type_hints(cls)
    fields = dataclasses.fields(cls)
    by_name = {f.name: f for f in fields}
    known = {f.name: hints[f.name] for f in fields if f.init and f.name not in exclude}
    known |= extra
    unknown = sorted(set(data) - set(known))
    if unknown:
        at = where or "the top level"
        raise ConfigError(f"{at}: unknown keys {unknown}; allowed: {sorted(known)}")
    errors: list[str] = []
    checked: dict[str, Any] = {}
    for name, value in data.items():
        try:
            if _holds_built(value):
                checked[name] = value
            elif (sub := table_class(known[name])) is not None and isinstance(value, Mapping):
                # a nested table overrides the keys it gives of the field's default, if any
                merged = {**_defaults(by_name.get(name)), **value}
                checked[name] = build_section(sub, merged, _subsection(where, name))
            elif (sub := table_array_class(known[name])) is not None and isinstance(value, list):
                # an array of tables: each entry built on its own, so its unknown keys are named
                at = _subsection(where, name)
                checked[name] = tuple(
                    build_section(sub, item, f"[{at}] #{k + 1}") for k, item in enumerate(value)
                )
            else:
                checked[name] = check_value(known[name], value, _key(where, name))
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(errors))
    return checked


def build_section(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """``cls`` built from ``data`` (one config table), every value type-checked (``check_fields``).

    Raises ``ConfigError`` for unknown keys, wrong types and missing required keys; the
    dataclass's own checks (``__post_init__``) raise their ``ValueError`` unchanged.
    """
    checked = check_fields(cls, data, where)
    hints = type_hints(cls)
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init
        and f.name not in checked
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        need = ", ".join(f"{m} ({type_name(hints[m])})" for m in missing)
        raise ConfigError(f"{where}: required key missing: {need}")
    return typing.cast(T, cls(**checked))


def read_file(path: Path) -> dict[str, Any]:
    """A config file's top table: JSON when the name ends in ``.json``, TOML otherwise."""
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    return table(data, "the file's top level")


def load_file(path: Path, parse: Callable[[dict[str, Any]], T]) -> T:
    """``parse(read_file(path))`` with every ``ValueError`` (syntax, types, checks) and
    ``OSError`` re-raised as a ``ConfigError`` prefixed with ``path``."""
    try:
        return parse(read_file(path))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: {e}") from e


def field_default(cls: type[Any], name: str) -> Any:
    """The default of ``cls``'s field ``name`` (calling its factory); ``KeyError`` if it has none:
    the one place CLIs read their option defaults from."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if (value := default_of(f)) is dataclasses.MISSING:
                raise KeyError(f"{cls.__name__}.{name} has no default")
            return value
    raise KeyError(f"{cls.__name__} has no field {name!r}")
