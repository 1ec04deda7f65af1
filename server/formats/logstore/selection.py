"""Readers of a filtered slice of the log: generations by adapter and replay window, and the
feedback tags they received (the ALT datapool's input)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlite_utils

from .generations import view_columns
from .rows import GenerationView


@dataclass(frozen=True)
class GenerationFilter:
    """Which generations a reader considers (None = no limit).

    ``adapters``: only generations served by these adapter names (``""`` = the base model).
    ``last_versions``: of those, only the ones whose ``adapter_version`` is among the K highest.
    ``last_generations``: of those, only the N with the highest ``seq``.
    """

    adapters: tuple[str, ...] | None = None
    last_versions: int | None = None
    last_generations: int | None = None


@dataclass(frozen=True)
class WindowSummary:
    """What a ``GenerationFilter`` selects now (seqs None when it selects nothing)."""

    first_seq: int | None
    last_seq: int | None
    count: int
    adapter_versions: tuple[tuple[str, int], ...]  # (adapter, version), sorted


def _where(db: sqlite_utils.Database, f: GenerationFilter) -> tuple[str, list[object]]:
    """SQL conditions on ``g`` (generations) for ``f``."""
    where: list[str] = ["1"]
    args: list[object] = []
    if f.adapters is not None:
        where.append(f"g.adapter IN ({','.join('?' * len(f.adapters))})")
        args += f.adapters
    if f.last_versions is not None:
        versions = [
            int(r[0])
            for r in db.execute(
                f"SELECT DISTINCT g.adapter_version FROM generations g WHERE {' AND '.join(where)} "
                "ORDER BY g.adapter_version DESC LIMIT ?",
                [*args, f.last_versions],
            ).fetchall()
        ]
        where.append(f"g.adapter_version IN ({','.join('?' * len(versions))})")
        args += versions
    if f.last_generations is not None:
        row = db.execute(
            f"SELECT g.seq FROM generations g WHERE {' AND '.join(where)} "
            "ORDER BY g.seq DESC LIMIT 1 OFFSET ?",
            [*args, f.last_generations - 1],
        ).fetchone()
        if row is not None:  # fewer generations than N: all of them
            where.append("g.seq >= ?")
            args.append(int(row[0]))
    return " AND ".join(where), args


def window_summary(db: sqlite_utils.Database, f: GenerationFilter) -> WindowSummary:
    """The seq range, count and adapter versions of the generations ``f`` selects."""
    where, args = _where(db, f)
    first, last, count = db.execute(
        f"SELECT min(g.seq), max(g.seq), count(*) FROM generations g WHERE {where}", args
    ).fetchone()
    versions = db.execute(
        f"SELECT DISTINCT g.adapter, g.adapter_version FROM generations g WHERE {where} "
        "ORDER BY g.adapter, g.adapter_version",
        args,
    ).fetchall()
    return WindowSummary(first, last, int(count), tuple((a, v) for a, v in versions))


def provider_tags(
    db: sqlite_utils.Database, f: GenerationFilter, provider: str
) -> list[tuple[GenerationView, str]]:
    """``(generation, tag)`` for each selected generation with an error-free single-generation
    ``tag`` annotation of ``provider`` (a non-empty string), in log order."""
    where, args = _where(db, f)
    rows = db.execute(
        f"SELECT {view_columns('g')}, a.value_json FROM annotations a "
        "JOIN generations g ON g.id = a.generation_id "
        "WHERE a.provider = ? AND a.kind = 'tag' AND coalesce(a.generation_id_b, '') = '' "
        f"AND coalesce(a.error, '') = '' AND {where} ORDER BY g.seq",
        [provider, *args],
    ).fetchall()
    out = []
    for r in rows:
        tag = json.loads(r[-1]) if r[-1] is not None else None
        if isinstance(tag, str) and tag:
            out.append((GenerationView(*r[:-1]), tag))
    return out


def feedback_tags(
    db: sqlite_utils.Database, f: GenerationFilter
) -> list[tuple[GenerationView, str]]:
    """``(generation, tag)`` for each selected generation with app feedback carrying a tag
    (not a preference): the latest such row per generation, in log order of generations."""
    where, args = _where(db, f)
    rows = db.execute(
        f"SELECT {view_columns('g')}, f.tag FROM feedback f "
        "JOIN generations g ON g.id = f.generation_id "
        "WHERE coalesce(f.tag, '') != '' AND coalesce(f.chosen_id, '') = '' "
        f"AND {where} ORDER BY f.seq",
        args,
    ).fetchall()
    latest: dict[str, tuple[GenerationView, str]] = {}
    for r in rows:
        latest[r[1]] = (GenerationView(*r[:-1]), str(r[-1]))
    return sorted(latest.values(), key=lambda x: x[0].seq)
