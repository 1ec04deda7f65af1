"""Attribute steering inside a real vLLM engine (in this process), per-step logprobs against the
pure-torch reference, on Llama, Qwen2 and Qwen3, with chunked prefill and prefix caching on."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.steering_reference import HeadsReference
from tiller.server.tools.heads_build import init_heads

PROMPT = "The movie was"
# Longer than max_num_batched_tokens below: its prefill is chunked over several steps.
LONG_PROMPT = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(30))
WEIGHTS = [
    {"base": 1.0},
    {"helpfulness": 1.0},
    {"base": 0.4, "helpfulness": 0.6},
    {"base": 1.5, "verbosity": -0.5},
    {"helpfulness": 2.0, "verbosity": -0.7, "base": 0.3},
    {"verbosity": 0.0, "base": 1.0},
]


def _tiny_variant(llama_dir: Path, out: Path, arch: str) -> Path:
    """A random tiny Qwen2/Qwen3 with the tiny Llama's tokenizer (same sizes)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if out.exists():
        return out
    out.mkdir(parents=True)
    for f in llama_dir.iterdir():
        if "token" in f.name or f.name.endswith(".jinja") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    import json

    llama = json.loads((llama_dir / "config.json").read_text())
    cfg_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    )
    config = cfg_cls(
        vocab_size=llama["vocab_size"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=llama["bos_token_id"],
        eos_token_id=llama["eos_token_id"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = model_cls(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def arch_model(request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: Any) -> Path:
    if request.param == "llama":
        return tiny_model
    return _tiny_variant(tiny_model, tmp_path_factory.mktemp(request.param) / "m", request.param)


@pytest.fixture(scope="module")
def heads_dir(arch_model: Path, tmp_path_factory: Any) -> Path:
    out = tmp_path_factory.mktemp("heads") / "v1"
    init_heads(arch_model, out, ["helpfulness", "verbosity"], rank=8, scale=0.5, seed=3)
    return out


@pytest.fixture(scope="module")
def reference(arch_model: Path, heads_dir: Path) -> HeadsReference:
    return HeadsReference(arch_model, heads_dir)


@pytest.fixture(scope="module")
async def llm(arch_model: Path) -> AsyncIterator[Any]:
    from vllm.v1.engine.async_llm import AsyncLLM

    from tiller.server.config import EngineConfig
    from tiller.server.engine import engine_args, steering_architecture

    assert steering_architecture(arch_model) is not None
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    config = EngineConfig(
        model=arch_model, dtype="float32", gpu_memory_utilization=0.1, max_model_len=1024
    )
    engine = AsyncLLM.from_engine_args(
        engine_args(
            config,
            logprobs_mode="processed_logprobs",  # logprobs of the steered distribution
            max_num_batched_tokens=64,
            max_num_seqs=16,
        )
    )
    yield engine
    engine.shutdown()


_ids = iter(range(10**9))


async def _run(
    llm: Any, ids: list[int], lam: list[float] | None, heads: Path, max_tokens: int = 10
) -> tuple[list[int], list[float]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"tiller_steer": {"heads": str(heads), "weights": lam}} if lam is not None else None
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, extra_args=extra)
    out = None
    async for step in llm.generate(TokensPrompt(prompt_token_ids=ids), sp, f"r{next(_ids)}"):
        out = step
    assert out is not None
    c = out.outputs[0]
    assert c.logprobs is not None
    return list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)]


def _vector(reference: HeadsReference, given: dict[str, float]) -> list[float]:
    return list(reference.weights(given).values())


@pytest.mark.parametrize("given", WEIGHTS, ids=lambda w: ",".join(f"{k}={v}" for k, v in w.items()))
async def test_steered_logprobs_match_the_reference(
    llm: Any, reference: HeadsReference, heads_dir: Path, given: dict[str, float]
) -> None:
    ids = reference.tok.encode(PROMPT)
    tokens, logprobs = await _run(llm, ids, _vector(reference, given), heads_dir)
    reference.check(ids, given, tokens, logprobs)


async def test_base_one_hot_reproduces_the_base_model_exactly(
    llm: Any, reference: HeadsReference, heads_dir: Path
) -> None:
    ids = reference.tok.encode(PROMPT)
    plain = await _run(llm, ids, None, heads_dir, max_tokens=16)
    steered = await _run(llm, ids, _vector(reference, {"base": 1.0}), heads_dir, max_tokens=16)
    assert steered == plain  # token ids and logprobs bit for bit


async def test_chunked_prefill_prefix_cache_and_a_mixed_batch(
    llm: Any, reference: HeadsReference, heads_dir: Path
) -> None:
    """A long prompt (chunked prefill) shared by several requests (prefix cache hits), with a
    different λ each plus unsteered ones, in one batch: each equals its solo run and the
    reference."""
    ids = reference.tok.encode(LONG_PROMPT)
    assert len(ids) > 2 * 64
    mixes: list[dict[str, float] | None] = [WEIGHTS[2], None, WEIGHTS[3], None, WEIGHTS[4]]
    vectors = [None if m is None else _vector(reference, m) for m in mixes]
    together = await asyncio.gather(*[_run(llm, ids, v, heads_dir, 8) for v in vectors])
    for v, m, got in zip(vectors, mixes, together, strict=True):
        solo = await _run(llm, ids, v, heads_dir, 8)  # prompt now cached
        assert got[0] == solo[0]
        assert got[1] == pytest.approx(solo[1], abs=1e-5)
        reference.check(ids, m if m is not None else {"base": 1.0}, got[0], got[1])


async def test_a_trained_class_head_moves_the_class_share_monotonically(
    llm: Any, arch_model: Path, tiny_model: Path, tmp_path_factory: Any
) -> None:
    """Steerability: a low-rank head fitted to prefer tokens containing a digit; sweeping its
    weight λ (weights base 1-λ, digits λ) moves the digit share of greedy outputs up, in order.
    """
    if arch_model != tiny_model:
        pytest.skip("one architecture is enough for the sweep")
    from tiller.server.tools.heads_build import train_class_head

    tok = __import__("transformers").AutoTokenizer.from_pretrained(arch_model)
    cls = {i for i in range(len(tok)) if any(c.isdigit() for c in tok.decode([i]))}
    assert 10 < len(cls) < len(tok) // 2
    out = tmp_path_factory.mktemp("digits") / "v1"
    texts = [LONG_PROMPT, PROMPT, "def f(x):\n    return x", "import os\nclass A:\n    pass"]
    train_class_head(arch_model, out, "digits", sorted(cls), texts, rank=4, steps=150)
    prompts = [PROMPT, "def f(x):", "import os", "class A:", "The quick brown fox", "for i in"]
    prompts += ["return self.", "# Copyright"]
    shares = []
    # λ ≥ 0: a negative λ flips h·Aᵀ·Bᵀ, which is linear in h, so off the training
    # distribution it need not push away from the class (seen: λ=-1 raised the share).
    for lam in (0.0, 0.1, 0.25, 0.5, 1.0, 2.0):
        runs = await asyncio.gather(
            *[_run(llm, tok.encode(p), [1.0 - lam, lam], out, 16) for p in prompts]
        )
        ids = [t for tokens, _ in runs for t in tokens]
        shares.append(sum(t in cls for t in ids) / len(ids))
    # Monotone up to the noise of discrete greedy trajectories near saturation (4 of 128 tokens).
    assert all(b >= a - 0.035 for a, b in itertools.pairwise(shares)), shares
    assert shares[-1] >= shares[0] + 0.3, shares
