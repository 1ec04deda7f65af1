"""Follower cursors (the ``cursors`` table) and the annotator's exactly-once commit.

A cursor is a named position in the ``generations`` seq order. The annotator's cursor of a
provider is ``annotate:<provider>``; its annotations and its cursor advance commit in one
transaction, and annotations are unique per (generation, generation_b, provider, kind), so a
redone batch inserts no duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict

import sqlite_utils

from .generations import last_generation_seq
from .rows import AnnotationRow
from .schema import transaction

ANNOTATOR_PREFIX = "annotate:"


def annotator_cursor(provider: str) -> str:
    """The cursor name of an annotator provider."""
    return f"{ANNOTATOR_PREFIX}{provider}"


def read_cursor(db: sqlite_utils.Database, name: str) -> int:
    """The seq cursor ``name`` has reached (0 when it has never moved)."""
    row = db.execute("SELECT seq FROM cursors WHERE name = ?", [name]).fetchone()
    return int(row[0]) if row else 0


def commit_annotations(
    db: sqlite_utils.Database,
    cursor: str,
    upto_seq: int,
    rows: Sequence[AnnotationRow],
    *,
    now: float | None = None,
) -> int:
    """Insert ``rows`` (duplicates ignored) and move ``cursor`` to ``upto_seq``, atomically
    (``now``: the cursor's ``updated_at``, default the current time). Returns the number of
    rows actually inserted."""
    with transaction(db):
        before = db.execute("SELECT total_changes()").fetchone()[0]
        if rows:
            db.table("annotations").insert_all([asdict(r) for r in rows], ignore=True)
        inserted = int(db.execute("SELECT total_changes()").fetchone()[0]) - int(before)
        db.table("cursors").upsert(
            {"name": cursor, "seq": upto_seq, "updated_at": time.time() if now is None else now},
            pk="name",
        )
    return inserted


def annotator_backlogs(db: sqlite_utils.Database) -> dict[str, int]:
    """Per annotator provider with a cursor: how many generation seqs it has not reached."""
    head = last_generation_seq(db)
    rows = db.execute(
        "SELECT name, seq FROM cursors WHERE name LIKE ?", [ANNOTATOR_PREFIX + "%"]
    ).fetchall()
    return {str(name)[len(ANNOTATOR_PREFIX) :]: max(0, head - int(seq)) for name, seq in rows}
