"""The held-out evaluation's statistics: paired comparison of conditions sharing prompts/seeds."""

from __future__ import annotations

import math
import random

import pytest

from tiller.learner.align.evaluate import Stats, compare, mean_ci


def stats(label: str, scores: list[float]) -> Stats:
    m, ci = mean_ci(scores)
    return Stats(label, len(scores), m, ci, 1.0, None, tuple(scores), ())


def test_mean_ci_is_the_student_t_interval() -> None:
    m, ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert ci == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-5)  # t(0.975, 3)
    assert mean_ci([1.0]) == (1.0, math.inf)


def test_compare_pairs_scores_by_prompt_and_seed() -> None:
    # Per-prompt variation dwarfs the effect (+0.1): unpaired it is invisible, paired it is clear.
    rng = random.Random(0)
    prompt_effect = [rng.gauss(0, 1) for _ in range(64)]
    a = stats("a", [x + 0.1 + rng.gauss(0, 0.05) for x in prompt_effect])
    b = stats("b", [x + rng.gauss(0, 0.05) for x in prompt_effect])
    c = compare(a, b)
    assert c["diff"] == pytest.approx(a.mean - b.mean)
    assert c["p"] < 1e-6 < 0.3 < c["p_welch"]
    assert abs(c["diff"] - 0.1) < c["ci95"] < 0.05
    flipped = compare(b, a)
    assert flipped["diff"] == pytest.approx(-c["diff"]) and flipped["p"] == pytest.approx(c["p"])


def test_compare_refuses_unpaired_conditions() -> None:
    with pytest.raises(ValueError, match="not paired"):
        compare(stats("a", [1.0, 2.0, 3.0]), stats("b", [1.0, 2.0]))


def test_spread_is_a_paired_condition_and_conditions_add_the_prompted_version() -> None:

    from tiller.learner.align.config import EvalConfig
    from tiller.learner.align.evaluate import conditions, spread

    s = spread(stats("hi", [3.0, 2.0, 5.0]), stats("lo", [1.0, 2.0, 1.0]), "tag spread")
    assert s.scores == (2.0, 0.0, 4.0) and s.mean == 2.0 and s.n == 3
    with pytest.raises(ValueError, match="not paired"):
        spread(stats("hi", [1.0]), stats("lo", [1.0, 2.0]), "x")

    from tiller.server.formats.manifest import Conditioning

    cfg = EvalConfig(prompts=("p",), scorer="length", tags=("Hi", "Lo"))
    cond = Conditioning(tags=("Hi", "Lo"), template="{feedback}: {prompt}", separator="")
    labels = [c.label for c in conditions(cfg, "steer", 3, prompted=(1, cond))]
    assert labels == [
        "base", "steer@v3 [Hi]", "steer@v3 [Lo]",
        "prompted steer@v1 [Hi]", "prompted steer@v1 [Lo]",
    ]  # fmt: skip
    # nothing trained was promoted
    assert len(conditions(cfg, "steer", 1, prompted=(1, cond))) == 3
    # The prompted conditions are the base model with the tag rendered into the prompt: no
    # version number the server may have unloaded.
    prompted = conditions(cfg, "steer", 3, (1, cond))[3:]
    assert [(c.label, c.adapter, c.version, c.feedback) for c in prompted] == [
        ("prompted steer@v1 [Hi]", "", None, "Hi"),
        ("prompted steer@v1 [Lo]", "", None, "Lo"),
    ]
    assert all(c.render == cond for c in prompted)
    assert [c.label for c in conditions(cfg, "steer", None)] == ["base"]
