"""Generate / GenerateStream on the real server (tiny model, real vLLM, real gRPC socket)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tiller.client import AsyncClient, Client


@pytest.fixture(scope="module")
def client(target: str) -> Client:
    with Client(target, timeout=120) as c:
        yield c


def test_unary_greedy(client: Client) -> None:
    g = client.generate("def parse(value):", max_tokens=12, temperature=0.0)
    assert len(g.completions) == 1
    c = g.completions[0]
    assert len(c.token_ids) == g.completion_tokens > 0
    assert c.finish_reason in ("length", "stop")
    if c.finish_reason == "length":
        assert g.completion_tokens == 12
    assert g.adapter == "" and g.adapter_version == 0 and g.base_model == "tiny-llama"
    assert g.rendered_prompt == "def parse(value):"
    assert c.generation_id.startswith("gen-")
    assert g.total_s >= g.time_to_first_token_s > 0


def test_prompt_tokens_are_what_the_engine_saw(client: Client, tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    g = client.generate("import json\nclass A:", max_tokens=2, temperature=0.0)
    assert g.prompt_tokens == len(tok.encode("import json\nclass A:"))


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(client: Client) -> None:
    a = client.generate("for item in", max_tokens=16, temperature=0.0)
    b = client.generate("for item in", max_tokens=16, temperature=0.0)
    assert a.completions[0].token_ids == b.completions[0].token_ids
    s1 = client.generate("for item in", max_tokens=24, temperature=1.0, seed=7)
    s2 = client.generate("for item in", max_tokens=24, temperature=1.0, seed=7)
    s3 = client.generate("for item in", max_tokens=24, temperature=1.0, seed=8)
    assert s1.seed == 7 and s1.completions[0].token_ids == s2.completions[0].token_ids
    assert s3.completions[0].token_ids != s1.completions[0].token_ids
    drawn = client.generate("for item in", max_tokens=4, temperature=1.0)
    assert drawn.seed != 0  # the server picked and reported a seed


def test_stream_matches_unary(client: Client) -> None:
    unary = client.generate("while True:", max_tokens=20, temperature=0.0)
    chunks = list(client.stream("while True:", max_tokens=20, temperature=0.0))
    body = [c for c in chunks if not c.final]
    assert len(body) > 1, "tokens should arrive in several chunks"
    assert "".join(c.text for c in body) == unary.text
    assert tuple(t for c in body for t in c.token_ids) == unary.completions[0].token_ids
    assert chunks[-1].final and chunks[-1].completion_tokens == unary.completion_tokens
    assert body[-1].finish_reason == unary.completions[0].finish_reason


def test_n_samples(client: Client) -> None:
    g = client.generate("return", max_tokens=8, temperature=1.0, n=3, seed=11)
    assert [c.index for c in g.completions] == [0, 1, 2]
    assert len({c.generation_id for c in g.completions}) == 3
    assert g.completion_tokens == sum(len(c.token_ids) for c in g.completions)
    chunks = list(client.stream("return", max_tokens=8, temperature=1.0, n=2, seed=11))
    assert {c.index for c in chunks if not c.final} == {0, 1}


def test_stop_strings(client: Client) -> None:
    free = client.generate("x = ", max_tokens=30, temperature=0.0).text
    assert len(free) > 4
    stop = free[2:4]
    g = client.generate("x = ", max_tokens=30, temperature=0.0, stop=[stop])
    assert stop not in g.text and g.completions[0].finish_reason == "stop"


def test_chat_messages(client: Client) -> None:
    g = client.generate(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0.0,
    )
    assert g.rendered_prompt == "<|system|>s<|end|><|user|>hello<|end|><|assistant|>"
    assert g.completion_tokens > 0


async def test_32_concurrent_requests(target: str) -> None:
    async with AsyncClient(target, timeout=120) as ac:
        results = await asyncio.gather(
            *[
                ac.generate(f"def f{i}(a, b):", max_tokens=16, temperature=1.0, seed=i)
                for i in range(32)
            ]
        )
    assert len(results) == 32
    assert len({r.request_id for r in results}) == 32
    assert all(r.completion_tokens > 0 for r in results)
    # Concurrent batching must not mix requests up: a repeat alone gives the same tokens.
    async with AsyncClient(target, timeout=120) as ac:
        again = await ac.generate("def f5(a, b):", max_tokens=16, temperature=1.0, seed=5)
    assert again.completions[0].token_ids == results[5].completions[0].token_ids


async def test_async_stream(target: str) -> None:
    async with AsyncClient(target) as ac:
        pieces = [c async for c in ac.stream("if x:", max_tokens=10, temperature=0.0)]
    assert pieces[-1].final
    finish = [p.finish_reason for p in pieces if p.finish_reason]
    assert finish in (["length"], ["stop"])
    produced = sum(len(p.token_ids) for p in pieces)
    assert produced == pieces[-1].completion_tokens
    assert produced == 10 or finish == ["stop"]


def test_ignore_eos_generates_past_the_end_of_sequence(client: Client) -> None:
    # Find a seeded sample that ends at EOS, then replay it with ignore_eos: the same tokens
    # (EOS included), then more, up to max_tokens.
    for seed in range(64):
        g = client.generate("x =", max_tokens=400, temperature=1.5, seed=seed)
        if g.completions[0].finish_reason == "stop":
            break
    else:
        pytest.fail("no seed in 64 sampled an end-of-sequence token")
    stopped = g.completions[0].token_ids
    again = client.generate("x =", max_tokens=400, temperature=1.5, seed=seed, ignore_eos=True)
    c = again.completions[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 400
    assert c.token_ids[: len(stopped)] == stopped
