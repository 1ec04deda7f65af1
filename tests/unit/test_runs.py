"""The learner's iteration table: typed columns whatever the first row holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tiller.learner.align.dashboard import line, snapshot
from tiller.server.formats.logstore import IterationRecord, connect, runs


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
