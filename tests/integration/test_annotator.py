"""The annotator against a real OpenAI-compatible judge (vLLM's server on the tiny model),
following the live server's generation log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import JudgeServer
from tiller.client import Client
from tiller.learner.annotate.follow import backlog, read_cursor
from tiller.learner.annotate.judge import JudgeConfig, LLMJudge
from tiller.learner.annotate.runner import Annotator
from tiller.server.formats.logstore import connect

TAGS = ("Harmless and very helpful", "Harmless and helpful", "Harmful")


@pytest.fixture(scope="module")
def generations(target: str) -> list[str]:
    """Fresh generations in the log: 6 requests x 2 samples (pairs for the pairwise judge)."""
    ids = []
    with Client(target, timeout=120) as c:
        for i in range(6):
            g = c.generate(
                f"Tell me about topic {i}", max_tokens=12, temperature=1.0, n=2, seed=100 + i
            )
            assert g.logged
            ids += [x.generation_id for x in g.completions]
    return ids


def _annotations(db_path: Path, provider: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM annotations WHERE provider = ?", [provider]).fetchall()
    finally:
        conn.close()


def _judge(judge_server: JudgeServer, name: str, mode: str, **kw: object) -> LLMJudge:
    return LLMJudge(
        JudgeConfig(
            name=name,
            mode=mode,
            base_url=judge_server.base_url,  # type: ignore[arg-type]
            model="judge",
            tags=TAGS,
            **kw,
        )
    )  # type: ignore[arg-type]


def _run(log_db: Path, *providers: LLMJudge, batch: int = 8) -> Annotator:
    db = connect(log_db)
    annotator = Annotator(db, list(providers), batch_size=batch, retry_delay_s=0.0)
    asyncio.run(annotator.drain())
    return annotator


def test_structured_tags_for_every_generation(
    log_db: Path, generations: list[str], judge_server: JudgeServer
) -> None:
    a = _run(log_db, _judge(judge_server, "judge-tag", "tag"))
    rows = {r["generation_id"]: r for r in _annotations(log_db, "judge-tag")}
    assert set(generations) <= set(rows)
    for gid in generations:
        r = rows[gid]
        assert r["error"] == "" and json.loads(r["value_json"]) in TAGS
        assert r["judge_model"] == "judge" and r["raw"]
    assert backlog(a.db, "judge-tag") == 0


def test_pairwise_in_both_orders(
    log_db: Path, generations: list[str], judge_server: JudgeServer
) -> None:
    _run(log_db, _judge(judge_server, "judge-pair", "pairwise"))
    rows = [r for r in _annotations(log_db, "judge-pair") if r["generation_id"] in generations]
    assert len(rows) == 6  # one judgement per request pair
    for r in rows:
        assert r["generation_id_b"] in generations and r["kind"] == "preference"
        value = json.loads(r["value_json"])
        assert value["winner"] in ("a", "b", "tie")
        raw = json.loads(r["raw"])
        assert set(raw) == {"a_first", "b_first"}
        if "p_a" in value:
            assert 0.0 <= value["p_a"] <= 1.0


def test_likert_critique_refinement(
    log_db: Path, generations: list[str], judge_server: JudgeServer
) -> None:
    _run(
        log_db,
        _judge(judge_server, "judge-likert", "likert", attributes=("helpfulness", "verbosity")),
        _judge(judge_server, "judge-critique", "critique", max_tokens=24),
        _judge(judge_server, "judge-refine", "refinement", max_tokens=24),
    )
    likert = {r["generation_id"]: r for r in _annotations(log_db, "judge-likert")}
    for gid in generations:
        value = json.loads(likert[gid]["value_json"])
        assert set(value) == {"helpfulness", "verbosity"}
        assert all(1 <= v <= 5 for v in value.values())
    for name, kind in (("judge-critique", "critique"), ("judge-refine", "refinement")):
        rows = [r for r in _annotations(log_db, name) if r["generation_id"] in generations]
        assert len(rows) == len(generations) and {r["kind"] for r in rows} == {kind}


def test_garbage_answers_are_recorded_as_errors_not_retried(
    log_db: Path, generations: list[str], judge_server: JudgeServer
) -> None:
    # Without structured outputs the random tiny model answers with noise. 16 tokens of it are
    # as unparseable as 256 and keep each call far below the timeout on a loaded machine (CI
    # failed here once: 256-token answers timed out and opened the breaker).
    garbage = _judge(
        judge_server, "judge-garbage", "tag", structured=False, max_tokens=16, timeout_s=120.0
    )
    a = _run(log_db, garbage)
    rows = [r for r in _annotations(log_db, "judge-garbage") if r["generation_id"] in generations]
    assert len(rows) == len(generations)
    errors = [r for r in rows if r["error"]]
    assert errors, "the unconstrained random model should produce unparseable answers"
    for r in errors:
        assert r["value_json"] == "null" and r["raw"] != "" and "no category" in r["error"]
    assert backlog(a.db, "judge-garbage") == 0


def test_judge_down_then_back_loses_nothing(
    log_db: Path, generations: list[str], judge_server: JudgeServer
) -> None:
    down = LLMJudge(
        JudgeConfig(
            name="judge-flaky",
            mode="tag",
            tags=TAGS,
            model="judge",
            base_url="http://127.0.0.1:9/v1",
            max_retries=1,
            backoff_s=0.01,
            timeout_s=2,
        )
    )
    a = _run(log_db, down)
    assert a.states["judge-flaky"].failures >= 1
    assert read_cursor(a.db, "judge-flaky") == 0  # nothing committed, the backlog waits
    assert _annotations(log_db, "judge-flaky") == []
    waiting = backlog(a.db, "judge-flaky")
    assert waiting >= len(generations)
    a = _run(log_db, _judge(judge_server, "judge-flaky", "tag"))
    assert backlog(a.db, "judge-flaky") == 0
    assert len(_annotations(log_db, "judge-flaky")) >= waiting


def test_judge_timeouts_keep_the_backlog(
    log_db: Path, generations: list[str], judge_server: JudgeServer
) -> None:
    slow = _judge(
        judge_server, "judge-slow", "critique", timeout_s=0.001, max_retries=1, backoff_s=0.01
    )
    a = _run(log_db, slow)
    assert a.states["judge-slow"].failures >= 1 and "Timeout" in a.states["judge-slow"].last_error
    assert read_cursor(a.db, "judge-slow") == 0


def test_kill_9_mid_run_then_resume_is_exactly_once(
    tmp_path: Path, log_db: Path, generations: list[str], judge_server: JudgeServer
) -> None:
    config = tmp_path / "annotate.toml"
    config.write_text(f"""
db = "{log_db}"
batch_size = 2
retry_delay_s = 0.2

[[providers]]
name = "judge-crash"
type = "llm_judge"
mode = "critique"
base_url = "{judge_server.base_url}"
model = "judge"
max_tokens = 48
max_concurrency = 1
""")
    cmd = [sys.executable, "-m", "tiller.client.cli", "annotate", "--config", str(config), "--once"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    conn = sqlite3.connect(log_db)
    total = conn.execute("SELECT count(*) FROM generations").fetchone()[0]
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline:
        done = conn.execute(
            "SELECT count(*) FROM annotations WHERE provider='judge-crash'"
        ).fetchone()[0]
        if done >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < done < total, "the kill should land mid-run"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = conn.execute(
        "SELECT generation_id, count(*) FROM annotations "
        "WHERE provider='judge-crash' GROUP BY generation_id"
    ).fetchall()
    conn.close()
    assert len(rows) == total and all(n == 1 for _, n in rows)
