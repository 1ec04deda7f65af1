"""The generation log's SQLite schema, migrations and connection settings (sqlite-utils).

One file holds generations, app feedback, annotations, follower cursors and the learner's
iterations. WAL mode lets the
server write while the annotator and learner read. ``PRAGMA user_version`` is the schema version;
``migrate`` applies the missing steps in order and is safe to call from every process at start.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import sqlite_utils

Synchronous = Literal["NORMAL", "FULL"]


def _v1(db: sqlite_utils.Database) -> None:
    db.table("generations").create(
        {
            "seq": int,  # follow cursor (monotonic)
            "id": str,  # generation id returned to the client
            "created_at": float,
            "request_id": str,
            "group_id": str,  # one per request: the n samples of a prompt (OAIF pairs)
            "sample_index": int,
            "prompt": str,
            "chat_json": str,
            "rendered_prompt": str,
            "feedback": str,
            "feedback_mix_json": str,
            "attributes_json": str,
            "adapter": str,
            "adapter_version": int,
            "base_model": str,
            "sampling_json": str,  # every sampling parameter, including the seed used
            "seed": int,
            "output_text": str,
            "output_token_ids": str,  # JSON list
            "finish_reason": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "latency_s": float,
            "ttft_s": float,
        },
        pk="seq",
        not_null={"id", "created_at"},
    )
    db.table("generations").create_index(["id"], unique=True)
    db.table("generations").create_index(["group_id"])
    db.table("feedback").create(
        {
            "seq": int,
            "id": str,
            "created_at": float,
            "generation_id": str,
            "score": float,
            "tag": str,
            "critique": str,
            "refinement": str,
            "chosen_id": str,
            "rejected_id": str,
            "idempotency_key": str,
            "source": str,
        },
        pk="seq",
        not_null={"id", "created_at"},
    )
    db.table("feedback").create_index(["id"], unique=True)
    db.table("feedback").create_index(["idempotency_key"], unique=True)
    db.table("feedback").create_index(["generation_id"])
    db.table("annotations").create(
        {
            "seq": int,
            "created_at": float,
            "generation_id": str,
            "generation_id_b": str,  # second generation of a pairwise judgement, "" otherwise
            "provider": str,
            "kind": str,  # tag | score | preference | likert | critique | refinement
            "value_json": str,
            "raw": str,  # the judge's raw output, for audits
            "judge_model": str,
            "latency_s": float,
            "error": str,
        },
        pk="seq",
        not_null={"generation_id", "provider", "kind"},
    )
    db.table("annotations").create_index(
        ["generation_id", "generation_id_b", "provider", "kind"], unique=True
    )
    db.table("cursors").create({"name": str, "seq": int, "updated_at": float}, pk="name")


def _v2(db: sqlite_utils.Database) -> None:
    # Learners before schema 2 created this table themselves; keep theirs when present.
    from .runs import COLUMNS, TABLE

    db.table(TABLE).create(COLUMNS, pk=("adapter", "iteration"), if_not_exists=True)


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(
    path: Path, *, synchronous: Synchronous = "FULL", timeout_s: float = 5.0
) -> sqlite_utils.Database:
    """Open (creating if needed) the log at ``path`` in WAL mode and bring its schema up to date.

    ``synchronous=FULL`` makes every committed batch survive power loss; ``NORMAL`` survives
    process crashes (kill -9) only. The connection may be used from another thread, one at a time.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    migrate(db)
    return db


def migrate(db: sqlite_utils.Database) -> int:
    """Apply missing migrations in one transaction each; return the resulting version."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"log schema version {version} is newer than this Tiller ({SCHEMA_VERSION})"
        )
    while version < SCHEMA_VERSION:
        with transaction(db):
            current = int(db.execute("PRAGMA user_version").fetchone()[0])
            if current == version:  # another process may have migrated meanwhile
                MIGRATIONS[version](db)
                db.execute(f"PRAGMA user_version={version + 1}")
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
    return version


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One write transaction (``BEGIN IMMEDIATE``): committed when the block ends, rolled back
    when it raises. For a connection opened by ``connect`` (autocommit otherwise)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise


@contextmanager
def read_snapshot(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One read transaction: every read in the block sees the same state of the log."""
    db.execute("BEGIN")
    try:
        yield db
    finally:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")


def open_readonly(path: Path, *, timeout_s: float = 5.0) -> sqlite_utils.Database:
    """Open an existing log read-only (``mode=ro``, no migration): safe beside the writers.

    Raises ``sqlite3.Error`` when the file cannot be opened."""
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout_s, isolation_level=None
    )
    return sqlite_utils.Database(conn)  # sqlite3's timeout is the busy timeout


def schema_version(db: sqlite_utils.Database) -> int:
    """The log's ``PRAGMA user_version`` (0 for a file that is not a Tiller log)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def integrity_check(db: sqlite_utils.Database) -> str:
    """SQLite's ``PRAGMA integrity_check`` verdict (``"ok"`` when the file is sound)."""
    return str(db.execute("PRAGMA integrity_check").fetchone()[0])
