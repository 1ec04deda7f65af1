"""The CMPO sweep's per-head verdicts: paired gain at the head's extreme, monotone means."""

from __future__ import annotations

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
