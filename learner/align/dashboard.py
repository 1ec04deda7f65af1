"""The live view of an alignment run: what the log and the learner's table say right now."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlite_utils

from tiller.server.formats.logstore import iterations, log_counts


@dataclass(frozen=True)
class Snapshot:
    elapsed_s: float
    generations: int
    annotations: dict[str, int]
    iterations: int
    last: dict[str, Any] | None
    served_version: int | None
    promoted: int
    rejected: int


def snapshot(db: sqlite_utils.Database, adapter: str, elapsed_s: float) -> Snapshot:
    counts = log_counts(db)
    rows = iterations(db, adapter)
    promoted = [r for r in rows if r["status"] == "promoted"]
    return Snapshot(
        elapsed_s=elapsed_s,
        generations=counts.generations,
        annotations=counts.annotations,
        iterations=len(rows),
        last=rows[-1] if rows else None,
        served_version=promoted[-1]["version"] if promoted else None,
        promoted=len(promoted),
        rejected=sum(1 for r in rows if r["status"] == "rejected"),
    )


def line(s: Snapshot, duration_s: float) -> str:
    """One line for logs and non-interactive terminals."""
    last = s.last or {}
    loss = last.get("final_loss")
    gate = last.get("candidate_value")
    served = f"v{s.served_version}" if s.served_version else "base"
    notes = " ".join(f"{k}={v}" for k, v in sorted(s.annotations.items()))
    return (
        f"[{s.elapsed_s / 60:5.1f}/{duration_s / 60:.0f} min] serving {served} · "
        f"iteration {s.iterations} ({last.get('status', '-')}) · samples {s.generations} · "
        f"annotations {notes or 0} · loss {'-' if loss is None else f'{loss:.3f}'} · "
        f"held-out {'-' if gate is None else f'{gate:+.3f}'} · "
        f"promoted {s.promoted} rejected {s.rejected}"
    )


def table(s: Snapshot, duration_s: float, name: str) -> Any:
    from rich.table import Table

    t = Table(title=f"tiller align · {name}", show_header=False, min_width=60)
    last = s.last or {}
    rows = [
        ("elapsed", f"{s.elapsed_s / 60:.1f} / {duration_s / 60:.0f} min"),
        ("serving", f"v{s.served_version}" if s.served_version else "base model"),
        ("iteration", f"{s.iterations} (last: {last.get('status', '-')})"),
        ("samples logged", str(s.generations)),
        ("annotations", ", ".join(f"{k}: {v}" for k, v in sorted(s.annotations.items())) or "0"),
        ("last loss", "-" if last.get("final_loss") is None else f"{last['final_loss']:.4f}"),
        (
            "held-out (candidate / served)",
            "-"
            if last.get("candidate_value") is None
            else f"{last['candidate_value']:+.4f} / {last['incumbent_value']:+.4f}",
        ),
        ("promoted / rejected", f"{s.promoted} / {s.rejected}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t
