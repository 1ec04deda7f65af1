"""The OpenAI-compatible HTTP API with the real ``openai`` SDK (sync, async, streaming) against
the session's tiny-model server: the same service, log and steering as gRPC."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import TAGS, ServerProc
from tiller.client import Client

PROMPT = "def parse(value):"
GREEDY = dict(max_tokens=10, temperature=0.0)
USER = [{"role": "user", "content": "Tell me about basil."}]


@pytest.fixture(scope="module")
def oa(server: ServerProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(target: str) -> Iterator[Client]:
    with Client(target, timeout=120) as c:
        yield c


def _tiller(resp: object) -> dict:
    extra = getattr(resp, "model_extra", None) or {}
    return extra["tiller"]


def test_models_lists_the_base_and_every_adapter_version(oa: openai.OpenAI) -> None:
    ids = [m.id for m in oa.models.list().data]
    assert ids[0] == "tiny-llama"
    assert {"detox", "detox@v1", "detox@v2"} <= set(ids)
    detox = next(m for m in oa.models.list().data if m.id == "detox")
    meta = (detox.model_extra or {})["tiller"]
    assert meta["active_version"] == 2 and meta["feedback_tags"] == list(TAGS)


def test_completion_is_the_grpc_generation(oa: openai.OpenAI, grpc_client: Client) -> None:
    r = oa.completions.create(model="tiny-llama", prompt=PROMPT, **GREEDY)
    g = grpc_client.generate(PROMPT, **GREEDY)
    assert r.choices[0].text == g.text and r.choices[0].text
    assert r.choices[0].finish_reason == g.completions[0].finish_reason
    assert r.usage is not None
    assert r.usage.completion_tokens == g.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    info = _tiller(r)
    assert info["adapter"] == "" and info["base_model"] == "tiny-llama" and info["logged"]
    assert r.model == "tiny-llama" and r.object == "text_completion"


def test_generations_are_logged_with_their_ids(oa: openai.OpenAI, log_db: Path) -> None:
    r = oa.completions.create(model="tiny-llama", prompt=PROMPT, n=2, temperature=1.0, seed=3,
                              max_tokens=5)  # fmt: skip
    ids = _tiller(r)["generation_ids"]
    assert len(ids) == 2 == len(r.choices)
    conn = sqlite3.connect(log_db)
    rows = dict(
        conn.execute(
            f"SELECT id, output_text FROM generations WHERE id IN ({','.join('?' * len(ids))})",
            ids,
        ).fetchall()
    )
    conn.close()
    assert [rows[i] for i in ids] == [c.text for c in r.choices]


def test_a_list_of_prompts_is_a_batch(oa: openai.OpenAI) -> None:
    r = oa.completions.create(model="tiny-llama", prompt=[PROMPT, "class A:"], **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    one = oa.completions.create(model="tiny-llama", prompt="class A:", **GREEDY)
    assert r.choices[1].text == one.choices[0].text


def test_chat_uses_the_chat_template(oa: openai.OpenAI, grpc_client: Client) -> None:
    r = oa.chat.completions.create(model="tiny-llama", messages=USER, **GREEDY)
    g = grpc_client.generate(USER, **GREEDY)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == g.text
    assert r.object == "chat.completion"


def test_stop_seed_and_sampling_params_reach_the_engine(oa: openai.OpenAI) -> None:
    kw = dict(model="tiny-llama", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9,
              extra_body={"top_k": 20, "repetition_penalty": 1.1})  # fmt: skip
    a = oa.completions.create(seed=5, **kw)  # type: ignore[arg-type]
    b = oa.completions.create(seed=5, **kw)  # type: ignore[arg-type]
    assert a.choices[0].text == b.choices[0].text and _tiller(a)["seed"] == 5
    text = a.choices[0].text
    assert len(text) > 4, text  # seed 5 samples 16 tokens
    stop = text[2:4]
    c = oa.completions.create(seed=5, stop=[stop], **kw)  # type: ignore[arg-type]
    assert stop not in c.choices[0].text and c.choices[0].finish_reason == "stop"
    # top_k = 1 leaves only the argmax to sample at any temperature: the greedy text.
    greedy = oa.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=16,
                                   temperature=0.0)  # fmt: skip
    top1 = oa.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=16,
                                 temperature=1.0, seed=9, extra_body={"top_k": 1})  # fmt: skip
    assert top1.choices[0].text == greedy.choices[0].text


def test_ignore_eos_in_extra_body(oa: openai.OpenAI) -> None:
    kw = dict(model="tiny-llama", prompt="x =", max_tokens=300, temperature=1.5)
    stopped = next(
        (s for s in range(64)
         if oa.completions.create(seed=s, **kw).choices[0].finish_reason == "stop"),  # type: ignore[arg-type]
        None,
    )  # fmt: skip
    assert stopped is not None, "no seed in 64 sampled an end-of-sequence token"
    r = oa.completions.create(seed=stopped, extra_body={"ignore_eos": True}, **kw)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 300


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_stream_equals_unary(oa: openai.OpenAI, api: str) -> None:
    if api == "chat":
        unary = oa.chat.completions.create(model="tiny-llama", messages=USER, **GREEDY)
        chunks = list(
            oa.chat.completions.create(
                model="tiny-llama", messages=USER, stream=True,
                stream_options={"include_usage": True}, **GREEDY,
            )
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        expected = unary.choices[0].message.content
    else:
        unary = oa.completions.create(model="tiny-llama", prompt=PROMPT, **GREEDY)
        chunks = list(
            oa.completions.create(
                model="tiny-llama", prompt=PROMPT, stream=True,
                stream_options={"include_usage": True}, **GREEDY,
            )
        )  # fmt: skip
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = unary.choices[0].text
    assert len([c for c in chunks if c.choices]) > 2, "tokens should arrive in several chunks"
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}
    last = chunks[-1]
    assert last.usage is not None and unary.usage is not None
    assert last.usage.completion_tokens == unary.usage.completion_tokens
    assert _tiller(last)["logged"] is True
    assert _tiller(chunks[0])["generation_ids"][0].startswith("gen-")


async def test_async_client_runs_requests_concurrently(server: ServerProc) -> None:
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as ac:
        results = await asyncio.gather(
            *[
                ac.completions.create(
                    model="tiny-llama",
                    prompt=f"def f{i}(a):",
                    max_tokens=8,
                    temperature=1.0,
                    seed=i,
                )
                for i in range(12)
            ]
        )
        stream = await ac.chat.completions.create(
            model="tiny-llama", messages=USER, stream=True, **GREEDY
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert len({_tiller(r)["request_id"] for r in results}) == 12
    assert all(r.usage is not None and r.usage.completion_tokens > 0 for r in results)
    assert streamed


# ---------------------------------------------------------------- logprobs


def test_completion_logprobs(oa: openai.OpenAI, grpc_client: Client) -> None:
    r = oa.completions.create(model="tiny-llama", prompt=PROMPT, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    n = r.usage.completion_tokens if r.usage else 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and all(v <= 0 for v in top.values())
        assert value == pytest.approx(max(top.values()))  # greedy: the sampled one is the top
        assert top[token] == pytest.approx(value)
    # The same numbers over gRPC, typed.
    g = grpc_client.generate(PROMPT, logprobs=3, **GREEDY)
    got = g.completions[0].logprobs
    assert [t.token_id for t in got] == list(g.completions[0].token_ids)
    assert [t.logprob for t in got] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert all(len(t.top) == 3 and t.top[0].logprob >= t.top[-1].logprob for t in got)


def test_chat_logprobs_and_stream_logprobs(oa: openai.OpenAI) -> None:
    r = oa.chat.completions.create(model="tiny-llama", messages=USER, logprobs=True,
                                   top_logprobs=2, **GREEDY)  # fmt: skip
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert r.usage is not None and content and len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)
    stream = oa.chat.completions.create(model="tiny-llama", messages=USER, logprobs=True,
                                        top_logprobs=2, stream=True, **GREEDY)  # fmt: skip
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content or []]  # fmt: skip
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    plain = oa.chat.completions.create(model="tiny-llama", messages=USER, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_sampled_logprobs_are_those_of_the_sampling_distribution(oa: openai.OpenAI) -> None:
    # top_k=2 leaves two candidates: their probabilities (after temperature) sum to one.
    r = oa.completions.create(model="tiny-llama", prompt=PROMPT, logprobs=2, max_tokens=6,
                              temperature=0.7, seed=1, extra_body={"top_k": 2})  # fmt: skip
    lp = r.choices[0].logprobs
    assert lp is not None and lp.top_logprobs
    for top in lp.top_logprobs:
        assert sum(math.exp(v) for v in top.values()) == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------- steering


def test_feedback_in_extra_body_is_the_grpc_conditioning(
    oa: openai.OpenAI, grpc_client: Client
) -> None:
    tag = TAGS[0]
    r = oa.completions.create(model="detox", prompt="The movie was",
                              extra_body={"feedback": tag}, **GREEDY)  # fmt: skip
    g = grpc_client.generate("The movie was", adapter="detox", feedback=tag, **GREEDY)
    assert r.choices[0].text == g.text
    info = _tiller(r)
    assert info["adapter"] == "detox" and info["adapter_version"] == 2 and r.model == "detox@v2"
    pinned = oa.completions.create(model="detox@v1", prompt="The movie was",
                                   extra_body={"feedback": tag}, **GREEDY)  # fmt: skip
    assert _tiller(pinned)["adapter_version"] == 1
    by_field = oa.completions.create(model="detox", prompt="The movie was",
                                     extra_body={"feedback": tag, "adapter_version": 1},
                                     **GREEDY)  # fmt: skip
    assert by_field.choices[0].text == pinned.choices[0].text


def test_feedback_mix_and_log_off_in_extra_body(
    oa: openai.OpenAI, grpc_client: Client, log_db: Path
) -> None:
    mix = {TAGS[0]: 1.5, TAGS[-1]: -0.5}
    r = oa.chat.completions.create(model="detox", messages=USER,
                                   extra_body={"feedback_mix": mix, "log": False},
                                   **GREEDY)  # fmt: skip
    g = grpc_client.generate(USER, adapter="detox", feedback_mix=mix, log=False, **GREEDY)
    assert r.choices[0].message.content == g.text
    info = _tiller(r)
    assert info["logged"] is False
    conn = sqlite3.connect(log_db)
    assert conn.execute(
        "SELECT count(*) FROM generations WHERE id = ?", (info["generation_ids"][0],)
    ).fetchone() == (0,)
    conn.close()


def test_structured_outputs_constrain_the_output(oa: openai.OpenAI) -> None:
    """vLLM's structured_outputs pass through (the annotator's judges send them)."""
    for seed in range(3):
        r = oa.chat.completions.create(
            model="tiny-llama", messages=USER, max_tokens=4, temperature=1.0, seed=seed,
            extra_body={"structured_outputs": {"choice": ["A", "B"]}},
        )  # fmt: skip
        assert r.choices[0].message.content in ("A", "B")
    r = oa.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6, temperature=0.0,
                              extra_body={"structured_outputs": {"regex": "[0-9]{3}"}})  # fmt: skip
    assert len(r.choices[0].text) == 3 and r.choices[0].text.isdigit()


# ---------------------------------------------------------------- errors


def _status(fn: object, **kw: object) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        fn(**kw)  # type: ignore[operator]
    return info.value


@pytest.mark.parametrize(
    ("kw", "status", "param"),
    [
        (dict(model="tiny-llama", extra_body={"feedback": TAGS[0]}), 400, "feedback"),
        (dict(model="detox", extra_body={"feedback": "Nonsense"}), 400, "feedback"),
        (dict(model="detox", extra_body={"attributes": {"humor": 1.0}}), 400, "attributes"),
        (dict(model="nope"), 404, "model"),
        (dict(model="detox@v9"), 404, "model"),
        (dict(model="tiny-llama", temperature=-1.0), 400, "temperature"),
        (dict(model="tiny-llama", max_tokens=0), 400, "max_tokens"),
        (dict(model="tiny-llama", max_tokens=100_000), 413, "max_tokens"),
        (
            dict(
                model="tiny-llama",
                extra_body={"structured_outputs": {"choice": ["a"], "regex": "b"}},
            ),
            400,
            "structured_outputs",
        ),
        (dict(model="tiny-llama", extra_body={"guided_choice": ["a"]}), 400, "guided_choice"),
        (
            dict(model="tiny-llama", extra_body={"feedback_mix": {"x": "heavy"}}),
            400,
            "feedback_mix.x",
        ),
        (dict(model="tiny-llama", logprobs=99), 400, "logprobs"),
        (dict(model="tiny-llama", frequency_penalty=0.5), 400, "frequency_penalty"),
        (dict(model="tiny-llama", extra_body={"adapter_version": 1}), 400, "adapter_version"),
    ],
    ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(map(str, x.values()))[:40],
)
def test_bad_requests_name_the_field(oa: openai.OpenAI, kw: dict, status: int, param: str) -> None:
    e = _status(oa.completions.create, prompt=PROMPT, max_tokens=kw.pop("max_tokens", 4), **kw)
    assert e.status_code == status
    body = e.body if isinstance(e.body, dict) else {}
    assert body.get("param") == param, body
    assert param.split(".")[0].rstrip("s") in body["message"], body


def test_bad_chat_messages_and_bodies(oa: openai.OpenAI, server: ServerProc) -> None:
    e = _status(oa.chat.completions.create, model="tiny-llama", max_tokens=4,
                messages=[{"role": "robot", "content": "hi"}])  # fmt: skip
    assert e.status_code == 400 and (e.body or {}).get("param") == "messages[0].role"  # type: ignore[union-attr]
    e = _status(oa.chat.completions.create, model="tiny-llama", max_tokens=4, messages=[])
    assert e.status_code == 400 and (e.body or {}).get("param") == "messages"  # type: ignore[union-attr]
    raw = httpx.post(f"{server.base_url}/completions", content=b"{not json", timeout=30)
    assert raw.status_code == 400 and "JSON" in raw.json()["error"]["message"]
    missing = httpx.post(f"{server.base_url}/completions", json={"model": "tiny-llama"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    route = httpx.get(f"{server.base_url}/nothing-here", timeout=30)
    assert route.status_code == 404 and "error" in route.json()


# ---------------------------------------------------------------- feedback and health


def test_feedback_over_http_is_idempotent(
    oa: openai.OpenAI, server: ServerProc, log_db: Path
) -> None:
    r = oa.completions.create(model="tiny-llama", prompt=PROMPT, **GREEDY)
    gid = _tiller(r)["generation_ids"][0]
    body = {"generation_id": gid, "score": 0.5, "tag": "helpful", "idempotency_key": f"k-{gid}",
            "source": "http-test"}  # fmt: skip
    url = f"{server.base_url}/feedback"
    first = httpx.post(url, json=body, timeout=30)
    again = httpx.post(url, json=body, timeout=30)
    assert first.status_code == again.status_code == 200, first.text
    assert first.json()["duplicate"] is False and again.json()["duplicate"] is True
    assert first.json()["id"] == again.json()["id"]
    conn = sqlite3.connect(log_db)
    n = conn.execute("SELECT count(*) FROM feedback WHERE generation_id = ?", (gid,)).fetchone()
    conn.close()
    assert n == (1,)
    unknown = httpx.post(url, json={**body, "generation_id": "gen-nope", "idempotency_key": ""},
                         timeout=30)  # fmt: skip
    assert unknown.status_code in (400, 404) and unknown.json()["error"]["param"]
    bad = httpx.post(url, json={**body, "score": "high"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"


def test_health_and_ready(server: ServerProc) -> None:
    root = server.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health", timeout=30).json() == {"status": "ok"}
    assert httpx.get(f"{root}/ready", timeout=30).status_code == 200


def test_raw_sse_wire_format(server: ServerProc) -> None:
    body = {"model": "tiny-llama", "prompt": PROMPT, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines)
    assert lines[-1] == "data: [DONE]"
    for x in lines[:-1]:
        json.loads(x.removeprefix("data: "))
