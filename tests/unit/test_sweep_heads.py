"""The CMPO sweep's per-head verdicts: paired gain at the head's extreme, monotone means."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tiller.learner.align.config import SweepConfig
from tiller.learner.align.sweep import SweepPoint, heads


def _point(label: str, lam: float | None, a: list[float], b: list[float]) -> SweepPoint:
    weights = {} if lam is None else {"crit": lam, "simple": 1.0 - lam}
    scores = {"sentiment": tuple(a), "readability": tuple(b)}
    means = {k: (sum(v) / len(v), 0.0) for k, v in scores.items()}
    return SweepPoint(label, weights, means, len(a), scores)


BASE_A = [0.5, 0.4, 0.6, 0.5, 0.45, 0.55]
BASE_B = [60.0, 62.0, 58.0, 61.0, 59.0, 60.0]
NOISE = [0.01, -0.02, 0.015, -0.01, 0.0, 0.005]


def _sweep(crit_shift: list[float], simple_shift: list[float]) -> list[SweepPoint]:
    """Base, then λ = 0, 0.5, 1 with sentiment shifted by crit_shift[i] and readability by
    simple_shift[i] (plus a little per-sample noise, the same at every λ)."""
    noise = NOISE
    pts = [_point("base", None, BASE_A, BASE_B)]
    for lam, ds, dr in zip((0.0, 0.5, 1.0), crit_shift, simple_shift, strict=True):
        pts.append(
            _point(
                f"λ={lam:g}",
                lam,
                [x + ds + n for x, n in zip(BASE_A, noise, strict=True)],
                [x + dr + 10 * n for x, n in zip(BASE_B, noise, strict=True)],
            )
        )
    return pts


CFG = SweepConfig(
    attributes=("crit", "simple"),
    scorers=("sentiment", "readability"),
    lambdas=(0.0, 0.5, 1.0),
    higher_is_better=(False, True),
)


def test_both_heads_keep_their_promise() -> None:
    # sentiment falls as λ (the critical weight) rises; readability rises as λ falls
    crit, simple = heads(_sweep([0.0, -0.1, -0.3], [8.0, 4.0, 0.0]), CFG)
    assert crit["attribute"] == "crit" and crit["lambda"] == 1.0
    assert crit["gain"] == pytest.approx(0.3 - 0.0, abs=0.01) and crit["p"] < 0.05
    assert crit["monotone"]
    assert simple["attribute"] == "simple" and simple["lambda"] == 0.0
    assert simple["gain"] == pytest.approx(
        8.0 + 10 * sum([0.01, -0.02, 0.015, -0.01, 0, 0.005]) / 6
    )
    assert simple["p"] < 0.05 and simple["monotone"]
    assert simple["means_toward_head"][-1] > simple["means_toward_head"][0]


def test_a_head_that_moves_the_wrong_way_or_not_monotonically_is_reported() -> None:
    # the critical head makes text more positive; the simple head's middle point overshoots
    crit, simple = heads(_sweep([0.0, 0.1, 0.2], [5.0, 9.0, 0.0]), CFG)
    assert crit["gain"] < 0 and not crit["monotone"]
    assert simple["gain"] > 0 and not simple["monotone"]


def test_sweep_config_checks_directions_and_lambdas() -> None:
    with pytest.raises(ValueError, match="higher_is_better"):
        SweepConfig(("a", "b"), ("length", "length"), higher_is_better=(True,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="repeat"):
        SweepConfig(("a", "b"), ("length", "length"), lambdas=(0.0, 1.0, 1.0))


def _noisy_sweep(crit_means: list[float], n: int = 200, sd: float = 0.3) -> list[SweepPoint]:
    """Base, then λ = 0, 0.25, ..., 1 with per-sample sentiment drawn around crit_means[i]
    (independent noise per λ: neighbouring points can invert by chance)."""
    import numpy as np

    rng = np.random.default_rng(7)
    flat = [60.0] * n
    pts = [_point("base", None, list(rng.normal(0.0, sd, n)), flat)]
    for lam, m in zip((0.0, 0.25, 0.5, 0.75, 1.0), crit_means, strict=True):
        pts.append(_point(f"λ={lam:g}", lam, list(rng.normal(m, sd, n)), flat))
    return pts


CFG5 = SweepConfig(
    attributes=("crit", "simple"),
    scorers=("sentiment", "readability"),
    lambdas=(0.0, 0.25, 0.5, 0.75, 1.0),
    higher_is_better=(False, True),
)


def test_a_trend_with_a_small_inversion_is_monotone_within_noise_not_strictly() -> None:
    # sentiment falls with λ, but λ 0.5 -> 0.75 goes back up by less than the noise
    crit, simple = heads(_noisy_sweep([0.2, 0.1, -0.05, -0.03, -0.2]), CFG5)
    assert not crit["monotone"]
    assert crit["trend_p"] < 1e-6 and crit["reversals"] == []
    assert crit["monotone_within_noise"]
    # a flat attribute has no trend: not monotone within noise, whatever its order
    assert simple["trend_p"] > 0.05 and not simple["monotone_within_noise"]


def test_a_real_reversal_is_named_even_with_a_trend() -> None:
    # an overall fall with one large step back up (0.25 -> 0.5)
    (crit, _) = heads(_noisy_sweep([0.3, 0.0, 0.3, -0.2, -0.4]), CFG5)
    assert crit["trend_p"] < 0.05
    assert crit["reversals"] == [(0.25, 0.5)] and not crit["monotone_within_noise"]


def test_a_head_moving_the_wrong_way_has_no_trend() -> None:
    (crit, _) = heads(_noisy_sweep([-0.2, -0.1, 0.0, 0.1, 0.2]), CFG5)
    assert crit["trend_p"] > 0.95 and not crit["monotone_within_noise"]


def test_a_two_point_sweep_gets_a_paired_trend_test() -> None:
    cfg = SweepConfig(("crit", "simple"), ("sentiment", "readability"), (0.0, 1.0), (False, True))
    pts = _noisy_sweep([0.2, 0.1, -0.05, -0.03, -0.2])
    crit, _ = heads([pts[0], pts[1], pts[5]], cfg)  # base, λ = 0, λ = 1
    assert crit["trend_p"] < 1e-6 and crit["monotone_within_noise"] and crit["monotone"]


def test_the_tests_pair_by_prompt_not_by_sample() -> None:
    from scipy import stats

    pts = _noisy_sweep([0.2, 0.1, -0.05, -0.03, -0.2], n=200)
    prompts = tuple(f"p{i // 4}" for i in range(200))  # 50 prompts × 4 samples each
    pts = [replace(p, prompts=prompts) for p in pts]
    crit, _ = heads(pts, CFG5)
    assert crit["blocks"] == 50
    per = [
        [sum(p.scores["sentiment"][4 * i : 4 * i + 4]) / 4 for i in range(50)]
        for p in (pts[5], pts[0])
    ]
    assert crit["p"] == pytest.approx(float(stats.ttest_rel(*per).pvalue))
    with pytest.raises(ValueError, match="not paired"):
        heads([pts[0], *[replace(p, prompts=prompts[::-1]) for p in pts[1:]]], CFG5)
