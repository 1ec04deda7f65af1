"""The annotator survives any judge: a real ``tiller annotate`` process follows a real SQLite log
while the judge (``tests/fake_openai.py``) goes through an outage and a garbage phase.

Endpoint-wide faults (connection refused, 5xx, 429, stalls) leave the backlog waiting, with no
annotation written; per-item faults (malformed bodies, missing fields, huge answers, 4xx,
answers naming no option) become error annotations. Once the judge recovers every generation is
labelled exactly once, and the process never dies. No vLLM engine is needed.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_openai import ENDPOINT_MODES, GARBAGE_MODES, FakeJudge
from tiller.learner.annotate.judge import JudgeConfig, LLMJudge
from tiller.learner.annotate.runner import Annotator
from tiller.server.formats.logstore import GenerationRow, connect, insert_generations

TAGS = ("Clear", "Vague", "Off topic")
PROVIDERS = ("judge-tag", "judge-pair")


@pytest.fixture
def fake() -> Iterator[FakeJudge]:
    with FakeJudge() as judge:
        yield judge


def _write(db_path: Path, label: str, groups: int = 1) -> list[str]:
    """``groups`` requests of two samples each, appended to the log; returns their ids."""
    db = connect(db_path)
    rows = [
        GenerationRow(
            id=f"{label}-{g}-{s}",
            created_at=time.time(),
            request_id=f"req-{label}-{g}",
            group_id=f"grp-{label}-{g}",
            sample_index=s,
            prompt=f"Say something about {label} {g}",
            chat_json="",
            rendered_prompt=f"Say something about {label} {g}",
            feedback="",
            feedback_mix_json="",
            attributes_json="",
            adapter="",
            adapter_version=0,
            base_model="tiny",
            sampling_json="{}",
            seed=g,
            output_text="word " * (1 + s + g),
            output_token_ids="[]",
            finish_reason="stop",
            prompt_tokens=4,
            completion_tokens=1 + s + g,
            latency_s=0.01,
            ttft_s=0.01,
        )
        for g in range(groups)
        for s in range(2)
    ]
    insert_generations(db, rows)
    db.conn.close()
    return [r.id for r in rows]


def _labels(db_path: Path) -> dict[str, Counter[str]]:
    """Per provider: how many annotations name each generation (as either side of a pair)."""
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute(
            "SELECT provider, generation_id, coalesce(generation_id_b, '') FROM annotations"
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, Counter[str]] = {p: Counter() for p in PROVIDERS}
    for provider, a, b in rows:
        out.setdefault(provider, Counter()).update([a] + ([b] if b else []))
    return out


def _errors(db_path: Path) -> dict[tuple[str, str], str]:
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute("SELECT provider, generation_id, error FROM annotations").fetchall()
    finally:
        conn.close()
    return {(p, g): e for p, g, e in rows}


def _wait_labelled(db_path: Path, ids: list[str], proc: subprocess.Popen[bytes], limit: float):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the annotator died"
        labels = _labels(db_path)
        if all(labels[p][g] >= 1 for p in PROVIDERS for g in ids):
            return labels
        time.sleep(0.1)
    raise AssertionError(f"not labelled within {limit}s: {ids}; have {_labels(db_path)}")


def test_outage_and_garbage_then_everything_labelled_once(tmp_path: Path, fake: FakeJudge) -> None:
    db_path = tmp_path / "log.sqlite"
    connect(db_path).conn.close()
    judge = f"""
base_url = "{fake.base_url}"
model = "judge"
timeout_s = 1.0
max_retries = 1
backoff_s = 0.05
breaker_threshold = 4
breaker_cooldown_s = 0.5
"""
    config = tmp_path / "annotate.toml"
    config.write_text(f"""
db = "{db_path}"
batch_size = 4
retry_delay_s = 0.1
poll_interval_s = 0.1

[[providers]]
name = "judge-tag"
type = "llm_judge"
mode = "tag"
tags = {json.dumps(list(TAGS))}
{judge}
[[providers]]
name = "judge-pair"
type = "llm_judge"
mode = "pairwise"
{judge}""")
    stderr = (tmp_path / "annotator.err").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiller.client.cli", "annotate", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        healthy = _write(db_path, "healthy", groups=2)
        _wait_labelled(db_path, healthy, proc, 60)

        # Outage: nothing is written for the waiting generations, the process stays up.
        waited: list[str] = []
        for mode in ENDPOINT_MODES:
            fake.set_mode(mode)
            waited += _write(db_path, mode)
            time.sleep(3.0 if mode in ("stall", "trickle") else 2.0)
            assert proc.poll() is None, f"the annotator died in mode {mode}"
            labels = _labels(db_path)
            assert not any(labels[p][g] for p in PROVIDERS for g in waited), mode
        fake.set_mode("healthy")
        _wait_labelled(db_path, waited, proc, 60)

        # Garbage: each malformed answer becomes an error annotation for the item hit.
        garbage: list[str] = []
        for mode in GARBAGE_MODES:
            fake.set_mode(mode)
            ids = _write(db_path, mode)
            garbage += ids
            _wait_labelled(db_path, ids, proc, 60)
        fake.set_mode("healthy")
        after = _write(db_path, "after", groups=2)
        labels = _wait_labelled(db_path, after, proc, 60)

        everything = healthy + waited + garbage + after
        for p in PROVIDERS:
            assert set(labels[p]) == set(everything), p
            assert all(n == 1 for n in labels[p].values()), (p, labels[p])
        errors = _errors(db_path)
        for (provider, gid), error in errors.items():
            if gid in garbage:
                assert error, (provider, gid)
            else:
                assert not error, (provider, gid, error)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        stderr.close()
    log = (tmp_path / "annotator.err").read_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]  # every fault was classified, none escaped
    for fault in ("APIConnectionError", "HTTP 50", "Timeout"):  # each wait was logged
        assert fault in log, fault


async def test_structured_outputs_refused_then_plain_prompting(
    tmp_path: Path, fake: FakeJudge, caplog: pytest.LogCaptureFixture
) -> None:
    """An OpenAI-compatible API that is not vLLM refuses ``structured_outputs`` with a 400: the
    judge switches to plain prompting once, logs it once, and still labels everything."""
    fake.set_mode("reject_structured")
    db_path = tmp_path / "log.sqlite"
    ids = _write(db_path, "plain", groups=3)
    judges = [
        LLMJudge(
            JudgeConfig(
                name=f"judge-{mode}",
                mode=mode,  # type: ignore[arg-type]
                base_url=fake.base_url,
                model="judge",
                tags=TAGS,
                max_concurrency=1,
            )
        )
        for mode in ("tag", "pairwise")
    ]
    db = connect(db_path)
    with caplog.at_level(logging.WARNING, logger="tiller.annotate"):
        annotator = Annotator(db, judges, batch_size=4, retry_delay_s=0.0)
        await annotator.drain()
    switches = [r for r in caplog.records if "plain prompting" in r.getMessage()]
    assert len(switches) == 2, [r.getMessage() for r in caplog.records]  # once per judge
    assert fake.structured_requests() == 2  # the first request of each judge, then never again
    assert all(not j.transport.structured for j in judges)
    tags = db.execute(
        "SELECT generation_id, value_json, error FROM annotations WHERE provider = 'judge-tag'"
    ).fetchall()
    assert sorted(g for g, _, _ in tags) == sorted(ids)
    assert all(e == "" and json.loads(v) in TAGS for _, v, e in tags)
    pairs = db.execute(
        "SELECT value_json, error FROM annotations WHERE provider = 'judge-pairwise'"
    ).fetchall()
    assert len(pairs) == 3 and all(e == "" for _, e in pairs)
    # The fake prefers the longer response in both orders: every verdict is consistent.
    assert all(json.loads(v)["winner"] in ("a", "b") for v, _ in pairs)
    db.conn.close()
