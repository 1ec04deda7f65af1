"""Small summaries of the log for dashboards and reports."""

from __future__ import annotations

import sqlite_utils

from .annotations import annotation_counts
from .generations import count_generations
from .rows import LogCounts


def log_counts(db: sqlite_utils.Database) -> LogCounts:
    """Generations, and annotations per provider (zeros for a file without the tables yet)."""
    if not db.table("generations").exists():
        return LogCounts(generations=0, annotations={})
    return LogCounts(generations=count_generations(db), annotations=annotation_counts(db))
