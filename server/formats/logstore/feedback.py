"""The ``feedback`` table (app feedback): the server's writes and the readers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any

import sqlite_utils

from .rows import FeedbackPreference, FeedbackRow

_COLUMNS = ", ".join(f.name for f in fields(FeedbackRow))


def insert_feedback(db: sqlite_utils.Database, row: FeedbackRow) -> None:
    """Append ``row`` (its ``seq`` is assigned); a repeated id or idempotency key raises
    ``IntegrityError``."""
    values = asdict(row)
    del values["seq"]
    db.table("feedback").insert(values)


def feedback_id_by_key(db: sqlite_utils.Database, idempotency_key: str) -> str | None:
    """The id of the feedback stored under ``idempotency_key``, if any."""
    row = db.execute(
        "SELECT id FROM feedback WHERE idempotency_key = ?", [idempotency_key]
    ).fetchone()
    return None if row is None else str(row[0])


def _row(values: Sequence[Any]) -> FeedbackRow:
    r = dict(zip((f.name for f in fields(FeedbackRow)), values, strict=True))
    for k in (
        "generation_id",
        "tag",
        "critique",
        "refinement",
        "chosen_id",
        "rejected_id",
        "source",
    ):
        r[k] = r[k] or ""
    return FeedbackRow(**r)


def feedback_naming(db: sqlite_utils.Database, ids: Sequence[str]) -> list[FeedbackRow]:
    """Feedback that names any of ``ids`` (as ``generation_id``, ``chosen_id`` or
    ``rejected_id``), in log order."""
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM feedback WHERE generation_id IN ({marks}) "
        f"OR chosen_id IN ({marks}) OR rejected_id IN ({marks}) ORDER BY seq",
        [*ids, *ids, *ids],
    ).fetchall()
    return [_row(r) for r in rows]


def feedback_preferences(db: sqlite_utils.Database) -> list[FeedbackPreference]:
    """App feedback rows that carry both ``chosen_id`` and ``rejected_id``, in log order."""
    rows = db.execute(
        "SELECT id, chosen_id, rejected_id FROM feedback "
        "WHERE coalesce(chosen_id, '') != '' AND coalesce(rejected_id, '') != '' ORDER BY seq"
    ).fetchall()
    return [FeedbackPreference(str(i), str(c), str(r)) for i, c, r in rows]
