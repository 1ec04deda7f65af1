"""The attribute-weight sweep of a multi-head (CMPO) version: how each attribute's measure moves
as the request's weights move from one attribute to another.

For each λ in ``lambdas`` the adapter generates the held-out prompts with weights
``{attributes[0]: λ, attributes[1]: 1 − λ}`` (``tiller.learner.heldout`` with the evaluation's
prompts and ``[eval.sampling]``: the same per-prompt seeds at every λ); every generation is
scored by each attribute's scorer. The
base model generates once, as the reference line. The result is the steerability curve CMPO
promises: one served version, a different trade-off per request.

``heads`` judges each head against CMPO's promise: at its own extreme (``attributes[0]`` at the
largest λ, ``attributes[1]`` at the smallest) it moves its attribute's score the right way
(``higher_is_better``) against the base on the same prompts and seeds (paired t-test), and the
sweep moves toward that extreme. Strict order of the means is reported, but neighbouring λ can
differ by less than the noise, so the verdict is statistical: Page's trend test (each held-out
prompt a block, its samples averaged, paired across λ since every λ uses the same seeds;
one-sided, toward the head; with two λ, the paired t-test) and no step between neighbouring λ
significantly the wrong way (paired one-sided t-tests, Holm-corrected).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from tiller.client import AsyncClient

from ..heldout import Condition, generate
from ..stats import block_means, mean_halfwidth, paired_test
from .config import EvalConfig, SweepConfig

ALPHA = 0.05  # the trend test's and the reversal tests' level


@dataclass(frozen=True)
class SweepPoint:
    label: str
    weights: Mapping[str, float]
    means: Mapping[str, tuple[float, float]]  # scorer -> (mean, 95% half-width)
    n: int
    scores: Mapping[str, tuple[float, ...]] = field(default_factory=dict, repr=False)
    prompts: tuple[str, ...] = field(default=(), repr=False)  # each score's prompt, in order


def weights_at(cfg: SweepConfig, lam: float) -> dict[str, float]:
    a, b = cfg.attributes
    return {a: lam, b: 1.0 - lam}


async def sweep(
    client: AsyncClient, ev: EvalConfig, adapter: str, version: int
) -> list[SweepPoint]:
    """The base model first, then the adapter at each λ of ``ev.sweep``; generated as the
    evaluation's conditions are (its prompts and sampling), scored by each of the sweep's
    scorers."""
    cfg = ev.sweep
    assert cfg is not None
    conds = [Condition("base")]
    for lam in cfg.lambdas:
        w = tuple(weights_at(cfg, lam).items())
        conds.append(Condition(f"λ={lam:g}", adapter, version, attributes=w))
    runs = await generate(client, conds, ev.prompts, ev.sampling, cfg.scorers)
    return [
        SweepPoint(
            r.condition.label,
            dict(r.condition.attributes),
            {
                name: mean_halfwidth(list(r.scores[name]), 0.975)
                for name in dict.fromkeys(cfg.scorers)
            },
            len(r.samples),
            {name: tuple(r.scores[name]) for name in dict.fromkeys(cfg.scorers)},
            tuple(x.prompt for x in r.samples),
        )
        for r in runs
    ]


def blocks(point: SweepPoint, scorer: str) -> list[float]:
    """``point``'s scores of ``scorer`` as the statistical blocks: the mean per held-out prompt
    (its samples share the prompt, so they are not independent), or per sample when the
    point does not record its prompts."""
    return block_means(point.scores[scorer], point.prompts)


def heads(points: list[SweepPoint], cfg: SweepConfig) -> list[dict[str, Any]]:
    """Per attribute: its head's paired gain over the base at its extreme, and how the sweep
    moves its score toward that extreme (module docstring). ``points``: the base first, then
    one point per λ, as ``sweep`` returns them; every point scores the same prompts and seeds
    in the same order. Tests pair by prompt (``blocks``)."""

    base, swept = points[0], points[1:]

    def lam(p: SweepPoint) -> float:
        return p.weights[cfg.attributes[0]]

    out = []
    for j, (attr, scorer) in enumerate(zip(cfg.attributes, cfg.scorers, strict=True)):
        sign = 1.0 if cfg.higher_is_better[j] else -1.0
        # toward this head: λ rising for the first attribute, falling for the second
        order = sorted(swept, key=lam, reverse=j == 1)
        for q in order:
            if len(q.scores[scorer]) != len(base.scores[scorer]) or q.prompts != base.prompts:
                raise ValueError(
                    f"sweep {q.label} and base are not paired: "
                    f"{len(q.scores[scorer])} vs {len(base.scores[scorer])} scores"
                )
        table = [blocks(q, scorer) for q in order]
        a, b = table[-1], blocks(base, scorer)
        paired = paired_test(a, b)
        gain, ci, p = sign * paired["mean"], paired["ci95"], paired["p"]
        signed = [sign * q.means[scorer][0] for q in order]
        trend_p, steps = _trend(table, sign)
        reversals = [(lam(order[k]), lam(order[k + 1])) for k in steps]
        out.append(
            {
                "attribute": attr,
                "scorer": scorer,
                "lambda": lam(order[-1]),
                "gain": gain,  # in the attribute's direction: > 0 is the head's promise kept
                "ci95": ci,
                "p": p,
                "blocks": len(a),  # prompts the tests pair over
                "monotone": all(x < y for x, y in pairwise(signed)),  # strict order of means
                "trend_p": trend_p,  # Page's L, one-sided toward the head
                # λ pairs (from, to) whose step goes significantly away from the head
                "reversals": reversals,
                "monotone_within_noise": trend_p < ALPHA and not reversals,
                "means_toward_head": [q.means[scorer][0] for q in order],
            }
        )
    return out


def _trend(table: list[list[float]], sign: float) -> tuple[float, list[int]]:
    """Page's trend test over ``table`` (per point toward the head, its blocks) and the
    indices k of the steps k → k+1 that go significantly the wrong way (Holm over the steps);
    scores signed so that the head's direction is up."""
    import numpy as np
    from scipy import stats

    data = sign * np.array(table, dtype=float).T  # blocks × λ
    if data.shape[0] < 2:
        return float("nan"), []
    if data.shape[1] >= 3:
        trend = float(stats.page_trend_test(data).pvalue)
    else:  # two λ: Page's L needs three; the paired one-sided t-test is the trend test
        trend = float(stats.ttest_rel(data[:, 1], data[:, 0], alternative="greater").pvalue)
    steps = []
    for k in range(data.shape[1] - 1):
        diff = data[:, k + 1] - data[:, k]
        if np.ptp(diff) <= 1e-9 * (1.0 + np.abs(diff).max()):  # a constant step: no noise
            steps.append(0.0 if diff[0] < 0 else 1.0)
        else:  # one-sided: does the step toward the head go significantly down?
            steps.append(float(stats.ttest_1samp(diff, 0.0, alternative="less").pvalue))
    m, wrong = len(steps), []
    for rank, k in enumerate(sorted(range(m), key=lambda i: steps[i])):
        if steps[k] > ALPHA / (m - rank):
            break  # Holm's step-down: the first step not rejected ends the rejections
        wrong.append(k)
    return trend, sorted(wrong)


def to_json(points: list[SweepPoint]) -> list[dict[str, Any]]:
    return [
        {
            "label": p.label,
            "weights": dict(p.weights),
            "n": p.n,
            "means": {k: {"mean": m, "ci95": h} for k, (m, h) in p.means.items()},
        }
        for p in points
    ]


def plot(points: list[SweepPoint], cfg: SweepConfig, adapter: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, swept = points[0], points[1:]
    lams = [p.weights[cfg.attributes[0]] for p in swept]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, attr, scorer in zip(axes, cfg.attributes, cfg.scorers, strict=True):
        m = [p.means[scorer][0] for p in swept]
        h = [p.means[scorer][1] for p in swept]
        ax.errorbar(lams, m, yerr=h, marker="o", capsize=4, label=adapter)
        bm, bh = base.means[scorer]
        ax.axhline(bm, color="gray", linestyle="--", label="base")
        ax.axhspan(bm - bh, bm + bh, color="gray", alpha=0.15)
        ax.set_xlabel(f"λ: weights {{{cfg.attributes[0]}: λ, {cfg.attributes[1]}: 1−λ}}")
        ax.set_ylabel(f"mean {scorer} (95% CI)")
        ax.set_title(f"{attr} ({scorer})")
        ax.legend(fontsize=8)
    fig.suptitle(f"{adapter}: attribute-weight sweep on held-out prompts")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
