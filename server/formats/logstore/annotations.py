"""Readers of the ``annotations`` table (the annotator writes it through ``cursors``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import sqlite_utils

from .rows import LabelRow


def annotation_values(
    db: sqlite_utils.Database, provider: str, kind: str
) -> Iterator[tuple[str, str, Any]]:
    """``(generation_id, generation_id_b, value)`` of ``provider``'s error-free ``kind`` rows,
    in log order. ``value`` is the decoded ``value_json`` (None when it does not decode)."""
    rows = db.execute(
        "SELECT generation_id, coalesce(generation_id_b, ''), value_json FROM annotations "
        "WHERE provider = ? AND kind = ? AND coalesce(error, '') = '' ORDER BY seq",
        [provider, kind],
    ).fetchall()
    for gid, gid_b, value_json in rows:
        try:
            value = json.loads(value_json) if value_json is not None else None
        except json.JSONDecodeError:
            value = None
        yield str(gid), str(gid_b), value


def count_labels_after(
    db: sqlite_utils.Database, provider: str | None, after: int
) -> tuple[int, int]:
    """``(count, highest seq)`` of ``provider``'s error-free annotations with ``seq > after``;
    with ``provider=None``, of app feedback rows (their seq in the feedback table) instead.
    The highest seq is ``after`` when there are none."""
    if provider is None:
        sql = "SELECT count(*), max(seq) FROM feedback WHERE seq > ?"
        args: list[Any] = [after]
    else:
        sql = (
            "SELECT count(*), max(seq) FROM annotations "
            "WHERE seq > ? AND provider = ? AND coalesce(error, '') = ''"
        )
        args = [after, provider]
    n, hi = db.execute(sql, args).fetchone()
    return int(n), int(hi) if hi is not None else after


def annotation_counts(db: sqlite_utils.Database) -> dict[str, int]:
    """How many annotations (labels and errors) each provider has written."""
    rows = db.execute("SELECT provider, count(*) FROM annotations GROUP BY provider").fetchall()
    return {str(p): int(n) for p, n in rows}


def values_by_version(
    db: sqlite_utils.Database, provider: str, adapter: str
) -> list[tuple[int, Any]]:
    """``(adapter_version, value)`` of ``provider``'s error-free annotations of generations
    served by ``adapter`` or the base model (``""``), in log order of the generations."""
    rows = db.execute(
        "SELECT g.adapter_version, a.value_json FROM annotations a "
        "JOIN generations g ON g.id = a.generation_id "
        "WHERE a.provider = ? AND coalesce(a.error, '') = '' AND g.adapter IN ('', ?) "
        "ORDER BY g.seq",
        [provider, adapter],
    ).fetchall()
    return [(int(version), json.loads(value)) for version, value in rows]


def tag_and_score_labels(db: sqlite_utils.Database, provider: str | None) -> list[LabelRow]:
    """Error-free, non-null ``tag`` and ``score`` annotations (of ``provider`` only, if given)
    with their generation's adapter, ordered by provider, kind, adapter, adapter version."""
    rows = db.execute(
        """SELECT a.provider, a.kind, a.value_json, a.raw, g.adapter, g.adapter_version
           FROM annotations a JOIN generations g ON g.id = a.generation_id
           WHERE a.kind IN ('tag', 'score') AND a.error = '' AND a.value_json != 'null'
             AND (? IS NULL OR a.provider = ?)
           ORDER BY a.provider, a.kind, g.adapter, g.adapter_version""",
        [provider, provider],
    ).fetchall()
    return [LabelRow(*r) for r in rows]


def annotations_per_generation(db: sqlite_utils.Database, provider: str) -> Counter[int]:
    """How many generations have 0, 1, 2, ... annotations of ``provider`` (as generation a)."""
    return Counter(
        int(n)
        for (n,) in db.execute(
            "SELECT count(a.generation_id) FROM generations g LEFT JOIN annotations a "
            "ON a.generation_id = g.id AND a.provider = ? GROUP BY g.id",
            [provider],
        )
    )
