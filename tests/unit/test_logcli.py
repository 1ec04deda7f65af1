"""``tiller log`` on a real SQLite log built with the server's schema."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tiller.learner.logcli import log
from tiller.server.formats.logstore import connect

LONG = "Once upon a time " * 10  # longer than the 60 characters tail shows


def _gen(i: int, group: str, adapter: str, version: int, text: str) -> dict[str, Any]:
    return {
        "id": f"gen-{i}",
        "created_at": 1_700_000_000.0 + i,
        "request_id": f"req-{group}",
        "group_id": group,
        "sample_index": i % 2,
        "prompt": f"prompt {group}",
        "chat_json": "",
        "rendered_prompt": f"<feedback> prompt {group}",
        "feedback": "Lowest Toxicity" if adapter else "",
        "feedback_mix_json": "",
        "attributes_json": "",
        "adapter": adapter,
        "adapter_version": version,
        "base_model": "tiny",
        "sampling_json": json.dumps({"temperature": 1.0, "seed": i}),
        "seed": i,
        "output_text": text,
        "output_token_ids": json.dumps([i, i + 1]),
        "finish_reason": "length",
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "latency_s": 0.1,
        "ttft_s": 0.01,
    }


def _note(
    gid: str, provider: str, kind: str, value: Any, raw: str = "", b: str = ""
) -> dict[str, Any]:
    return {
        "created_at": 1_700_000_100.0,
        "generation_id": gid,
        "generation_id_b": b,
        "provider": provider,
        "kind": kind,
        "value_json": json.dumps(value),
        "raw": raw,
        "judge_model": "",
        "latency_s": 0.0,
        "error": "",
    }


@pytest.fixture
def log_db(tmp_path: Path) -> Path:
    """Six generations: base (1, 2), detox@v1 (3, 4), detox@v2 (5, 6), tagged by a quantile
    provider, scored, one pairwise judgement, one error, and app feedback."""
    path = tmp_path / "log.sqlite"
    db = connect(path)
    texts = ["[bold]markup is not rendered[/bold]", LONG, "awful", "fine", "good", "great"]
    versions = [("", 0), ("", 0), ("detox", 1), ("detox", 1), ("detox", 2), ("detox", 2)]
    db.table("generations").insert_all(
        _gen(i + 1, f"grp{i // 2}", a, v, t)
        for i, ((a, v), t) in enumerate(zip(versions, texts, strict=True))
    )
    tags = ["Low", "High", "Low", "High", "High", "High"]
    scores = [-0.5, 0.1, -0.9, 0.2, 0.6, 0.9]
    db.table("annotations").insert_all(
        [
            _note(f"gen-{i + 1}", "q", "tag", t, raw=str(s))
            for i, (t, s) in enumerate(zip(tags, scores, strict=True))
        ]
        + [_note(f"gen-{i + 1}", "sent", "score", s) for i, s in enumerate(scores)]
        + [_note("gen-3", "judge", "preference", {"winner": "b"}, raw="B", b="gen-4")]
        + [{**_note("gen-6", "judge-tag", "tag", None), "error": "unparseable: ???"}]
    )
    db.table("feedback").insert_all(
        [
            {
                "id": "fb-1",
                "created_at": 1.0,
                "generation_id": "gen-4",
                "score": 0.9,
                "tag": "Harmless",
                "critique": "",
                "refinement": "",
                "chosen_id": "",
                "rejected_id": "",
                "idempotency_key": None,
                "source": "app",
            },
            {
                "id": "fb-2",
                "created_at": 2.0,
                "generation_id": "gen-3",
                "score": None,
                "tag": "",
                "critique": "",
                "refinement": "",
                "chosen_id": "gen-3",
                "rejected_id": "gen-4",
                "idempotency_key": "k2",
                "source": "app",
            },
        ]
    )
    db.conn.close()
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(log, list(args), env={"COLUMNS": "250"}, catch_exceptions=False)


def _db_rows(path: Path, sql: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def test_tail_shows_recent_generations(log_db: Path) -> None:
    r = run("tail", "--db", str(log_db))
    assert r.exit_code == 0, r.output
    for i in range(1, 7):
        assert f"gen-{i}" in r.output
    assert "detox@v1" in r.output and "detox@v2" in r.output and "base" in r.output
    assert "[bold]markup is not rendered[/bold]" in r.output
    assert LONG[:60].strip() in r.output and LONG[:70] not in r.output
    assert "Harmless 0.9" in r.output and "chosen" in r.output and "rejected" in r.output
    assert "Lowest Toxicity" in r.output
    last_two = run("tail", "--db", str(log_db), "-n", "2")
    assert "gen-5" in last_two.output and "gen-6" in last_two.output
    assert "gen-4" not in last_two.output


def test_show_prints_every_label_of_a_generation(log_db: Path) -> None:
    r = run("show", "gen-4", "--db", str(log_db))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["generation"]["id"] == "gen-4"
    assert doc["generation"]["sampling"] == {"temperature": 1.0, "seed": 4}
    assert doc["generation"]["output_token_ids"] == [4, 5]
    notes = {(a["provider"], a["kind"]): a for a in doc["annotations"]}
    assert set(notes) == {("q", "tag"), ("sent", "score"), ("judge", "preference")}
    assert notes["q", "tag"]["value"] == "High" and notes["q", "tag"]["raw"] == "0.2"
    assert notes["judge", "preference"]["value"] == {"winner": "b"}  # gen-4 is its b side
    assert {f["id"] for f in doc["feedback"]} == {"fb-1", "fb-2"}


def test_show_unknown_generation_names_it(log_db: Path) -> None:
    r = run("show", "gen-99", "--db", str(log_db))
    assert r.exit_code == 1
    assert "unknown generation id 'gen-99'" in r.output


def test_missing_log_is_a_clear_error(tmp_path: Path) -> None:
    r = run("tail", "--db", str(tmp_path / "nope.sqlite"))
    assert r.exit_code == 1 and "no generation log at" in r.output
    assert not (tmp_path / "nope.sqlite").exists()  # read-only: nothing created


def test_export_jsonl_round_trips(log_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    r = run("export", "--db", str(log_db), "--out", str(out))
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    generations = _db_rows(log_db, "SELECT * FROM generations ORDER BY seq")
    annotations = _db_rows(log_db, "SELECT * FROM annotations ORDER BY seq")
    assert [{k: v for k, v in r.items() if k != "annotations"} for r in records] == generations
    for rec in records:
        assert rec["annotations"] == [a for a in annotations if a["generation_id"] == rec["id"]]
    # Every annotation exactly once (the pairwise one under its first generation).
    assert sum(len(r["annotations"]) for r in records) == len(annotations) == 14
    assert "exported 6 generations (14 annotations)" in r.output


def test_export_seq_range(log_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "part.jsonl"
    r = run(
        "export", "--db", str(log_db), "--out", str(out), "--since-seq", "2", "--until-seq", "4"
    )
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == [3, 4]


def test_export_parquet_matches_jsonl(log_db: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    run("export", "--db", str(log_db), "--out", str(tmp_path / "e.jsonl"))
    r = run("export", "--db", str(log_db), "--out", str(tmp_path / "e.parquet"))
    assert r.exit_code == 0, r.output
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.num_rows == 6
    as_jsonl = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert table.to_pylist() == as_jsonl
    empty = run("export", "--db", str(log_db), "--out", str(tmp_path / "none.pq"),
                "--format", "parquet", "--since-seq", "6")  # fmt: skip
    assert empty.exit_code == 0, empty.output
    assert pq.read_table(tmp_path / "none.pq").schema == table.schema


def test_plot_writes_a_png(log_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels.png"
    r = run("plot", "--db", str(log_db), "--out", str(out))
    assert r.exit_code == 0, r.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    only = tmp_path / "q.png"
    assert run("plot", "--db", str(log_db), "--out", str(only), "--provider", "q").exit_code == 0
    assert 0 < only.stat().st_size < len(data)  # one panel instead of two


def test_plot_without_labels_says_so(log_db: Path, tmp_path: Path) -> None:
    r = run("plot", "--db", str(log_db), "--out", str(tmp_path / "x.png"), "--provider", "nobody")
    assert r.exit_code == 1 and "no tag or score annotations from provider 'nobody'" in r.output
    assert not (tmp_path / "x.png").exists()


def test_plot_draws_the_learner_table_without_labels(log_db: Path, tmp_path: Path) -> None:
    from tiller.server.formats.logstore import IterationRecord, record_iteration

    db = connect(log_db)
    rec = IterationRecord("a", 1, "promoted", 1.0, 2.0, 3, final_loss=0.5, version=1,
                          candidate_value=0.2, incumbent_value=0.1)  # fmt: skip
    record_iteration(db, rec)
    db.conn.close()
    out = tmp_path / "learner.png"
    r = run("plot", "--db", str(log_db), "--out", str(out), "--provider", "nobody")
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
