"""The feedback-to-served time: label times of an iteration's window, the median/max, the
iteration record's new columns (also on a table an older Tiller created), ``tiller learn
history`` and ``tiller align``'s report and plot."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tiller.learner.align import plots
from tiller.learner.align.report import ITERATION_FIELDS, feedback_summary, summary_lines
from tiller.learner.learn.cli import learn
from tiller.learner.learn.config import DataConfig, LearnConfig, parse_config
from tiller.learner.learn.publish import feedback_to_served
from tiller.learner.learn.trigger import window_label_times
from tiller.learner.trainer import TrainConfig
from tiller.server.formats.logstore import (
    AnnotationRow,
    IterationRecord,
    commit_annotations,
    connect,
    iterations,
    record_iteration,
)
from tiller.server.formats.logstore.runs import COLUMNS, TABLE


def _label(at: float, gid: str, provider: str = "len", error: str = "") -> AnnotationRow:
    return AnnotationRow(
        created_at=at, generation_id=gid, generation_id_b="", provider=provider, kind="score",
        value_json="null" if error else "1.0", raw="", judge_model="", latency_s=0.0, error=error,
    )  # fmt: skip


def _cfg(tmp_path: Path, **data: object) -> LearnConfig:
    return LearnConfig(
        db=tmp_path / "log.sqlite", registry=tmp_path / "reg", workdir=tmp_path / "work",
        adapter="critic", model=tmp_path, base_model="m", train=TrainConfig(objective="dpo"),
        data=DataConfig(kind="pairs", source="score", provider="len", **data),
    )  # fmt: skip


def test_window_label_times_are_the_providers_labels_in_the_window(tmp_path: Path) -> None:
    db = connect(tmp_path / "log.sqlite")
    rows = [
        _label(100.0, "g1"),  # seq 1: before the window
        _label(110.0, "g2"),  # seq 2
        _label(120.0, "g3", provider="other"),  # seq 3: another provider
        _label(130.0, "g4", error="boom"),  # seq 4: an error, not a label
        _label(140.0, "g5"),  # seq 5
        _label(150.0, "g6"),  # seq 6: after the window
    ]
    commit_annotations(db, "annotator:len", 6, rows)
    cfg = _cfg(tmp_path)
    shards = {"": db}
    assert window_label_times(shards, cfg, {"": 1}, {"": 5}) == [110.0, 140.0]
    assert window_label_times(shards, cfg, {"": 5}, {"": 5}) == []
    median, longest = feedback_to_served([110.0, 140.0], 200.0)
    assert (median, longest) == (75.0, 90.0)
    assert feedback_to_served([100.0, 110.0, 160.0], 200.0) == (90.0, 100.0)
    assert feedback_to_served([], 200.0) == (None, None)


def _old_table(db_path: Path) -> None:
    """The iteration table as a Tiller before the feedback-to-served columns made it."""
    db = connect(db_path)
    db.table(TABLE).drop()
    new = ("sampled_version", "served_at", "feedback_to_served_median_s",
           "feedback_to_served_max_s")  # fmt: skip
    old = {k: v for k, v in COLUMNS.items() if k not in new}
    db.table(TABLE).create(old, pk=("adapter", "iteration"))
    db.table(TABLE).insert(
        {"adapter": "critic", "iteration": 1, "status": "skipped", "started_at": 1.0,
         "finished_at": 2.0, "annotation_seq": 3, "details_json": "{}"}
    )  # fmt: skip
    db.conn.close()


@pytest.mark.parametrize("first", ["skipped", "promoted"])
def test_record_adds_the_new_columns_typed_to_an_older_table(tmp_path: Path, first: str) -> None:
    path = tmp_path / "log.sqlite"
    _old_table(path)
    db = connect(path)
    skipped = IterationRecord(
        adapter="critic", iteration=2, status="skipped", started_at=3.0, finished_at=4.0,
        annotation_seq=5,
    )  # fmt: skip
    promoted = IterationRecord(
        adapter="critic", iteration=3, status="promoted", started_at=5.0, finished_at=9.0,
        annotation_seq=8, version=1, sampled_version=0, served_at=8.5,
        feedback_to_served_median_s=2.5, feedback_to_served_max_s=4.0,
    )  # fmt: skip
    # A row without the new values first must not make their columns TEXT.
    for rec in (skipped, promoted) if first == "skipped" else (promoted, skipped):
        record_iteration(db, rec)
    types = {c.name: c.type for c in db.table(TABLE).columns}
    assert types["served_at"] == types["feedback_to_served_max_s"] == types["final_loss"]
    assert types["served_at"] in ("REAL", "FLOAT")
    assert types["sampled_version"] == types["version"] == "INTEGER"
    rows = {r["iteration"]: r for r in iterations(db, "critic")}
    assert rows[1]["served_at"] is None and rows[2]["feedback_to_served_median_s"] is None
    assert rows[3]["feedback_to_served_median_s"] == 2.5 and rows[3]["sampled_version"] == 0
    assert isinstance(rows[3]["served_at"], float)


def test_history_and_report_show_the_feedback_to_served_time(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    db = connect(path)
    for i, (med, top) in enumerate(((12.25, 30.5), (4.0, 9.75)), start=1):
        record_iteration(
            db,
            IterationRecord(
                adapter="critic", iteration=i, status="promoted", started_at=100.0 * i,
                finished_at=100.0 * i + 60, annotation_seq=10 * i, version=i,
                sampled_version=i - 1, served_at=100.0 * i + 50,
                feedback_to_served_median_s=med, feedback_to_served_max_s=top,
            ),
        )  # fmt: skip
    record_iteration(
        db, IterationRecord(adapter="critic", iteration=3, status="skipped", started_at=400.0,
                            finished_at=401.0, annotation_seq=30)
    )  # fmt: skip
    result = CliRunner(env={"COLUMNS": "200"}).invoke(learn, ["history", "--db", str(path)])
    assert result.exit_code == 0, result.output
    assert "fb→served" in result.output
    assert "12.2 / 30.5" in result.output and "4.0 / 9.8" in result.output
    lines = {line.split("│")[2].strip(): line for line in result.output.splitlines()
             if line.count("│") > 3 and "critic" in line}  # fmt: skip
    assert "base" in lines["1"] and "v1" in lines["2"].split("│")[5]

    rows = iterations(db, "critic")
    assert {"served_at", "feedback_to_served_median_s"} <= set(ITERATION_FIELDS)
    served = [r for r in rows if r["feedback_to_served_median_s"] is not None]
    summary = feedback_summary(served)
    assert summary["versions"][1] == {"median_s": 12.25, "max_s": 30.5}
    assert summary["median_s"] == pytest.approx((12.25 + 4.0) / 2) and summary["max_s"] == 30.5
    assert any("feedback to served" in line for line in summary_lines({"feedback_to_served":
                                                                       summary}))  # fmt: skip
    out = plots.feedback_to_served(db, "critic", 100.0, tmp_path / "fts.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipeline_is_a_checked_learner_key(tmp_path: Path) -> None:
    data = {"db": "l.sqlite", "registry": "r", "workdir": "w", "model": "m", "adapter": "a",
            "base_model": "b", "data": {"kind": "pairs", "provider": "p"}}  # fmt: skip
    assert parse_config(data, tmp_path, {}).pipeline is False
    assert parse_config({**data, "pipeline": True}, tmp_path, {}).pipeline is True
    with pytest.raises(ValueError, match=r"\[learner\] pipeline"):
        parse_config({**data, "pipeline": "yes"}, tmp_path, {}, prefix="learner.")
