"""The ``generations`` table: the server's writes and every reader of generations."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields

import sqlite_utils

from .rows import VIEW_COLUMNS, GenerationRow, GenerationSpan, GenerationView

_CHUNK = 500  # well under SQLite's bound-parameter limit


def view_columns(alias: str = "") -> str:
    """The SELECT list of a ``GenerationView`` (columns prefixed with ``alias.`` if given)."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + c for c in VIEW_COLUMNS)


def generations_by_id(db: sqlite_utils.Database, ids: Iterable[str]) -> dict[str, GenerationView]:
    """The logged generations with these ids (unknown ids are simply absent)."""
    wanted = sorted(set(ids))
    out: dict[str, GenerationView] = {}
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i : i + _CHUNK]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(
            f"SELECT {view_columns()} FROM generations WHERE id IN ({marks})", chunk
        ).fetchall()
        out.update((r[1], GenerationView(*r)) for r in rows)
    return out


def last_generation_seq(db: sqlite_utils.Database) -> int:
    """The highest generation seq (0 for an empty log)."""
    return int(db.execute("SELECT coalesce(max(seq), 0) FROM generations").fetchone()[0])


def count_unlabelled(
    db: sqlite_utils.Database, provider: str, after_seq: int, upto_seq: int
) -> int:
    """How many generations logged with ``after_seq < seq <= upto_seq`` have no annotation
    (a label or an error) of ``provider`` yet, as either side of a pairwise judgement."""
    sql = (
        "SELECT count(*) FROM generations g WHERE g.seq > ? AND g.seq <= ? AND NOT EXISTS ("
        "SELECT 1 FROM annotations a WHERE a.provider = ? "
        "AND (a.generation_id = g.id OR a.generation_id_b = g.id))"
    )
    return int(db.execute(sql, [after_seq, upto_seq, provider]).fetchone()[0])


_ROW_COLUMNS = tuple(f.name for f in fields(GenerationRow))
_INSERT = (
    f"INSERT INTO generations ({', '.join(_ROW_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_ROW_COLUMNS))})"
)


def insert_generations(db: sqlite_utils.Database, rows: Sequence[GenerationRow]) -> None:
    """Append ``rows`` (each gets the next ``seq``); a duplicate id raises ``IntegrityError``.

    One prepared statement: the server calls this for every request, and ``insert_all``'s
    per-call table inspection cost more than the insert. All rows or none (a savepoint inside
    the caller's transaction)."""
    with db.atomic():
        db.conn.executemany(_INSERT, [[getattr(r, c) for c in _ROW_COLUMNS] for r in rows])


def generation_exists(db: sqlite_utils.Database, generation_id: str) -> bool:
    return (
        db.execute("SELECT 1 FROM generations WHERE id = ?", [generation_id]).fetchone() is not None
    )


def next_generations(db: sqlite_utils.Database, after: int, limit: int) -> list[GenerationView]:
    """Up to ``limit`` generations after seq ``after`` in log order, extended so that the last
    request group is whole (pairwise judges need every sample of a prompt)."""
    cols = view_columns()
    rows = db.execute(
        f"SELECT {cols} FROM generations WHERE seq > ? ORDER BY seq LIMIT ?", [after, limit]
    ).fetchall()
    if rows:
        last_group, last_seq = rows[-1][2], rows[-1][0]
        rows += db.execute(
            f"SELECT {cols} FROM generations WHERE group_id = ? AND seq > ? ORDER BY seq",
            [last_group, last_seq],
        ).fetchall()
    return [GenerationView(*r) for r in rows]


def latest_generations(db: sqlite_utils.Database, after: int, n: int) -> list[GenerationView]:
    """The last ``n`` generations with seq > ``after``, in log order."""
    rows = db.execute(
        f"SELECT {view_columns()} FROM generations WHERE seq > ? ORDER BY seq DESC LIMIT ?",
        [after, n],
    ).fetchall()
    return [GenerationView(*r) for r in rows[::-1]]


def count_generations(db: sqlite_utils.Database, after: int = 0) -> int:
    """How many generations have seq > ``after`` (all of them by default)."""
    return int(db.execute("SELECT count(*) FROM generations WHERE seq > ?", [after]).fetchone()[0])


def first_generation_at(db: sqlite_utils.Database) -> float | None:
    """When the first generation was logged (None for an empty log)."""
    row = db.execute("SELECT min(created_at) FROM generations").fetchone()
    return float(row[0]) if row and row[0] is not None else None


def generation_span(db: sqlite_utils.Database) -> GenerationSpan:
    """How many generations and request groups the log holds, and when they were logged."""
    n, groups, first, last = db.execute(
        "SELECT count(*), count(DISTINCT group_id), min(created_at), max(created_at) "
        "FROM generations"
    ).fetchone()
    return GenerationSpan(int(n), int(groups), first, last)
