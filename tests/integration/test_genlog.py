"""The generation log on the real server: rows, durability of returned ids, app feedback."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from tiller.client import Client, TillerClientError


@pytest.fixture(scope="module")
def client(target: str) -> Client:
    with Client(target, timeout=120) as c:
        yield c


def _rows(db: Path, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def test_generation_is_durable_when_the_response_arrives(client: Client, log_db: Path) -> None:
    g = client.generate(
        "The movie was",
        adapter="detox",
        feedback="Lowest Toxicity",
        max_tokens=8,
        temperature=0.7,
        seed=42,
        request_id="req-log-1",
    )
    assert g.logged
    (row,) = _rows(log_db, "SELECT * FROM generations WHERE id = ?", (g.generation_id,))
    assert row["request_id"] == "req-log-1"
    assert row["rendered_prompt"] == "Lowest Toxicity input: The movie was<|separator|>"
    assert row["prompt"] == "The movie was" and row["feedback"] == "Lowest Toxicity"
    assert (row["adapter"], row["adapter_version"], row["base_model"]) == ("detox", 2, "tiny-llama")
    assert row["seed"] == 42
    sampling = json.loads(row["sampling_json"])
    assert sampling["temperature"] == pytest.approx(0.7) and sampling["max_tokens"] == 8
    assert row["output_text"] == g.text
    assert tuple(json.loads(row["output_token_ids"])) == g.completions[0].token_ids
    assert row["completion_tokens"] == g.completion_tokens
    assert row["prompt_tokens"] == g.prompt_tokens
    assert row["finish_reason"] == g.completions[0].finish_reason
    assert row["latency_s"] > 0


def test_n_samples_share_a_group(client: Client, log_db: Path) -> None:
    g = client.generate("pair me", max_tokens=6, temperature=1.0, n=2, seed=3)
    rows = _rows(
        log_db,
        "SELECT * FROM generations WHERE request_id = ? ORDER BY sample_index",
        (g.request_id,),
    )
    assert [r["id"] for r in rows] == [c.generation_id for c in g.completions]
    assert len({r["group_id"] for r in rows}) == 1


def test_seed_drawn_by_the_server_is_recorded(client: Client, log_db: Path) -> None:
    g = client.generate("seedless", max_tokens=4, temperature=1.0)
    (row,) = _rows(log_db, "SELECT seed FROM generations WHERE id = ?", (g.generation_id,))
    assert row["seed"] == g.seed


def test_log_false_is_not_recorded(client: Client, log_db: Path) -> None:
    g = client.generate("secret", max_tokens=4, temperature=0.0, log=False)
    assert not g.logged
    assert _rows(log_db, "SELECT 1 FROM generations WHERE id = ?", (g.generation_id,)) == []


def test_stream_is_logged_before_the_final_chunk(client: Client, log_db: Path) -> None:
    chunks = list(client.stream("streamed", max_tokens=6, temperature=0.0))
    assert chunks[-1].final and chunks[-1].logged
    gid = chunks[0].generation_id
    (row,) = _rows(log_db, "SELECT output_text FROM generations WHERE id = ?", (gid,))
    assert row["output_text"] == "".join(c.text for c in chunks)


def test_cancelled_stream_is_logged_as_abort(client: Client, log_db: Path) -> None:
    stream = client.stream("class Cancel:", max_tokens=1900, temperature=0.0)
    first = next(stream)
    stream.close()
    deadline = time.monotonic() + 10
    rows: list[sqlite3.Row] = []
    while time.monotonic() < deadline and not rows:
        rows = _rows(
            log_db,
            "SELECT finish_reason, completion_tokens FROM generations WHERE id = ?",
            (first.generation_id,),
        )
        time.sleep(0.05)
    assert rows and rows[0]["finish_reason"] == "abort"
    assert 0 < rows[0]["completion_tokens"] < 1900


def test_status_counts_log_writes(client: Client) -> None:
    before = client.status().log_written
    client.generate("count me", max_tokens=2, temperature=0.0)
    s = client.status()
    assert s.log_written >= before + 1 and s.log_lost == 0


def test_feedback_is_stored_and_idempotent(client: Client, log_db: Path) -> None:
    g = client.generate("rate me", max_tokens=4, temperature=0.0)
    r1 = client.submit_feedback(
        g.generation_id,
        score=0.9,
        tag="Harmless and helpful",
        critique="a bit short",
        refinement="longer text",
        idempotency_key="app-1-rate",
        source="tests",
    )
    assert r1.feedback_id.startswith("fb-") and not r1.duplicate
    r2 = client.submit_feedback(g.generation_id, score=0.1, idempotency_key="app-1-rate")
    assert r2.duplicate and r2.feedback_id == r1.feedback_id
    (row,) = _rows(log_db, "SELECT * FROM feedback WHERE idempotency_key = 'app-1-rate'")
    assert (
        row["generation_id"],
        row["score"],
        row["tag"],
        row["critique"],
        row["refinement"],
        row["source"],
    ) == (g.generation_id, 0.9, "Harmless and helpful", "a bit short", "longer text", "tests")


def test_preference_between_two_generations(client: Client, log_db: Path) -> None:
    g = client.generate("choose", max_tokens=4, temperature=1.0, n=2, seed=9)
    a, b = (c.generation_id for c in g.completions)
    r = client.submit_feedback(a, preferred_over=b)
    (row,) = _rows(
        log_db, "SELECT chosen_id, rejected_id FROM feedback WHERE id = ?", (r.feedback_id,)
    )
    assert (row["chosen_id"], row["rejected_id"]) == (a, b)


@pytest.mark.parametrize(
    ("kwargs", "code", "needle"),
    [
        (dict(generation_id="gen-nope", score=1.0), grpc.StatusCode.NOT_FOUND, "gen-nope"),
        (dict(generation_id="", score=1.0), grpc.StatusCode.INVALID_ARGUMENT, "generation_id"),
        (dict(generation_id="REAL"), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (dict(generation_id="REAL", score=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "score"),
        (
            dict(generation_id="REAL", preferred_over="REAL"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "itself",
        ),
        (
            dict(generation_id="REAL", preferred_over="gen-missing"),
            grpc.StatusCode.NOT_FOUND,
            "gen-missing",
        ),
        (dict(generation_id="REAL", tag="x" * 300), grpc.StatusCode.INVALID_ARGUMENT, "tag"),
    ],
)
def test_bad_feedback(
    client: Client, log_db: Path, kwargs: dict, code: grpc.StatusCode, needle: str
) -> None:
    real = client.generate("fb target", max_tokens=2, temperature=0.0).generation_id
    kw = {k: (real if v == "REAL" else v) for k, v in kwargs.items()}
    before = _rows(log_db, "SELECT count(*) AS n FROM feedback")[0]["n"]
    with pytest.raises(TillerClientError) as info:
        client.submit_feedback(kw.pop("generation_id"), **kw)
    assert info.value.code == code and needle in info.value.message
    assert _rows(log_db, "SELECT count(*) AS n FROM feedback")[0]["n"] == before


def test_feedback_cli_stores_once_and_names_unknown_ids(client: Client, target: str) -> None:
    from click.testing import CliRunner

    from tiller.client.cli import main

    g = client.generate("CLI feedback please", max_tokens=4)
    args = ["feedback", g.generation_id, "--target", target, "--score", "0.9", "--key", "cli-1"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and first.output.strip().startswith("fb"), first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and again.output.split()[0] == first.output.split()[0]
    assert "(duplicate)" in again.output
    missing = CliRunner().invoke(main, ["feedback", "gen-nope", "--target", target, "--score", "1"])
    assert missing.exit_code != 0 and "NOT_FOUND" in missing.output
