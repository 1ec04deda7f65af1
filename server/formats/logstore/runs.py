"""The learner's table in the generation log: one row per iteration, what it did and why.

``learner_iterations`` is created by migration 2 (``schema``). A row is written
once an iteration ends (``promoted``, ``rejected``, ``published``, ``skipped`` or ``failed``);
``annotation_seq`` is the annotation cursor the iteration consumed up to, so a restarted
learner carries on after the last recorded iteration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

import sqlite_utils

TABLE = "learner_iterations"
Status = Literal["promoted", "rejected", "published", "skipped", "failed"]


@dataclass(frozen=True)
class IterationRecord:
    adapter: str
    iteration: int
    status: Status
    started_at: float
    finished_at: float
    annotation_seq: int  # annotations up to this seq were available to the iteration
    examples: int = 0
    steps: int = 0
    final_loss: float | None = None
    samples_per_s: float | None = None
    version: int | None = None  # the published version, if any
    gate_passed: bool | None = None
    candidate_value: float | None = None
    incumbent_value: float | None = None
    candidate_distinct2: float | None = None
    win_rate: float | None = None
    reason: str = ""
    details: dict[str, Any] | None = None


def _column_type(hint: Any) -> type:
    """The SQLite column type of one ``IterationRecord`` field (``X | None`` -> X, bool -> int,
    a Literal of strings -> str)."""
    if get_origin(hint) is Literal:
        return str
    args = [a for a in get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    return int if base is bool else base


# Declared column types, derived from the record: sqlite-utils infers a column's type from the
# first row it inserts, and a first row with ``final_loss=None`` (a skipped iteration) would make
# the column TEXT.
_HINTS = get_type_hints(IterationRecord)
COLUMNS: dict[str, type] = {
    **{
        f.name: _column_type(_HINTS[f.name]) for f in fields(IterationRecord) if f.name != "details"
    },
    "details_json": str,
}


def record_iteration(db: sqlite_utils.Database, rec: IterationRecord) -> None:
    """Insert or replace the row of ``(rec.adapter, rec.iteration)``."""
    row = asdict(rec)
    row["details_json"] = json.dumps(row.pop("details") or {}, allow_nan=False, default=str)
    db.table(TABLE).insert(row, pk=("adapter", "iteration"), replace=True, alter=True)


def iterations(db: sqlite_utils.Database, adapter: str | None = None) -> list[dict[str, Any]]:
    """Recorded iterations in order (all adapters unless ``adapter``)."""
    if not db.table(TABLE).exists():
        return []
    where, args = ("adapter = ?", [adapter]) if adapter is not None else (None, None)
    return list(db.table(TABLE).rows_where(where, args, order_by="adapter, iteration"))


def last_iteration(db: sqlite_utils.Database, adapter: str) -> dict[str, Any] | None:
    rows = iterations(db, adapter)
    return rows[-1] if rows else None


def iteration_counts(db: sqlite_utils.Database) -> dict[tuple[str, str], int]:
    """How many iterations each ``(adapter, status)`` has recorded (empty before the first)."""
    if not db.table(TABLE).exists():
        return {}
    rows = db.execute(
        f"SELECT adapter, status, COUNT(*) FROM {TABLE} GROUP BY adapter, status"
    ).fetchall()
    return {(str(a), str(s)): int(n) for a, s, n in rows}
