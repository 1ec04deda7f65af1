"""The learner's table in the generation log: one row per iteration, what it did and why.

``learner_iterations`` is created by migration 2 (``schema``). A row is written
once an iteration ends (``promoted``, ``rejected``, ``published``, ``skipped`` or ``failed``);
``annotation_seq`` is the annotation cursor the iteration consumed up to, so a restarted
learner carries on after the last recorded iteration. Fields added to ``IterationRecord`` later
are optional (default None); ``record_iteration`` adds their columns, with their declared
types, to a table an older Tiller created.
"""

from __future__ import annotations

import json
import sqlite3
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
    # Active sampling's version (0: the base model; None: the iteration did not sample).
    sampled_version: int | None = None
    served_at: float | None = None  # when the server served the promoted version
    # Seconds from each label in the iteration's window landing in the log to served_at.
    feedback_to_served_median_s: float | None = None
    feedback_to_served_max_s: float | None = None


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


def _add_missing_columns(db: sqlite_utils.Database) -> None:
    """Give a table an older Tiller created the columns of fields added since, with their
    declared types (``insert(alter=True)`` would make a column first written as None TEXT)."""
    table = db.table(TABLE)
    if not table.exists():
        table.create(COLUMNS, pk=("adapter", "iteration"), if_not_exists=True)
        return
    have = table.columns_dict
    for name, kind in COLUMNS.items():
        if name not in have:
            try:
                table.add_column(name, kind)
            except sqlite3.OperationalError:  # another process added it meanwhile
                if name not in db.table(TABLE).columns_dict:
                    raise


def record_iteration(db: sqlite_utils.Database, rec: IterationRecord) -> None:
    """Insert or replace the row of ``(rec.adapter, rec.iteration)``."""
    _add_missing_columns(db)
    row = asdict(rec)
    row["details_json"] = json.dumps(row.pop("details") or {}, allow_nan=False, default=str)
    db.table(TABLE).insert(row, pk=("adapter", "iteration"), replace=True, alter=True)


def iterations(db: sqlite_utils.Database, adapter: str | None = None) -> list[dict[str, Any]]:
    """Recorded iterations in order (all adapters unless ``adapter``). A table an older Tiller
    wrote lacks the newer columns: read those with ``row.get``."""
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


def label_times(
    db: sqlite_utils.Database, provider: str | None, after: int, upto: int
) -> list[float]:
    """``created_at`` of the labels an iteration's window ``after < seq <= upto`` holds:
    ``provider``'s error-free annotations, or with ``provider=None`` app feedback rows (the
    same rows ``count_labels_after`` counts), for the feedback-to-served time."""
    if provider is None:
        sql = "SELECT created_at FROM feedback WHERE seq > ? AND seq <= ?"
        args: list[Any] = [after, upto]
    else:
        sql = (
            "SELECT created_at FROM annotations WHERE seq > ? AND seq <= ? AND provider = ? "
            "AND coalesce(error, '') = ''"
        )
        args = [after, upto, provider]
    return [float(t) for (t,) in db.execute(sql, args).fetchall() if t is not None]
