"""Run-time feedback mixing against a pure-torch reference of the same mixture."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
import torch

from tests.conftest import ServerProc, start_server, stop_server
from tiller.client import AsyncClient, Client, TillerClientError

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


def test_preemption_never_returns_a_wrong_mixture(
    tiny_model: Path,
    lora_versions: list[Path],
    reference: Reference,
    tmp_path: Path,
    server: ServerProc,
) -> None:
    """A KV cache of a few blocks forces preemption: every mixed request either returns the
    reference mixture (possibly after a transparent rerun) or fails with ABORTED."""
    srv = start_server(
        tiny_model,
        tmp_path / "tinykv",
        "--adapter",
        f"detox={lora_versions[1]}",
        "--kv-blocks",
        "8",
        "--max-num-seqs",
        "16",
        "--max-model-len",
        "512",
        "--max-tokens-cap",
        "400",
        "--no-log",
    )
    mix = {"Lowest Toxicity": 1.5, "Maximum Toxicity": -0.5}
    steps = 160

    async def one(ac: AsyncClient) -> object:
        try:
            return await ac.generate(
                PROMPT, adapter="detox", feedback_mix=mix, max_tokens=steps, temperature=0.0
            )
        except TillerClientError as e:
            return e

    async def run() -> list[object]:
        async with AsyncClient(srv.target, timeout=300) as ac:
            return await asyncio.gather(*[one(ac) for _ in range(5)])

    try:
        results = asyncio.run(run())
    finally:
        stop_server(srv)
    ok = 0
    for r in results:
        if isinstance(r, TillerClientError):
            assert r.code == grpc.StatusCode.ABORTED and "lockstep" in r.message
        else:
            reference.check(PROMPT, mix, r.completions[0].token_ids)  # type: ignore[attr-defined]
            ok += 1
    assert ok >= 1
