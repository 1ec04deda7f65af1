"""The engine's faults: seeded prompts that would be split into prefill chunks (which kills
vLLM's CPU engine) are served, and a server whose engine died exits instead of answering
UNAVAILABLE forever, leaving no empty generations in its log."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ServerProc, start_server, stop_server
from tiller.client import Client, TillerClientError
from tiller.client.client import RetryPolicy


def _long_prompt(model: Path, i: int, tokens: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    words, text = [], ""
    k = 0
    while len(tok.encode(text)) < tokens:
        words.append(f"w{i}x{k}")
        k += 1
        if k % 50 == 0:
            text = " ".join(words)
    return text


def test_seeded_prompts_beyond_one_steps_token_budget_keep_the_engine_alive(
    tiny_model: Path, target: str
) -> None:
    # 12 prompts of ~1500 tokens at once: far past one step's token budget, so a chunked
    # prefill would split some of them, and a split seeded request kills vLLM's CPU engine.
    prompts = [_long_prompt(tiny_model, i, 1500) for i in range(12)]

    def one(i: int) -> str:
        with Client(target, timeout=300, retry=RetryPolicy(attempts=0)) as c:
            return c.generate(prompts[i], max_tokens=4, temperature=1.0, seed=100 + i).text

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(one, range(len(prompts))))
    assert len(texts) == len(prompts)
    with grpc.insecure_channel(target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def _engine_core(server: ServerProc) -> psutil.Process:
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        if "EngineCor" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no vLLM engine core process under the server")


def test_a_server_whose_engine_died_exits_and_logs_no_empty_generations(
    tiny_model: Path, tmp_path: Path, server: ServerProc
) -> None:
    # `server` (the session one) is requested so that two servers never start at once.
    db = tmp_path / "log.sqlite"
    srv = start_server(tiny_model, tmp_path / "srv", "--log-db", str(db))
    try:
        with Client(srv.target, timeout=60, retry=RetryPolicy(attempts=0)) as c:
            assert c.generate("before the fault", max_tokens=4).logged
            _engine_core(srv).kill()
            with pytest.raises(TillerClientError) as err:
                c.generate("after the fault", max_tokens=4)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert srv.proc.wait(timeout=120) == 1  # exits on its own, for a supervisor to restart
        assert "the inference engine died" in srv.logs()
    finally:
        stop_server(srv)
    with sqlite3.connect(db) as conn:
        prompts = [p for (p,) in conn.execute("SELECT prompt FROM generations")]
    assert prompts == ["before the fault"]


def test_a_server_exits_within_seconds_of_its_engine_dying_even_when_idle(
    tiny_model: Path, tmp_path: Path, server: ServerProc
) -> None:
    srv = start_server(tiny_model, tmp_path / "idle", "--no-log")
    try:
        _engine_core(srv).kill()  # no request in flight: the health watch must notice
        assert srv.proc.wait(timeout=120) == 1
    finally:
        stop_server(srv)
