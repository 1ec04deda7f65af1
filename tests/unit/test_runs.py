"""The learner's iteration table: typed columns whatever the first row holds, and the
migration that creates it in logs of schema version 1."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import sqlite_utils

from tiller.learner.align.dashboard import line, snapshot
from tiller.server.formats.logstore import IterationRecord, connect, runs, schema


def test_columns_cover_every_record_field() -> None:
    fields = {f.name for f in dataclasses.fields(IterationRecord)} - {"details"}
    assert set(runs.COLUMNS) == fields | {"details_json"}


def test_a_skipped_first_iteration_does_not_turn_later_losses_into_text(tmp_path: Path) -> None:
    db = connect(tmp_path / "log.sqlite")
    runs.record_iteration(db, IterationRecord("a", 1, "skipped", 1.0, 2.0, 5, reason="no data"))
    runs.record_iteration(
        db,
        IterationRecord(
            "a", 2, "promoted", 3.0, 4.0, 9, examples=8, steps=1, final_loss=2.5, version=1,
            gate_passed=True, candidate_value=0.25,
        ),
    )  # fmt: skip
    last = runs.last_iteration(db, "a")
    assert last is not None
    assert isinstance(last["final_loss"], float) and last["final_loss"] == 2.5
    assert isinstance(last["candidate_value"], float) and last["version"] == 1
    assert [r["status"] for r in runs.iterations(db, "a")] == ["skipped", "promoted"]


def test_the_progress_line_formats_a_run_that_skipped_first(tmp_path: Path) -> None:
    db = connect(tmp_path / "log.sqlite")
    runs.record_iteration(db, IterationRecord("a", 1, "skipped", 1.0, 2.0, 5))
    runs.record_iteration(db, IterationRecord("a", 2, "rejected", 3.0, 4.0, 9, final_loss=1.25))
    text = line(snapshot(db, "a", 60.0), 300.0)
    assert "loss 1.250" in text and "rejected 1" in text


def _v1_file(path: Path) -> sqlite_utils.Database:
    """A log as schema version 1 left it: migration 1 only, one generation logged."""
    db = sqlite_utils.Database(path)
    schema.MIGRATIONS[0](db)
    db.execute("PRAGMA user_version=1")
    db.table("generations").insert({"id": "g1", "created_at": 1.0, "output_text": "hi"})
    return db


def _user_version(db: sqlite_utils.Database) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_a_version_1_log_migrates_to_2_and_keeps_its_rows(tmp_path: Path) -> None:
    _v1_file(tmp_path / "log.sqlite").close()
    db = connect(tmp_path / "log.sqlite")
    assert _user_version(db) == schema.SCHEMA_VERSION == 2
    assert [r["id"] for r in db.table("generations").rows] == ["g1"]
    assert runs.iterations(db) == []
    runs.record_iteration(db, IterationRecord("a", 1, "skipped", 1.0, 2.0, 1, reason="no data"))
    assert [r["status"] for r in runs.iterations(db, "a")] == ["skipped"]


def test_a_version_1_log_with_an_old_learners_table_migrates_and_keeps_it(tmp_path: Path) -> None:
    old = _v1_file(tmp_path / "log.sqlite")
    # Learners before schema 2 created the table themselves, with the columns of their record.
    old.table(runs.TABLE).insert(
        {"adapter": "a", "iteration": 1, "status": "promoted", "started_at": 1.0,
         "finished_at": 2.0, "annotation_seq": 4, "final_loss": 0.5, "version": 1},
        pk=("adapter", "iteration"),
    )  # fmt: skip
    old.close()
    db = connect(tmp_path / "log.sqlite")
    assert _user_version(db) == 2
    assert [r["id"] for r in db.table("generations").rows] == ["g1"]
    first = runs.last_iteration(db, "a")
    assert first is not None and first["final_loss"] == 0.5 and first["version"] == 1
    runs.record_iteration(
        db, IterationRecord("a", 2, "rejected", 3.0, 4.0, 9, candidate_distinct2=0.75)
    )
    rows = runs.iterations(db, "a")
    assert [(r["iteration"], r["status"]) for r in rows] == [(1, "promoted"), (2, "rejected")]
    assert rows[1]["candidate_distinct2"] == 0.75
