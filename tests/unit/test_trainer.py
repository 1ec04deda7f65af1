"""The shared training loop on the tiny random Llama: learning, determinism, kill -9 and resume.

Likelihoods are re-measured here one sequence at a time (no padding), independently of the
trainer's batched layout, so these tests also check that layout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from tiller.learner.batches import encode
from tiller.learner.checkpoints import latest_checkpoint
from tiller.learner.data.examples import PreferencePair, SFTExample
from tiller.learner.objectives.alt import ALTConfig
from tiller.learner.trainer import TrainConfig, train

PAIRS = [
    PreferencePair(prompt="def add(a, b):", chosen=" return a + b", rejected=" import os"),
    PreferencePair(prompt="class Foo:", chosen=" pass", rejected=" return None"),
    PreferencePair(prompt="for i in range(3):", chosen=" print(i)", rejected=" raise"),
    PreferencePair(prompt="if x is None:", chosen=" return", rejected=" while True"),
    PreferencePair(prompt="with open(p) as f:", chosen=" data = f.read()", rejected=" del f"),
    PreferencePair(prompt="try:", chosen=" yield", rejected=" except", label_confidence=0.75),
]
FEEDBACK = "Lowest Toxicity input: {p}<|separator|>"
SFT = [
    SFTExample(prompt=FEEDBACK.format(p=p), completion=c)
    for p, c in [
        ("def add(a, b):", " return a + b"),
        ("class Foo:", " pass"),
        ("for i in range(3):", " print(i)"),
        ("if x is None:", " return"),
    ]
]
QUIET = {"progress": False}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and on a busy 2-core runner extra
    threads spin against other work (measured 10-50x slower). The child process does the same,
    so every run compared here does identical arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _seq_logp(model: Any, tok: Any, prompt: str, completion: str) -> float:
    """log p(completion + EOS | prompt), one unpadded sequence."""
    p = tok(prompt).input_ids
    c = [*tok(completion, add_special_tokens=False).input_ids, tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
    return float(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None]).sum())


def _load(model_dir: Path, adapter: Path) -> tuple[Any, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _dpo_loss(model: Any, tok: Any, beta: float) -> float:
    total = 0.0
    for pair in PAIRS:
        pol = [_seq_logp(model, tok, pair.prompt, c) for c in (pair.chosen, pair.rejected)]
        with model.disable_adapter():
            ref = [_seq_logp(model, tok, pair.prompt, c) for c in (pair.chosen, pair.rejected)]
        h = (pol[0] - ref[0]) - (pol[1] - ref[1])
        total += math.log1p(math.exp(-beta * h))
    return total / len(PAIRS)


def test_dpo_steps_reduce_the_dpo_loss(tiny_model: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(objective="dpo", lr=5e-3, batch_size=6, max_steps=6, **QUIET)
    result = train(tiny_model, PAIRS, cfg, tmp_path / "out")
    assert result.steps == 6 and len(result.history) == 6 and result.samples_per_s > 0
    first = result.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B = 0: policy == ref
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert result.history[-1]["loss"] < first["loss"]
    assert result.history[-1]["rewards/accuracies"] == 1.0
    model, tok = _load(tiny_model, tmp_path / "out")
    after = _dpo_loss(model, tok, 0.1)
    assert after < math.log(2) - 0.1
    # Continuing that adapter: its first batched loss equals the unpadded one-by-one loss, and
    # the reference is still the base model.
    more = TrainConfig(objective="dpo", lr=5e-3, batch_size=6, max_steps=1, **QUIET)
    cont = train(tiny_model, PAIRS, more, tmp_path / "more", init_adapter=tmp_path / "out")
    assert cont.history[0]["loss"] == pytest.approx(after, rel=1e-4)


def test_alt_raises_completion_likelihood_under_feedback(tiny_model: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        objective="alt", objective_config=ALTConfig(), lr=5e-3, batch_size=2, max_steps=8, **QUIET
    )
    result = train(tiny_model, SFT, cfg, tmp_path / "out")
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # starts at the reference
    assert result.history[-1]["kl"] > 0 and result.history[-1]["nll"] < result.history[0]["nll"]
    model, tok = _load(tiny_model, tmp_path / "out")
    for ex in SFT:
        after = _seq_logp(model, tok, ex.prompt, ex.completion)
        with model.disable_adapter():
            before = _seq_logp(model, tok, ex.prompt, ex.completion)
        assert after > before + 1.0, ex


def _token_dists(model: Any, tok: Any, prompt: str, completion: str) -> torch.Tensor:
    """log-distributions over the vocabulary at each token of ``completion`` + EOS."""
    p = tok(prompt).input_ids
    c = [*tok(completion, add_special_tokens=False).input_ids, tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
    return torch.log_softmax(logits.float(), -1)


def test_alt_reference_prompt_conditions_the_kl_reference(tiny_model: Path, tmp_path: Path) -> None:
    # The first step's KL is measured at the base weights: 0 against the tagged prompt, and
    # KL(base(y | x) || base(y | f, x)) against the untagged one, re-measured here unpadded.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    untagged = [
        SFTExample(prompt=ex.prompt, completion=ex.completion, reference_prompt=raw)
        for ex, raw in zip(SFT, ["def add(a, b):", "class Foo:", "for i", "if x"], strict=True)
    ]
    cfg = TrainConfig(
        objective="alt", objective_config=ALTConfig(alpha=0.0), batch_size=4, max_steps=1, **QUIET
    )
    first = train(tiny_model, untagged, cfg, tmp_path / "u").history[0]["kl"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    kls = []
    for ex in untagged:
        assert ex.reference_prompt is not None
        pol = _token_dists(model, tok, ex.prompt, ex.completion)
        ref = _token_dists(model, tok, ex.reference_prompt, ex.completion)
        kls.append((ref.exp() * (ref - pol)).sum(-1))
    expected = float(torch.cat(kls).mean())
    assert expected > 1e-3
    assert first == pytest.approx(expected, rel=1e-3)
    assert train(tiny_model, SFT, cfg, tmp_path / "t").history[0]["kl"] == pytest.approx(
        0.0, abs=1e-5
    )


def test_alt_tag_contrast_scores_the_other_tags_and_separates_them(
    tiny_model: Path, tmp_path: Path
) -> None:
    other = "Highest Toxicity input: {p}<|separator|>"
    raw = ["def add(a, b):", "class Foo:", "for i in range(3):", "if x is None:"]
    examples = [
        SFTExample(
            prompt=ex.prompt, completion=ex.completion, contrast_prompts=(other.format(p=p),)
        )
        for ex, p in zip(SFT, raw, strict=True)
    ]
    cfg = TrainConfig(
        objective="alt",
        objective_config=ALTConfig(beta=0.0, alpha=0.0, contrast=1.0),
        lr=5e-3,
        batch_size=4,
        max_steps=10,
        **QUIET,
    )
    result = train(tiny_model, examples, cfg, tmp_path / "out")
    model, tok = _load(tiny_model, tmp_path / "out")

    def gap(ex: SFTExample) -> float:
        own = _seq_logp(model, tok, ex.prompt, ex.completion)
        return own - _seq_logp(model, tok, ex.contrast_prompts[0], ex.completion)

    after = [gap(ex) for ex in examples]
    with model.disable_adapter():
        before = [gap(ex) for ex in examples]
    # The first step's term is re-measured at the base weights, one sequence at a time.
    ce = sum(math.log1p(math.exp(-g)) for g in before) / len(before)
    assert result.history[0]["tag_ce"] == pytest.approx(ce, rel=1e-3)
    assert all(a > b + 0.5 for a, b in zip(after, before, strict=True)), (before, after)
    with pytest.raises(ValueError, match="contrast prompts"):
        train(tiny_model, SFT, cfg, tmp_path / "none")


def test_same_seed_same_weights(tiny_model: Path, tmp_path: Path) -> None:
    # Dropout, accumulation and an epoch boundary inside a step all draw on the seeded state.
    base = {
        "objective": "cdpo",
        "lora_dropout": 0.1,
        "batch_size": 2,
        "grad_accum": 2,
        "max_steps": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        **QUIET,
    }
    train(tiny_model, PAIRS, TrainConfig(**base, seed=3), tmp_path / "a")
    train(tiny_model, PAIRS, TrainConfig(**base, seed=3), tmp_path / "b")
    train(tiny_model, PAIRS, TrainConfig(**base, seed=4), tmp_path / "c")
    _assert_same_weights(tmp_path / "a", tmp_path / "b")
    wa, wc = _adapter(tmp_path / "a"), _adapter(tmp_path / "c")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_gradient_checkpointing_gives_the_same_weights(tiny_model: Path, tmp_path: Path) -> None:
    # It is resume-free (not in the checkpoint fingerprint), so it must not change the result;
    # LoRA dropout inside the recomputed layers must draw the same masks twice.
    base = {"objective": "dpo", "lora_dropout": 0.1, "batch_size": 3, "max_steps": 2, **QUIET}
    train(tiny_model, PAIRS, TrainConfig(**base), tmp_path / "plain")
    train(tiny_model, PAIRS, TrainConfig(**base, gradient_checkpointing=True), tmp_path / "gc")
    _assert_same_weights(tmp_path / "plain", tmp_path / "gc")


def test_truncation_keeps_the_completion_and_cuts_the_prompt_left(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = "def a(): pass\n" * 20
    full = tok(prompt).input_ids
    cfg = TrainConfig(max_length=16)
    p, c = encode(tok, prompt, " return 1", cfg)
    assert c[-1] == tok.eos_token_id and len(p) + len(c) == 16
    assert list(p) == full[-len(p) :]
    p, c = encode(tok, "x", " y" * 40, cfg)
    assert len(c) == 15 and len(p) == 1


def test_bf16_autocast_on_the_cpu_learns_and_stays_near_float32(
    tiny_model: Path, tmp_path: Path
) -> None:
    base = {"objective": "dpo", "lr": 5e-3, "batch_size": 6, "max_steps": 6, **QUIET}
    fp32 = train(tiny_model, PAIRS, TrainConfig(**base, precision="fp32"), tmp_path / "fp32")
    bf16 = train(tiny_model, PAIRS, TrainConfig(**base, precision="bf16"), tmp_path / "bf16")
    # Policy and reference round the same way at LoRA B = 0: the first loss is exactly log 2.
    assert bf16.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert bf16.history[-1]["loss"] < bf16.history[0]["loss"] - 0.1
    assert bf16.history[-1]["loss"] == pytest.approx(fp32.history[-1]["loss"], abs=0.1)
    wa, wb = _adapter(tmp_path / "fp32"), _adapter(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 for w in wb.values())  # float32 master weights
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the arithmetic did change


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="precision 'fp16'"):
        TrainConfig(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        TrainConfig(objective="ppo")
    with pytest.raises(ValueError, match="needs a DPOConfig"):
        TrainConfig(objective="dpo", objective_config=ALTConfig())
    assert isinstance(TrainConfig(objective="alt").loss_config, ALTConfig)


def test_wrong_example_type_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="trains on PreferencePair"):
        train(tiny_model, SFT, TrainConfig(objective="dpo", **QUIET), tmp_path / "out")


# ------------------------------------------------------------------------ kill -9 and resume

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    from tiller.learner.data.examples import PreferencePair
    torch.set_num_threads(1)
    from tiller.learner.trainer import TrainConfig, train

    # Slow each optimizer step so the parent can kill mid-run; the arithmetic is untouched.
    _step = torch.optim.AdamW.step
    def slow_step(self, *a, **k):
        time.sleep(0.4)
        return _step(self, *a, **k)
    torch.optim.AdamW.step = slow_step

    spec = json.loads(Path(sys.argv[1]).read_text())
    pairs = [PreferencePair(**p) for p in spec["pairs"]]
    cfg = spec["config"]
    cfg["checkpoint_dir"] = Path(cfg["checkpoint_dir"])
    train(Path(spec["model"]), pairs, TrainConfig(**cfg), Path(spec["out"]))
    """
)


def _resume_config(ckpt: Path | None) -> dict[str, Any]:
    return {
        "objective": "dpo",
        "lora_dropout": 0.1,
        "batch_size": 2,
        "grad_accum": 2,
        "max_steps": 10,
        "lr": 2e-3,
        "warmup_steps": 2,
        "seed": 11,
        "checkpoint_dir": ckpt,
        "checkpoint_every": 2 if ckpt else 0,
        **QUIET,
    }


def test_kill_9_then_resume_matches_uninterrupted(tiny_model: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    spec = {
        "model": str(tiny_model),
        "out": str(tmp_path / "killed"),
        "pairs": [asdict(p) for p in PAIRS],
        "config": {**_resume_config(ckpt), "checkpoint_dir": str(ckpt)},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "child.py").write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "spec.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(ckpt) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed").exists()
    killed_at = latest_checkpoint(ckpt)
    assert killed_at is not None

    resumed = train(
        tiny_model, PAIRS, TrainConfig(**_resume_config(ckpt)), tmp_path / "resumed", resume=True
    )
    assert resumed.resumed_from_step is not None and 2 <= resumed.resumed_from_step < 10
    plain = train(tiny_model, PAIRS, TrainConfig(**_resume_config(None)), tmp_path / "plain")
    _assert_same_weights(tmp_path / "resumed", tmp_path / "plain")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in plain.history]

    # A checkpoint written for other settings is refused rather than silently mixed in.
    other = TrainConfig(**{**_resume_config(ckpt), "lr": 1e-3})
    with pytest.raises(ValueError, match="another config"):
        train(tiny_model, PAIRS, other, tmp_path / "other", resume=True)


@pytest.mark.parametrize("native", [False, True])
def test_fast_precision_is_bf16_only_where_the_cpu_multiplies_bf16_natively(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiller.learner.precision import bf16_autocast, native_bf16
    from tiller.server.formats import hardware

    # Both kinds of CPU, whatever this machine is: the detector reads /proc/cpuinfo.
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert native_bf16(cpu) == native
    assert bf16_autocast(TrainConfig(precision="fast"), cpu) == native
    assert bf16_autocast(TrainConfig(precision="bf16"), cpu)
    assert not bf16_autocast(TrainConfig(), cpu) and not bf16_autocast(
        TrainConfig("dpo", precision="fp32"), cpu
    )
    with pytest.raises(ValueError, match="one of: auto, fast, fp32, bf16"):
        TrainConfig(precision="fp16")  # type: ignore[arg-type]
