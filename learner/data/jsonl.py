"""JSONL files of training examples: one JSON object per line, fields as in the dataclasses.

``SFTExample`` lines: ``{"prompt", "completion", "weight"?, "source"?}``.
``PreferencePair`` lines: ``{"prompt", "chosen", "rejected", "attribute_weights"?,
"label_confidence"?, "source"?, "chosen_id"?, "rejected_id"?}`` with ``attribute_weights`` a list
of ``[attribute, weight]``.

Loading is strict: an unknown or missing field, a wrong type, a non-finite number, a
``label_confidence`` outside [0.5, 1] or invalid JSON raises ``JsonlError`` naming the file,
the 1-based line and the field. Blank lines are ignored. Saving writes a temporary file beside
the target and renames it over the target, so readers never see half a file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

from .examples import PreferencePair, SFTExample

T = TypeVar("T", SFTExample, PreferencePair)


class JsonlError(ValueError):
    """A JSONL line that is not a valid example."""


def _save(path: Path, rows: Iterable[Any]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def save_sft(path: Path, examples: Iterable[SFTExample]) -> int:
    """Write ``examples`` to ``path`` atomically; returns how many were written."""
    return _save(path, examples)


def save_pairs(path: Path, pairs: Iterable[PreferencePair]) -> int:
    """Write ``pairs`` to ``path`` atomically; returns how many were written."""
    return _save(path, pairs)


def _str(where: str, data: dict[str, Any], name: str) -> str:
    v = data[name]
    if not isinstance(v, str):
        raise JsonlError(f"{where}: field {name!r} must be a string, got {type(v).__name__}")
    return v


def _num(where: str, data: dict[str, Any], name: str) -> float:
    v = data[name]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise JsonlError(f"{where}: field {name!r} must be a finite number, got {v!r}")
    return float(v)


def _weights(where: str, v: Any) -> tuple[tuple[str, float], ...]:
    ok = isinstance(v, list) and all(
        isinstance(e, list)
        and len(e) == 2
        and isinstance(e[0], str)
        and not isinstance(e[1], bool)
        and isinstance(e[1], int | float)
        and math.isfinite(e[1])
        for e in v
    )
    if not ok:
        raise JsonlError(
            f"{where}: field 'attribute_weights' must be a list of [attribute, finite number]"
        )
    return tuple((str(a), float(w)) for a, w in v)


def _parse(cls: type[T], where: str, data: Any) -> T:
    if not isinstance(data, dict):
        raise JsonlError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise JsonlError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(known)}")
    required = ("prompt", "completion") if cls is SFTExample else ("prompt", "chosen", "rejected")
    for name in required:
        if name not in data:
            raise JsonlError(f"{where}: missing field {name!r}")
    args: dict[str, Any] = {name: _str(where, data, name) for name in required}
    if "source" in data:
        args["source"] = _str(where, data, "source")
    if cls is PreferencePair:
        for name in ("chosen_id", "rejected_id"):
            if name in data:
                args[name] = _str(where, data, name)
    if cls is SFTExample:
        if "weight" in data:
            args["weight"] = _num(where, data, "weight")
        return cls(**args)
    if "label_confidence" in data:
        c = _num(where, data, "label_confidence")
        if not 0.5 <= c <= 1.0:
            raise JsonlError(f"{where}: field 'label_confidence' must be in [0.5, 1], got {c}")
        args["label_confidence"] = c
    if "attribute_weights" in data:
        args["attribute_weights"] = _weights(where, data["attribute_weights"])
    return cls(**args)


def _load(cls: type[T], path: Path) -> list[T]:
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from e
            out.append(_parse(cls, where, data))
    return out


def load_sft(path: Path) -> list[SFTExample]:
    """Read SFT examples from ``path``; ``JsonlError`` names the first bad line."""
    return _load(SFTExample, path)


def load_pairs(path: Path) -> list[PreferencePair]:
    """Read preference pairs from ``path``; ``JsonlError`` names the first bad line."""
    return _load(PreferencePair, path)
