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

from tiller.server.formats import logstore
from tiller.server.formats.logstore import AnnotationRow

from .base import Annotation, GenerationView


def cursor_name(provider: str) -> str:
    return logstore.annotator_cursor(provider)


def read_cursor(db: sqlite_utils.Database, provider: str) -> int:
    return logstore.read_cursor(db, cursor_name(provider))


def next_batch(db: sqlite_utils.Database, after: int, limit: int) -> list[GenerationView]:
    """Up to ``limit`` generations after ``after`` in log order, extended so that the last
    request group is whole (pairwise judges need every sample of a prompt)."""
    return logstore.next_generations(db, after, limit)


def backlog(db: sqlite_utils.Database, provider: str) -> int:
    return logstore.count_generations(db, after=read_cursor(db, provider))


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
        AnnotationRow(
            created_at=now,
            generation_id=a.generation_id,
            generation_id_b=a.generation_id_b,
            provider=a.provider,
            kind=a.kind,
            value_json=json.dumps(a.value),
            raw=a.raw,
            judge_model=a.judge_model,
            latency_s=a.latency_s,
            error=a.error,
        )
        for a in annotations
    ]
    upto = max(g.seq for g in batch)
    return logstore.commit_annotations(db, cursor_name(provider), upto, rows, now=now)
