"""The attribute-weight sweep of a multi-head (CMPO) version: how each attribute's measure moves
as the request's weights move from one attribute to another.

For each λ in ``lambdas`` the adapter generates the held-out prompts with weights
``{attributes[0]: λ, attributes[1]: 1 − λ}`` (``tiller.learner.heldout`` with the evaluation's
prompts and ``[eval.sampling]``: the same per-prompt seeds at every λ); every generation is
scored by each attribute's scorer. The
base model generates once, as the reference line. The result is the steerability curve CMPO
promises: one served version, a different trade-off per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiller.client import AsyncClient

from ..heldout import Condition, generate
from ..stats import mean_halfwidth
from .config import EvalConfig, SweepConfig


@dataclass(frozen=True)
class SweepPoint:
    label: str
    weights: Mapping[str, float]
    means: Mapping[str, tuple[float, float]]  # scorer -> (mean, 95% half-width)
    n: int


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
        )
        for r in runs
    ]


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
