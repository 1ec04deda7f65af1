"""The learner's own table in the generation log: one row per iteration, what it did and why.

``learner_iterations`` is created by the learner (not by the server's schema migrations) the
first time it writes; readers treat a missing table as "no iterations yet". A row is written
once an iteration ends (``promoted``, ``rejected``, ``published``, ``skipped`` or ``failed``);
``annotation_seq`` is the annotation cursor the iteration consumed up to, so a restarted
learner carries on after the last recorded iteration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

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


# Declared column types: sqlite-utils infers a column's type from the first row it inserts, and
# a first row with ``final_loss=None`` (a skipped iteration) made the column TEXT, so later
# losses came back as strings.
COLUMNS: dict[str, type] = {
    "adapter": str,
    "iteration": int,
    "status": str,
    "started_at": float,
    "finished_at": float,
    "annotation_seq": int,
    "examples": int,
    "steps": int,
    "final_loss": float,
    "samples_per_s": float,
    "version": int,
    "gate_passed": int,
    "candidate_value": float,
    "incumbent_value": float,
    "candidate_distinct2": float,
    "win_rate": float,
    "reason": str,
    "details_json": str,
}


def record(db: sqlite_utils.Database, rec: IterationRecord) -> None:
    db.table(TABLE).create(COLUMNS, pk=("adapter", "iteration"), if_not_exists=True)
    row = asdict(rec)
    row["details_json"] = json.dumps(row.pop("details") or {}, allow_nan=False, default=str)
    db.table(TABLE).insert(row, pk=("adapter", "iteration"), replace=True, alter=True)


def iterations(db: sqlite_utils.Database, adapter: str | None = None) -> list[dict[str, Any]]:
    """Recorded iterations in order (all adapters unless ``adapter``)."""
    if not db.table(TABLE).exists():
        return []
    where, args = ("adapter = ?", [adapter]) if adapter is not None else (None, None)
    return list(db.table(TABLE).rows_where(where, args, order_by="adapter, iteration"))


def last(db: sqlite_utils.Database, adapter: str) -> dict[str, Any] | None:
    rows = iterations(db, adapter)
    return rows[-1] if rows else None
