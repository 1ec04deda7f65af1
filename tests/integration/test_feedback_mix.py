"""Run-time feedback mixing against a pure-torch reference of the same mixture."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Sequence
from inspect import signature
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from tests.conftest import ServerProc
from tiller.client import AsyncClient, Client, Generation, TillerClientError
from tiller.server.engine import Engine
from tiller.server.service import GenerationService
from tiller.server.values import Delta, EngineRequest

PROMPT = "The movie was"
GREEDY = dict(max_tokens=12, temperature=0.0)
NEAR_TIE = 1e-4  # float32 engine vs float32 torch agree to ~1e-6 per logprob


class Reference:
    """Σ_i w_i·log_softmax(logits under tag_i's prompt), argmax, appended to every condition."""

    def __init__(self, model_dir: Path, adapter_dir: Path) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(base, adapter_dir).eval()

    @torch.no_grad()
    def mixed(self, prompt: str, mix: dict[str, float], out: list[int]) -> torch.Tensor:
        """The mixture for the next token after ``out`` (full recompute, no KV cache)."""
        weights = torch.tensor(list(mix.values()))
        rows = []
        for tag in mix:
            ids = self.tok.encode(f"{tag} input: {prompt}<|separator|>") + out
            logits = self.model(torch.tensor([ids])).logits[0, -1]
            rows.append(torch.log_softmax(logits.float(), -1))
        return (weights.view(-1, 1) * torch.stack(rows)).sum(0)

    def check(self, prompt: str, mix: dict[str, float], got: Sequence[int]) -> int:
        """Teacher-forced check of a served greedy sequence: every token must be the
        reference's argmax, except where the reference itself has a near-tie (two tokens
        within ``NEAR_TIE`` of each other: float32 CPU kernels may order those either way).
        Returns the number of near-tie steps the server resolved differently."""
        flips = 0
        for k, token in enumerate(got):
            m = self.mixed(prompt, mix, list(got[:k]))
            best = int(m.argmax())
            if token != best:
                gap = float(m[best] - m[token])
                assert gap < NEAR_TIE, f"step {k}: served {token}, reference {best} (gap {gap})"
                flips += 1
        return flips


@pytest.fixture(scope="module")
def reference(tiny_model: Path, lora_versions: list[Path]) -> Reference:
    return Reference(tiny_model, lora_versions[1])  # detox@v2, the active version


@pytest.fixture(scope="module")
def client(target: str) -> Client:
    with Client(target, timeout=120) as c:
        yield c


MIXES = [
    {"Lowest Toxicity": 1.5, "Maximum Toxicity": -0.5},
    {"Lowest Toxicity": 0.5, "Moderate Toxicity": 0.5},
    {"Lowest Toxicity": 1.0, "Moderate Toxicity": 0.7, "Maximum Toxicity": -0.7},
    {"Maximum Toxicity": 2.0},
]


@pytest.mark.parametrize("mix", MIXES, ids=["cfg-2", "avg-2", "three", "single-sharpened"])
def test_greedy_mixture_matches_the_reference(
    client: Client, reference: Reference, mix: dict[str, float]
) -> None:
    g = client.generate(PROMPT, adapter="detox", feedback_mix=mix, **GREEDY)
    reference.check(PROMPT, mix, g.completions[0].token_ids)
    assert len(g.completions[0].token_ids) == 12
    rendered = json.loads(g.rendered_prompt)
    assert rendered == [f"{t} input: {PROMPT}<|separator|>" for t in sorted(mix)]


def test_logprobs_are_the_mixture_s(client: Client, reference: Reference) -> None:
    """Served logprobs are those of the mixed distribution (what was sampled from)."""
    mix = MIXES[0]
    g = client.generate(PROMPT, adapter="detox", feedback_mix=mix, logprobs=1, **GREEDY)
    c = g.completions[0]
    assert [t.token_id for t in c.logprobs] == list(c.token_ids)
    for k, t in enumerate(c.logprobs):
        expected = torch.log_softmax(reference.mixed(PROMPT, mix, list(c.token_ids[:k])), -1)
        assert abs(t.logprob - float(expected[t.token_id])) < 1e-3, f"step {k}"


def test_mixture_differs_from_each_condition_alone(client: Client) -> None:
    mix = {"Lowest Toxicity": 1.5, "Maximum Toxicity": -1.0}
    mixed = (
        client.generate(PROMPT, adapter="detox", feedback_mix=mix, max_tokens=24, temperature=0.0)
        .completions[0]
        .token_ids
    )
    alone = {
        client.generate(PROMPT, adapter="detox", feedback=t, max_tokens=24, temperature=0.0)
        .completions[0]
        .token_ids
        for t in mix
    }
    assert mixed not in alone


def test_single_tag_weight_one_is_byte_identical_to_plain_feedback(client: Client) -> None:
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=5)):
        plain = client.generate(
            PROMPT, adapter="detox", feedback="Moderate Toxicity", max_tokens=20, **kw
        )
        mixed = client.generate(
            PROMPT, adapter="detox", feedback_mix={"Moderate Toxicity": 1.0}, max_tokens=20, **kw
        )
        assert mixed.completions[0].token_ids == plain.completions[0].token_ids
        assert mixed.text.encode() == plain.text.encode()
        assert mixed.rendered_prompt == plain.rendered_prompt


def test_sampled_mixture_is_reproducible_with_a_seed(client: Client) -> None:
    mix = {"Lowest Toxicity": 1.2, "High-Moderate Toxicity": -0.2}
    a = client.generate(
        PROMPT, adapter="detox", feedback_mix=mix, max_tokens=24, temperature=1.0, seed=77
    )
    b = client.generate(
        PROMPT, adapter="detox", feedback_mix=mix, max_tokens=24, temperature=1.0, seed=77
    )
    assert a.completions[0].token_ids == b.completions[0].token_ids


def test_stream_equals_unary(client: Client) -> None:
    mix = {"Lowest Toxicity": 1.5, "Maximum Toxicity": -0.5}
    unary = client.generate(PROMPT, adapter="detox", feedback_mix=mix, **GREEDY)
    chunks = list(client.stream(PROMPT, adapter="detox", feedback_mix=mix, **GREEDY))
    assert tuple(t for c in chunks for t in c.token_ids) == unary.completions[0].token_ids
    assert "".join(c.text for c in chunks) == unary.text


async def test_mixed_batch_gives_each_request_its_solo_output(
    target: str, reference: Reference
) -> None:
    mixes = MIXES[:3]
    async with AsyncClient(target, timeout=120) as ac:
        solo_plain = await ac.generate("def f(x):", max_tokens=12, temperature=0.0)
        together = await asyncio.gather(
            *[ac.generate(PROMPT, adapter="detox", feedback_mix=m, **GREEDY) for m in mixes],
            *[ac.generate("def f(x):", max_tokens=12, temperature=0.0) for _ in range(4)],
            *[
                ac.generate(PROMPT, adapter="detox", feedback="Lowest Toxicity", **GREEDY)
                for _ in range(2)
            ],
        )
    for m, g in zip(mixes, together[:3], strict=True):
        reference.check(PROMPT, m, g.completions[0].token_ids)
    for g in together[3:7]:
        assert g.completions[0].token_ids == solo_plain.completions[0].token_ids


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(feedback_mix={"Lowest Toxicity": -1.0}), "sum to > 0"),
        (dict(feedback_mix={"Lowest Toxicity": 1.0, "Harmful": 1.0}), "'Harmful'"),
        (dict(feedback_mix={"Lowest Toxicity": 2.0}, n=2, temperature=1.0), "n = 1"),
        (dict(feedback_mix={"Lowest Toxicity": 2.0}, repetition_penalty=1.2), "repetition_penalty"),
    ],
)
def test_bad_mixes(client: Client, kwargs: dict, needle: str) -> None:
    with pytest.raises(TillerClientError) as info:
        client.generate(PROMPT, adapter="detox", max_tokens=4, **kwargs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.message


class CountingEngine:
    """The real engine, counting feedback-mix admissions: one per attempt of a mixed request,
    so attempts beyond one per request are the service's reruns after lockstep was lost."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.group_admissions = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate_group(
        self, requests: Sequence[EngineRequest]
    ) -> list[AsyncIterator[Sequence[Delta]]]:
        self.group_admissions += 1
        return await self.inner.generate_group(requests)


def vllm_preemptions() -> int:
    """vLLM's own ``vllm:num_preemptions`` counter of the engine in this process."""
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    return sum(
        int(m.value)
        for m in get_metrics_snapshot()
        if isinstance(m, Counter) and m.name == "vllm:num_preemptions"
    )


def test_preemption_never_returns_a_wrong_mixture(
    tiny_model: Path,
    lora_versions: list[Path],
    reference: Reference,
    monkeypatch: pytest.MonkeyPatch,
    server: ServerProc,  # started first: two engines never load at once
) -> None:
    """Mixed requests whose siblings vLLM preempts (its own counter says so) lose lockstep and
    are rerun by the service (counted at the engine boundary); every request then returns the
    reference mixture or, with its reruns spent, fails with ABORTED. The server runs in this
    process (``app.start``) so that the test can read the engine's counters."""
    from tiller.server.app import drain_and_stop, start
    from tiller.server.config import AdapterSource, EngineConfig, Limits, ServerConfig
    from tiller.server.engine import VllmEngine

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as `tiller serve` runs it
    engine_config = EngineConfig(
        model=tiny_model,
        dtype="float32",
        max_model_len=512,
        gpu_memory_utilization=0.1,
        # 8 blocks (128 tokens each on CPU) for ten sequences of ~175 tokens: preemption.
        num_kv_blocks=8,
        max_num_seqs=16,
    )
    config = ServerConfig(
        engine=engine_config,
        port=0,
        adapters=(AdapterSource("detox", lora_versions[1]),),
        limits=Limits(max_tokens_cap=400),
    )
    mix = {"Lowest Toxicity": 1.5, "Maximum Toxicity": -0.5}
    steps, n_requests = 160, 5
    retries = signature(GenerationService.generate).parameters["lockstep_retries"].default

    async def one(ac: AsyncClient) -> Generation | TillerClientError:
        try:
            return await ac.generate(
                PROMPT, adapter="detox", feedback_mix=mix, max_tokens=steps, temperature=0.0
            )
        except TillerClientError as e:
            return e

    async def run() -> tuple[list[Generation | TillerClientError], int, int]:
        engine = CountingEngine(VllmEngine.start(engine_config))
        running = await start(config, engine)
        try:
            async with AsyncClient(f"127.0.0.1:{running.port}", timeout=300) as ac:
                results = await asyncio.gather(*[one(ac) for _ in range(n_requests)])
            return results, vllm_preemptions(), engine.group_admissions
        finally:
            await drain_and_stop(running, grace_s=10.0)
            gc.unfreeze()  # start() froze the heap of this (test) process

    results, preempted, attempts = asyncio.run(run())
    aborted = [r for r in results if isinstance(r, TillerClientError)]
    served = [r for r in results if not isinstance(r, TillerClientError)]
    evidence = f"preemptions {preempted}, attempts {attempts}, aborted {len(aborted)}"
    assert preempted > 0, f"the tiny KV cache forced no preemption ({evidence})"
    assert attempts > n_requests, f"no sibling lost lockstep: nothing was rerun ({evidence})"
    assert attempts >= n_requests + retries * len(aborted), evidence
    for e in aborted:
        assert e.code == grpc.StatusCode.ABORTED and "lockstep" in e.message, e
    for g in served:
        c = g.completions[0]
        assert len(c.token_ids) == steps or c.finish_reason == "stop", evidence
        reference.check(PROMPT, mix, c.token_ids)
    assert served, f"every request ran out of reruns ({evidence})"


def test_engine_death_during_a_mixed_stream_is_unavailable(
    tiny_model: Path,
    lora_versions: list[Path],
    tmp_path: Path,
    server: ServerProc,  # started first: two engines never load at once
) -> None:
    """A real `tiller serve`, its engine-core process killed while a mixed stream runs: the
    stream ends with UNAVAILABLE and a message (not UNKNOWN), through the engine's error table."""
    import psutil

    from tests.conftest import start_server, stop_server

    srv = start_server(
        tiny_model, tmp_path / "srv", "--no-log", "--adapter", f"detox={lora_versions[1]}"
    )
    try:
        cores = [
            p
            for p in psutil.Process(srv.proc.pid).children(recursive=True)
            if "EngineCore" in " ".join([p.name(), *p.cmdline()])
        ]
        assert cores, "no engine-core process to kill"
        mix = {"Lowest Toxicity": 1.5, "Maximum Toxicity": -0.5}
        with Client(srv.target, timeout=120) as c:
            stream = c.stream(
                PROMPT, adapter="detox", feedback_mix=mix, max_tokens=2000, temperature=0.0
            )
            with pytest.raises(TillerClientError) as err:
                for i, _chunk in enumerate(stream):
                    if i == 0:
                        for p in cores:
                            p.kill()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
        assert "engine" in err.value.message, err.value
    finally:
        stop_server(srv)
