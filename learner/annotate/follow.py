"""Follow the generation log per provider and commit annotations exactly once.

Progress is a cursor row (``annotate:<provider>``) in the same SQLite file. A batch's annotations
and the cursor advance commit in one transaction, and annotations are unique per
(generation, generation_b, provider, kind): a crash at any point (kill -9 included) either
loses the whole uncommitted batch (it is redone) or nothing, and a redo inserts no duplicates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import sqlite_utils

from .base import Annotation, GenerationView

_COLUMNS = (
    "seq, id, group_id, sample_index, prompt, chat_json, rendered_prompt, feedback, adapter, "
    "adapter_version, output_text, finish_reason, created_at"
)


def cursor_name(provider: str) -> str:
    return f"annotate:{provider}"


def read_cursor(db: sqlite_utils.Database, provider: str) -> int:
    row = db.execute("SELECT seq FROM cursors WHERE name = ?", [cursor_name(provider)]).fetchone()
    return int(row[0]) if row else 0


def next_batch(db: sqlite_utils.Database, after: int, limit: int) -> list[GenerationView]:
    """Up to ``limit`` generations after ``after`` in log order, extended so that the last
    request group is whole (pairwise judges need every sample of a prompt)."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM generations WHERE seq > ? ORDER BY seq LIMIT ?", [after, limit]
    ).fetchall()
    if rows:
        last_group, last_seq = rows[-1][2], rows[-1][0]
        rows += db.execute(
            f"SELECT {_COLUMNS} FROM generations WHERE group_id = ? AND seq > ? ORDER BY seq",
            [last_group, last_seq],
        ).fetchall()
    return [GenerationView(*r) for r in rows]


def backlog(db: sqlite_utils.Database, provider: str) -> int:
    after = read_cursor(db, provider)
    return int(db.execute("SELECT count(*) FROM generations WHERE seq > ?", [after]).fetchone()[0])


def commit(
    db: sqlite_utils.Database,
    provider: str,
    batch: Sequence[GenerationView],
    annotations: Sequence[Annotation],
) -> int:
    """Insert ``annotations`` (duplicates ignored) and move the cursor past ``batch``, atomically.
    Returns the number of rows actually inserted."""
    if not batch:
        return 0
    now = time.time()
    rows = [
        {
            "created_at": now,
            "generation_id": a.generation_id,
            "generation_id_b": a.generation_id_b,
            "provider": a.provider,
            "kind": a.kind,
            "value_json": json.dumps(a.value),
            "raw": a.raw,
            "judge_model": a.judge_model,
            "latency_s": a.latency_s,
            "error": a.error,
        }
        for a in annotations
    ]
    db.execute("BEGIN IMMEDIATE")
    try:
        before = db.execute("SELECT total_changes()").fetchone()[0]
        if rows:
            db.table("annotations").insert_all(rows, ignore=True)
        inserted = int(db.execute("SELECT total_changes()").fetchone()[0]) - int(before)
        db.table("cursors").upsert(
            {"name": cursor_name(provider), "seq": max(g.seq for g in batch), "updated_at": now},
            pk="name",
        )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return inserted
