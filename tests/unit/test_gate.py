"""The eval gate's arithmetic: distinct-n and the pass/fail decision, on hand-made evaluations."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from tiller.learner.fluency import load_scoring_model, perplexity
from tiller.learner.learn.gate import (
    Evaluation,
    GateConfig,
    HeadCheck,
    Side,
    decide,
    distinct_n,
    evaluate,
    paired_upper_bound,
)


def test_distinct_n_by_hand() -> None:
    assert distinct_n(["a b c", "a b"]) == pytest.approx(2 / 3)  # bigrams ab, bc, ab
    assert distinct_n(["bad bad bad bad"]) == pytest.approx(1 / 3)
    assert distinct_n(["one", ""]) == 1.0


def _ev(value: float | None, d2: float) -> Evaluation:
    return Evaluation(side="x", value=value, distinct2=d2, scores={}, texts=())


def test_decide_checks_each_rule() -> None:
    cfg = GateConfig(prompts=("p",), scorer="length", margin=0.1, min_distinct2_ratio=0.8)
    assert decide(_ev(1.0, 0.9), _ev(1.05, 1.0), cfg).passed  # within the margin
    v = decide(_ev(0.8, 0.9), _ev(1.0, 1.0), cfg)
    assert not v.passed and v.reasons[0].startswith("score:")
    v = decide(_ev(2.0, 0.5), _ev(1.0, 1.0), cfg)  # better reward, collapsed text
    assert not v.passed and v.reasons == (v.reasons[0],) and "fluency" in v.reasons[0]
    v = decide(_ev(None, 1.0), _ev(1.0, 1.0), cfg)
    assert not v.passed and "no value" in v.reasons[0]


def test_evaluate_spread_and_direction() -> None:
    cfg = GateConfig(
        prompts=("p",),
        scorer="length",
        metric="spread",
        high_tag="Long",
        low_tag="Short",
        higher_is_better=False,
    )
    texts = [("Long", "p", "a b c d"), ("Short", "p", "a"), ("Long", "p", "a b")]
    e = evaluate(Side("x", 1), texts, cfg)
    assert e.scores == {"Long": 3.0, "Short": 1.0}
    assert e.value == -2.0  # lower is better: the spread counts against
    assert e.per_prompt == (-2.0,)


def test_evaluate_per_prompt_values_keep_the_prompt_order() -> None:
    cfg = GateConfig(
        prompts=("p", "q"), scorer="length", metric="spread", high_tag="H", low_tag="L"
    )
    texts = [
        ("H", "p", "a b c"),
        ("H", "p", "a"),
        ("H", "q", "a"),
        ("L", "p", "a"),
        ("L", "q", "a b c d"),
    ]
    e = evaluate(Side("x", 1), texts, cfg)
    assert e.per_prompt == (1.0, -3.0)  # p: mean(3, 1) - 1; q: 1 - 4


def test_evaluate_uses_the_runs_scores_when_given() -> None:
    cfg = GateConfig(prompts=("p", "q"), scorer="length")
    texts = [("", "p", "a b c"), ("", "p", "a"), ("", "q", "a b")]
    here = evaluate(Side("x", 1), texts, cfg)
    assert here.value == pytest.approx(2.0) and here.per_prompt == (2.0, 2.0)
    given = evaluate(Side("x", 1), texts, cfg, scores=[3.0, 1.0, 2.0])
    assert given == here
    other = evaluate(Side("x", 1), texts, cfg, scores=[1.0, 1.0, 5.0])  # scores are not redone
    assert other.per_prompt == (1.0, 5.0)


def test_gate_sides_are_held_out_conditions() -> None:
    from tiller.learner.learn.gate_runs import conditions
    from tiller.server.formats.manifest import Conditioning

    spread = GateConfig(
        prompts=("p",), scorer="length", metric="spread", high_tag="Hi", low_tag="Lo"
    )
    adapter = conditions(Side("steer", 3, attributes=(("x", 1.0),)), spread)
    assert [(c.adapter, c.version, c.feedback, c.render, c.attributes) for c in adapter] == [
        ("steer", 3, "Hi", None, (("x", 1.0),)),
        ("steer", 3, "Lo", None, (("x", 1.0),)),
    ]
    with pytest.raises(ValueError, match="needs a conditioning"):
        conditions(Side("", 0), spread)
    cond = Conditioning(tags=("Hi", "Lo"))
    base = conditions(Side("", 0, cond), spread)
    assert [(c.adapter, c.feedback, c.render) for c in base] == [("", "Hi", cond), ("", "Lo", cond)]
    plain = conditions(Side("", 0), GateConfig(prompts=("p",), scorer="length"))
    assert [(c.adapter, c.feedback, c.render) for c in plain] == [("", "", None)]


def test_a_guided_gate_guides_served_sides_and_leaves_the_base_anchor_plain() -> None:
    from tiller.learner.heldout import HeldoutSampling
    from tiller.learner.learn.gate_runs import conditions
    from tiller.server.formats.manifest import Conditioning

    cfg = GateConfig(
        prompts=("p",), scorer="length", metric="spread", high_tag="Hi", low_tag="Lo",
        guidance=1.0,
    )  # fmt: skip
    steer = conditions(Side("steer", 3), cfg)
    assert [(c.feedback, c.mix) for c in steer] == [
        ("Hi", (("Hi", 2.0), ("Lo", -1.0))),
        ("Lo", (("Lo", 2.0), ("Hi", -1.0))),
    ]
    base = conditions(Side("", 0, Conditioning(tags=("Hi", "Lo"))), cfg)
    assert all(c.mix == () and c.render is not None for c in base)
    with pytest.raises(ValueError, match=r"gate\.guidance needs gate\.metric 'spread'"):
        GateConfig(prompts=("p",), scorer="length", guidance=1.0)
    with pytest.raises(ValueError, match=r"gate\.guidance must be a finite number"):
        GateConfig(prompts=("p",), scorer="length", metric="spread", high_tag="Hi",
                   low_tag="Lo", guidance=-1.0)  # fmt: skip
    with pytest.raises(ValueError, match=r"gate.sampling.repetition_penalty must be unset"):
        GateConfig(
            prompts=("p",), scorer="length", metric="spread", high_tag="Hi", low_tag="Lo",
            guidance=1.0, sampling=HeldoutSampling(repetition_penalty=1.2),
        )  # fmt: skip


def test_paired_upper_bound_by_hand() -> None:
    # diffs 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t(0.95, df=2) = 2.919986
    upper = paired_upper_bound([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], 0.95)
    assert upper == pytest.approx(2 + 2.919986 / math.sqrt(3), rel=1e-5)
    assert paired_upper_bound([1.0], [0.0], 0.95) == math.inf


def _pp(value: float, per_prompt: list[float]) -> Evaluation:
    return Evaluation(
        side="x", value=value, distinct2=1.0, scores={}, texts=(), per_prompt=tuple(per_prompt)
    )


def test_non_inferiority_passes_noise_and_rejects_a_clear_loss() -> None:
    cfg = GateConfig(prompts=("p",), scorer="length", confidence=0.9)
    incumbent = _pp(0.3, [0.9, -0.3, 0.6, 0.0])
    # Lower point value, but the paired differences straddle zero: not shown to be worse.
    noisy = decide(_pp(0.2, [0.5, 0.1, 0.2, 0.0]), incumbent, cfg)
    assert noisy.passed and noisy.paired_upper is not None and noisy.paired_upper > 0
    point = GateConfig(prompts=("p",), scorer="length")
    assert not decide(_pp(0.2, [0.5, 0.1, 0.2, 0.0]), incumbent, point).passed
    worse = decide(_pp(-0.7, [-0.1, -1.3, -0.4, -1.0]), incumbent, cfg)  # every prompt -1
    assert not worse.passed and "confidence" in worse.reasons[0]
    # a margin the loss stays within passes
    lenient = GateConfig(prompts=("p",), scorer="length", confidence=0.9, margin=1.5)
    assert decide(_pp(-0.7, [-0.1, -1.3, -0.4, -1.0]), incumbent, lenient).passed
    mismatch = decide(_pp(0.3, [0.3]), incumbent, cfg)
    assert not mismatch.passed and "different prompts" in mismatch.reasons[0]


def test_decide_bounds_diversity_from_the_base_models_own() -> None:
    # A 30-minute ALT run's distinct-2 per version: each 0.95x the last passes a per-version
    # floor of 0.85x, while the drift since the base compounds.
    cfg = GateConfig(
        prompts=("p",), scorer="length", min_distinct2_ratio=0.85, min_base_distinct2_ratio=0.85
    )
    assert decide(_ev(1.0, 0.697), _ev(1.0, 0.734), cfg, base_distinct2=0.80).passed
    v = decide(_ev(1.0, 0.642), _ev(1.0, 0.677), cfg, base_distinct2=0.80)
    assert not v.passed and v.base_distinct2 == 0.80
    assert v.reasons == ("fluency: distinct-2 0.642 < 0.85 × the base model's own 0.800",)
    missing = decide(_ev(1.0, 0.642), _ev(1.0, 0.677), cfg)
    assert missing.reasons == ("fluency: no distinct-2 of the base model's to compare with",)
    assert cfg.anchors_on_base
    assert not GateConfig(prompts=("p",), scorer="length", min_distinct2_ratio=0.85).anchors_on_base
    with pytest.raises(ValueError, match="min_base_distinct2_ratio"):
        GateConfig(prompts=("p",), scorer="length", min_base_distinct2_ratio=1.5)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_distinct2_ratio"):
            GateConfig(prompts=("p",), scorer="length", min_distinct2_ratio=bad)
    # Against the incumbent, a ratio above 1 asks for more diversity than is served.
    more = GateConfig(prompts=("p",), scorer="length", min_distinct2_ratio=1.1)
    assert not decide(_ev(1.0, 0.70), _ev(1.0, 0.70), more).passed
    assert decide(_ev(1.0, 0.78), _ev(1.0, 0.70), more).passed


def test_gate_config_errors() -> None:
    with pytest.raises(ValueError, match="held-out"):
        GateConfig(prompts=())
    with pytest.raises(ValueError, match="scorer, a judge"):
        GateConfig(prompts=("p",))
    with pytest.raises(ValueError, match="high_tag"):
        GateConfig(prompts=("p",), scorer="length", metric="spread")
    with pytest.raises(ValueError, match="max_perplexity_ratio"):
        GateConfig(prompts=("p",), scorer="length", max_perplexity_ratio=0.5)
    with pytest.raises(ValueError, match="max_base_perplexity_ratio"):
        GateConfig(prompts=("p",), scorer="length", max_base_perplexity_ratio=0.9)
    with pytest.raises(ValueError, match="confidence must be"):
        GateConfig(prompts=("p",), scorer="length", confidence=1.0)


def test_decide_rejects_text_the_base_model_finds_unlikely() -> None:
    cfg = GateConfig(prompts=("p",), scorer="length", max_perplexity_ratio=2.0)

    def ev(value: float, ppl: float | None) -> Evaluation:
        return Evaluation("x", value, 0.95, {}, (), perplexity=ppl)

    assert decide(ev(2.0, 59.0), ev(1.0, 30.0), cfg).passed  # 1.97x: within the bound
    v = decide(ev(2.0, 97.4), ev(1.0, 31.6), cfg)  # better reward, glued-token gibberish
    assert not v.passed and v.reasons == ("fluency: perplexity under the base 97.4 > 2.0 × "
                                          "incumbent 31.6",)  # fmt: skip
    assert v.candidate["perplexity"] == 97.4 and v.incumbent["perplexity"] == 31.6
    assert "no perplexity" in decide(ev(2.0, None), ev(1.0, 30.0), cfg).reasons[0]
    off = GateConfig(prompts=("p",), scorer="length")
    assert decide(ev(2.0, 1e6), ev(1.0, 1.0), off).passed  # not configured: not checked


def test_decide_bounds_drift_from_the_base_models_own_perplexity() -> None:
    cfg = GateConfig(
        prompts=("p",), scorer="length", max_perplexity_ratio=2.0, max_base_perplexity_ratio=3.0
    )

    def ev(value: float, ppl: float | None) -> Evaluation:
        return Evaluation("x", value, 0.95, {}, (), perplexity=ppl)

    # 1.6x the incumbent passes the per-version bound, but the drift since the base is 3.3x.
    v = decide(ev(2.0, 208.0), ev(1.0, 130.0), cfg, base_perplexity=63.0)
    assert not v.passed and v.base_perplexity == 63.0
    assert v.reasons == ("fluency: perplexity under the base 208.0 > 3.0 × the base model's "
                         "own 63.0",)  # fmt: skip
    assert decide(ev(2.0, 180.0), ev(1.0, 130.0), cfg, base_perplexity=63.0).passed  # 2.86x
    missing = decide(ev(2.0, 180.0), ev(1.0, 130.0), cfg)
    assert missing.reasons == ("fluency: no perplexity to compare with the base model's",)
    off = GateConfig(prompts=("p",), scorer="length", max_perplexity_ratio=2.0)
    assert decide(ev(2.0, 180.0), ev(1.0, 130.0), off).passed  # not configured: not checked
    assert (
        off.measures_perplexity
        and not GateConfig(prompts=("p",), scorer="length").measures_perplexity
    )


def test_perplexity_under_the_base_model_separates_its_own_text_from_noise(
    tiny_model: Path,
) -> None:
    import random

    import torch
    from transformers import AutoTokenizer

    scorer = load_scoring_model(tiny_model)
    tok, model = scorer
    prompt = "the quick brown"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        greedy = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    own = tok.decode(greedy, skip_special_tokens=True)
    rng = random.Random(0)
    vocab = AutoTokenizer.from_pretrained(tiny_model).vocab_size
    noise = tok.decode([rng.randrange(3, vocab) for _ in range(24)], skip_special_tokens=True)
    assert perplexity(scorer, [(prompt, own)]) < perplexity(scorer, [(prompt, noise)])
    assert math.isnan(perplexity(scorer, [(prompt, "")]))  # nothing to score


def test_perplexity_in_padded_batches_equals_one_sequence_at_a_time(tiny_model: Path) -> None:
    scorer = load_scoring_model(tiny_model, precision="fp32")  # padding, not rounding
    pairs = [
        ("the quick brown", " fox jumps over the lazy dog"),
        ("a", " b"),
        ("once upon a time there was", ""),  # nothing to score: skipped in both
        ("def f(x):", "\n    return x * 2 + 1  # a longer completion than the others"),
        ("hello", " world"),
    ]
    one_by_one = perplexity(scorer, pairs, batch_size=1)
    assert math.isfinite(one_by_one)
    assert perplexity(scorer, pairs, batch_size=3) == pytest.approx(one_by_one, rel=1e-4)
    assert perplexity(scorer, pairs) == pytest.approx(one_by_one, rel=1e-4)
    # Each pair's own value differs, so a mix-up of rows or masks would show.
    assert len({round(perplexity(scorer, [p]), 3) for p in pairs if p[1]}) == 4


def _with_heads(value: float, per_prompt: list[float], head: list[float]) -> Evaluation:
    return replace(_pp(value, per_prompt), heads=(_pp(sum(head) / len(head), head),))


def test_a_cmpo_gate_checks_every_head_on_its_own_scorer() -> None:
    simple = HeadCheck(attributes={"critical": 0.0, "simple": 1.0}, scorer="readability")
    cfg = GateConfig(
        prompts=("p",), scorer="length", confidence=0.9,
        attributes={"critical": 1.0, "simple": 0.0}, heads=(simple,),
    )  # fmt: skip
    assert cfg.head(0).scorer == "readability" and cfg.head(0).attributes == simple.attributes
    incumbent = _with_heads(0.3, [0.3, 0.3, 0.3, 0.3], [70.0, 60.0, 65.0, 75.0])
    # the first head holds; the simple head loses ~10 Flesch on every prompt
    worse = decide(_with_heads(0.3, [0.3, 0.3, 0.3, 0.3], [61.0, 49.0, 56.0, 64.0]), incumbent, cfg)
    assert not worse.passed
    assert worse.reasons[0].startswith("head {critical=0, simple=1} (readability): 57.5")
    assert worse.heads[0]["scorer"] == "readability" and worse.heads[0]["candidate"] == 57.5
    assert worse.heads[0]["paired_upper"] < 0
    kept = decide(_with_heads(0.3, [0.3, 0.3, 0.3, 0.3], [71.0, 59.0, 66.0, 74.0]), incumbent, cfg)
    assert kept.passed and kept.heads[0]["incumbent"] == 67.5
    # a side that did not measure the head check cannot pass
    missing = decide(_pp(0.3, [0.3, 0.3, 0.3, 0.3]), incumbent, cfg)
    assert not missing.passed and "not measured" in missing.reasons[0]


def test_head_checks_are_validated() -> None:
    with pytest.raises(ValueError, match="attributes is empty"):
        HeadCheck(attributes={}, scorer="length")
    with pytest.raises(ValueError, match="finite"):
        HeadCheck(attributes={"a": math.nan}, scorer="length")
    with pytest.raises(ValueError, match="scorer"):
        HeadCheck(attributes={"a": 1.0}, scorer="no-such-scorer")
    with pytest.raises(ValueError, match="needs a CMPO gate"):
        GateConfig(prompts=("p",), scorer="length", heads=(HeadCheck({"a": 1.0}, "length"),))


def test_a_head_check_has_its_own_margin_in_its_scorers_units() -> None:
    simple = HeadCheck(attributes={"simple": 1.0}, scorer="readability", margin=15.0)
    cfg = GateConfig(
        prompts=("p",), scorer="length", attributes={"critical": 1.0}, heads=(simple,), margin=0.1
    )
    assert cfg.head(0).margin == 15.0
    incumbent = _with_heads(0.3, [0.3] * 4, [70.0, 60.0, 65.0, 75.0])
    # 10 Flesch lower: inside the head's margin of 15, far outside the main margin of 0.1
    assert decide(_with_heads(0.3, [0.3] * 4, [60.0, 50.0, 55.0, 65.0]), incumbent, cfg).passed
    with pytest.raises(ValueError, match="margin"):
        HeadCheck(attributes={"simple": 1.0}, scorer="readability", margin=-1.0)


def test_a_collapsing_head_fails_the_distinct2_floor() -> None:
    simple = HeadCheck(attributes={"simple": 1.0}, scorer="readability")
    cfg = GateConfig(
        prompts=("p",), scorer="length", attributes={"critical": 1.0}, heads=(simple,),
        min_distinct2_ratio=0.8,
    )  # fmt: skip
    incumbent = _with_heads(0.3, [0.3] * 4, [70.0] * 4)
    collapsed = _with_heads(0.3, [0.3] * 4, [70.0] * 4)
    collapsed = replace(collapsed, heads=(replace(collapsed.heads[0], distinct2=0.5),))
    v = decide(collapsed, incumbent, cfg)
    assert not v.passed and "distinct-2 0.500" in v.reasons[0]
    assert v.heads[0]["distinct2"] == {"candidate": 0.5, "incumbent": 1.0}


def test_a_typo_in_a_gate_head_check_is_refused() -> None:
    import tomllib

    from tiller.learner.align.config import parse_config

    where = Path(__file__).resolve().parents[2] / "deploy" / "align"
    text = (where / "cmpo-plural.toml").read_text()
    assert "higher_is_better = true\n[learner.gate.sampling]" in text
    typo = text.replace(
        "higher_is_better = true\n[learner.gate.sampling]",
        "higher_is_beter = false\n[learner.gate.sampling]",
    )
    with pytest.raises(ValueError, match=r"gate\.heads.*higher_is_beter"):
        parse_config(tomllib.loads(typo), where)
