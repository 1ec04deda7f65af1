"""The eval gate's arithmetic: distinct-n and the pass/fail decision, on hand-made evaluations."""

from __future__ import annotations

import pytest

from tiller.learner.learn.gate import Evaluation, GateConfig, Side, decide, distinct_n, evaluate


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


def test_gate_config_errors() -> None:
    with pytest.raises(ValueError, match="held-out"):
        GateConfig(prompts=())
    with pytest.raises(ValueError, match="scorer, a judge"):
        GateConfig(prompts=("p",))
    with pytest.raises(ValueError, match="high_tag"):
        GateConfig(prompts=("p",), scorer="length", metric="spread")
