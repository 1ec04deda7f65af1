"""The generation log without an engine: batching, loss accounting, migrations, counters."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from tiller.server.config import LogConfig
from tiller.server.errors import NotFound
from tiller.server.formats.logstore import SCHEMA_VERSION, connect, migrate
from tiller.server.logwriter import LogLoss, LogWriter


def _insert(i: int):  # type: ignore[no-untyped-def]
    def op(db: sqlite_utils.Database) -> int:
        db.table("cursors").insert({"name": f"c{i}", "seq": i, "updated_at": 0.0})
        return i

    return op


def _count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM cursors").fetchone()[0])
    finally:
        conn.close()


def test_schema_is_created_once_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    db = connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"generations", "feedback", "annotations", "cursors"} <= set(db.table_names())
    assert migrate(db) == SCHEMA_VERSION  # idempotent
    db.conn.close()
    again = connect(path)
    assert again.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = connect(tmp_path / "log.sqlite")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        migrate(db)


async def test_batched_writes_resolve_every_future(tmp_path: Path) -> None:
    w = LogWriter(LogConfig(path=tmp_path / "log.sqlite", max_batch=8))
    await w.start()
    results = await asyncio.gather(*[w.submit(_insert(i)) for i in range(50)])
    assert results == list(range(50))
    assert w.stats.written == 50 and w.stats.lost == 0
    assert 0 < w.stats.batches < 50  # ops were grouped into transactions
    await w.close()
    assert _count(tmp_path / "log.sqlite") == 50


async def test_request_errors_fail_only_their_op(tmp_path: Path) -> None:
    w = LogWriter(LogConfig(path=tmp_path / "log.sqlite"))
    await w.start()

    def bad(db: sqlite_utils.Database) -> None:
        raise NotFound("unknown generation id 'x'")

    futs = [w.submit(_insert(1)), w.submit(bad), w.submit(_insert(2))]
    done = await asyncio.gather(*futs, return_exceptions=True)
    assert done[0] == 1 and done[2] == 2 and isinstance(done[1], NotFound)
    await w.close()
    assert _count(tmp_path / "log.sqlite") == 2


async def test_a_locked_database_loses_loudly_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log.sqlite"
    w = LogWriter(LogConfig(path=path))
    await w.start()
    assert w._db is not None
    w._db.execute("PRAGMA busy_timeout=100")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    with pytest.raises(LogLoss):
        await w.submit(_insert(1))
    assert w.stats.lost == 1
    assert "generation log LOST" in caplog.text
    blocker.execute("ROLLBACK")
    blocker.close()
    assert await w.submit(_insert(2)) == 2  # serving carries on once the lock is gone
    await w.close()
    assert _count(path) == 1


async def test_full_queue_loses_instead_of_blocking(tmp_path: Path) -> None:
    w = LogWriter(LogConfig(path=tmp_path / "log.sqlite", max_queue=2))
    await w.start()
    futs = [w.submit(_insert(i)) for i in range(5)]  # no await in between: the queue fills
    done = await asyncio.gather(*futs, return_exceptions=True)
    assert sum(isinstance(d, LogLoss) for d in done) == 3 and w.stats.lost == 3
    await w.close()


async def test_close_flushes_the_queue(tmp_path: Path) -> None:
    w = LogWriter(LogConfig(path=tmp_path / "log.sqlite"))
    await w.start()
    for i in range(20):
        w.submit(_insert(i))
    await w.close()
    assert _count(tmp_path / "log.sqlite") == 20
    with pytest.raises(LogLoss):
        await w.submit(_insert(99))


def test_metrics_read_backlogs_and_iterations_from_the_log(tmp_path: Path) -> None:
    from tiller.server.formats.logstore import IterationRecord, commit_annotations, runs
    from tiller.server.metrics import _LiveState

    path = tmp_path / "log.sqlite"
    db = connect(path)
    for i in range(1, 6):
        db.table("generations").insert({"id": f"g{i}", "created_at": float(i)})
    commit_annotations(db, "annotate:judge", 2, [])
    runs.record_iteration(db, IterationRecord("a", 1, "promoted", 1.0, 2.0, 2))
    runs.record_iteration(db, IterationRecord("a", 2, "rejected", 3.0, 4.0, 3))
    runs.record_iteration(db, IterationRecord("a", 3, "rejected", 5.0, 6.0, 4))
    state = _LiveState(lambda: None, lambda: [], path, "tiny")
    families = list(state._from_log(path))
    got = {m.name: {tuple(s.labels.values()): s.value for s in m.samples} for m in families}
    assert got["tiller_annotator_backlog"] == {("tiny", "judge"): 3}
    assert got["tiller_learner_iterations"] == {
        ("tiny", "a", "promoted"): 1,
        ("tiny", "a", "rejected"): 2,
    }
    assert {m.name: m.type for m in families} == {
        "tiller_annotator_backlog": "gauge",
        "tiller_learner_iterations": "counter",
    }
    missing = {m.name: m.samples for m in state._from_log(tmp_path / "absent.sqlite")}
    assert missing == {"tiller_annotator_backlog": [], "tiller_learner_iterations": []}


def test_store_counters_for_the_learners_trigger(tmp_path: Path) -> None:
    from tiller.server.formats.logstore import (
        AnnotationRow,
        commit_annotations,
        count_labels_after,
        count_unlabelled,
        last_generation_seq,
    )

    db = connect(tmp_path / "log.sqlite")
    assert last_generation_seq(db) == 0
    for i in range(1, 5):
        db.table("generations").insert({"id": f"g{i}", "created_at": float(i)})

    def note(gid: str, provider: str, error: str = "", b: str = "") -> AnnotationRow:
        return AnnotationRow(1.0, gid, b, provider, "score", "1", "", "", 0.0, error)

    rows = [note("g1", "p"), note("g2", "p", error="bad"), note("g3", "q"), note("g1", "p", b="g4")]
    assert commit_annotations(db, "annotate:p", 4, rows) == 4
    assert last_generation_seq(db) == 4
    assert count_labels_after(db, "p", 0) == (2, 4)  # the error row is not a label
    assert count_labels_after(db, "p", 4) == (0, 4)
    assert count_unlabelled(db, "p", 0, 4) == 1  # g3: labelled by q only
    assert count_unlabelled(db, "p", 0, 2) == 0
    assert count_labels_after(db, None, 0) == (0, 0)
    db.table("feedback").insert({"id": "f1", "created_at": 1.0, "generation_id": "g1"})
    assert count_labels_after(db, None, 0) == (1, 1)


def test_generation_rows_go_in_all_or_none(tmp_path: Path) -> None:
    """One prepared insert per call: a duplicate id fails the whole call, in a transaction
    (the writer's batch) or not (autocommit), and leaves the other rows out."""
    from dataclasses import fields

    from tiller.server.formats.logstore import (
        GenerationRow,
        count_generations,
        generations_by_id,
        insert_generations,
        transaction,
    )

    def row(gid: str) -> GenerationRow:
        values = {f.name: 0 if f.type in ("int", "float") else "" for f in fields(GenerationRow)}
        return GenerationRow(**(values | {"id": gid, "output_text": f"text {gid}"}))

    db = connect(tmp_path / "log.sqlite")
    insert_generations(db, [row("g1")])
    with pytest.raises(sqlite3.IntegrityError):
        insert_generations(db, [row("g2"), row("g1")])
    with pytest.raises(sqlite3.IntegrityError), transaction(db):
        insert_generations(db, [row("g3")])
        insert_generations(db, [row("g4"), row("g1")])
    assert count_generations(db) == 1
    assert generations_by_id(db, ["g1"])["g1"].output_text == "text g1"
