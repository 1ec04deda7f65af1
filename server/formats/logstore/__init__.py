"""The generation log: one SQLite file (WAL), its schema and migrations, and the typed store API.

This package is the only place that writes SQL against the log. Readers and writers take a
``sqlite_utils.Database`` from ``connect`` and exchange dataclass rows.
"""

from .runs import (
    IterationRecord,
    Status,
    iterations,
    last_iteration,
    record_iteration,
)
from .schema import SCHEMA_VERSION, Synchronous, connect, migrate

__all__ = [
    "SCHEMA_VERSION",
    "IterationRecord",
    "Status",
    "Synchronous",
    "connect",
    "iterations",
    "last_iteration",
    "migrate",
    "record_iteration",
]
