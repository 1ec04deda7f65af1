"""Whole rows as stored, as dicts of column -> value (JSON columns stay JSON text): what
``tiller log show`` and ``tiller log export`` print, every column included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import sqlite_utils

Record = dict[str, Any]
Table = Literal["generations", "feedback", "annotations"]


def generation_record(db: sqlite_utils.Database, generation_id: str) -> Record | None:
    rows = list(db.query("SELECT * FROM generations WHERE id = ?", [generation_id]))
    return rows[0] if rows else None


def annotation_records_of(db: sqlite_utils.Database, generation_id: str) -> list[Record]:
    """Annotations naming the generation as either side of a judgement, in log order."""
    return list(
        db.query(
            "SELECT * FROM annotations WHERE generation_id = ? OR generation_id_b = ? ORDER BY seq",
            [generation_id, generation_id],
        )
    )


def feedback_records_of(db: sqlite_utils.Database, generation_id: str) -> list[Record]:
    """App feedback naming the generation (rated, chosen or rejected), in log order."""
    return list(
        db.query(
            "SELECT * FROM feedback WHERE ? IN (generation_id, chosen_id, rejected_id) "
            "ORDER BY seq",
            [generation_id],
        )
    )


def generation_records(
    db: sqlite_utils.Database, since: int, until: int | None, chunk: int = 500
) -> Iterator[list[Record]]:
    """Generations with ``since < seq <= until`` in chunks of ``chunk``, each with an
    ``annotations`` list (the rows whose first generation it is, so a pairwise label appears
    once). Read them inside ``read_snapshot`` for one consistent view."""
    last = since
    while True:
        rows = list(
            db.query(
                "SELECT * FROM generations WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                [last, until if until is not None else 2**63 - 1, chunk],
            )
        )
        if not rows:
            return
        ids = [r["id"] for r in rows]
        notes: dict[str, list[Record]] = {i: [] for i in ids}
        marks = ",".join("?" * len(ids))
        for a in db.query(
            f"SELECT * FROM annotations WHERE generation_id IN ({marks}) ORDER BY seq", ids
        ):
            notes[a["generation_id"]].append(a)
        yield [{**r, "annotations": notes[r["id"]]} for r in rows]
        last = rows[-1]["seq"]


def table_columns(db: sqlite_utils.Database, table: Table) -> list[tuple[str, str]]:
    """``(name, declared type)`` of each column of ``table``, in order."""
    return [(str(c[1]), str(c[2])) for c in db.execute(f"PRAGMA table_info({table})").fetchall()]
