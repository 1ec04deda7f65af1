"""The held-out evaluation after an alignment run: the promoted adapter against the base model.

Generation goes through the running server (``tiller.learner.heldout``: ``log=False``, the
same prompts and seeds for every condition, ``[eval.sampling]``). Conditions: the base model on
the plain prompts; the adapter on the plain prompts (no tags configured) or once per extreme
tag (ALT). For each: the scorer's mean with a 95% Student-t confidence interval, distinct-2,
and optionally the perplexity of the generations under the base model (fluency: a collapsed
policy produces text the base finds unlikely, or degenerate repeats it finds too likely; both
move it away from the base's own value).

``compare`` tests the difference between two conditions. Every condition generates from the
same prompts with the same per-prompt seeds, so score ``i`` of one condition and score ``i`` of
another come from the same prompt and seed. The samples of one prompt are not independent, so
each prompt is one block (the mean of its samples): the paired t-test on the blocks'
differences (with a 95% interval on the mean difference) is the primary figure; Welch's
unpaired test of the blocks is kept beside it. A condition's own interval is over its blocks too.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tiller.client import AsyncClient
from tiller.server.formats.manifest import Conditioning

from ..fluency import load_scoring_model, perplexity
from ..heldout import Condition, generate, guided_pair, weights_label
from ..learn.gate import distinct_n
from ..stats import block_means, mean_halfwidth, paired_test
from .config import EvalConfig


@dataclass(frozen=True)
class Stats:
    label: str
    n: int
    mean: float
    ci95: float  # half-width
    distinct2: float
    perplexity: float | None
    scores: tuple[float, ...]
    examples: tuple[str, ...]
    prompts: tuple[str, ...] = ()  # each score's held-out prompt: the blocks (none: per score)

    @property
    def blocks(self) -> list[float]:
        return block_means(self.scores, self.prompts)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["prompts"]  # the held-out prompts are the config's; their means are enough
        blocks = self.blocks
        out["blocks"] = len(blocks)
        out["block_means"] = blocks  # in prompt order: other runs pair by prompt with them
        out["scores"] = list(self.scores)
        out["examples"] = list(self.examples[:3])
        return out


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval."""
    return mean_halfwidth(values, 0.975)


def compare(a: Stats, b: Stats) -> dict[str, float]:
    """``a`` − ``b`` by prompt blocks: the mean paired difference, its 95% half-width, the
    paired t-test's two-sided ``p`` and the number of blocks; ``p_welch`` is Welch's unpaired
    test of the same blocks."""
    from scipy import stats

    spread(a, b, f"{a.label} - {b.label}")  # refuses conditions that are not paired
    d = paired_test(a.scores, b.scores, a.prompts)
    welch = math.nan
    if d["blocks"] > 1:
        welch = float(stats.ttest_ind(a.blocks, b.blocks, equal_var=False).pvalue)
    return {"diff": d["mean"], "ci95": d["ci95"], "t": d["t"], "p": d["p"], "p_welch": welch,
            "blocks": d["blocks"]}  # fmt: skip


async def evaluate(
    client: AsyncClient,
    conditions: list[Condition],
    cfg: EvalConfig,
    model_dir: Path | None,
) -> list[Stats]:
    """Generate and score every condition (``heldout.generate``), one ``Stats`` each, in order;
    with ``cfg.perplexity`` and ``model_dir``, the perplexity under that base model too."""
    base = None
    if cfg.perplexity and model_dir:
        base = await asyncio.to_thread(load_scoring_model, model_dir)
    runs = await generate(client, conditions, cfg.prompts, cfg.sampling, (cfg.scorer,))
    out = []
    for run in runs:
        pairs = [(s.prompt, s.text) for s in run.samples]
        scores = list(run.scores[cfg.scorer])
        prompts = tuple(p for p, _ in pairs)
        m, ci = mean_ci(block_means(scores, prompts))
        ppl = await asyncio.to_thread(perplexity, base, pairs) if base else None
        out.append(
            Stats(
                label=run.condition.label,
                n=len(scores),
                mean=m,
                ci95=ci,
                distinct2=distinct_n([t for _, t in pairs]),
                perplexity=ppl,
                scores=tuple(scores),
                examples=tuple(t for _, t in pairs[:3]),
                prompts=prompts,
            )
        )
    return out


def conditions(
    cfg: EvalConfig,
    adapter: str,
    version: int | None,
    prompted: tuple[int, Conditioning] | None = None,
) -> list[Condition]:
    """base; then the adapter's ``version`` (per extreme tag for ALT); then, for ALT, the
    conditioning-only bootstrap ``prompted = (version, its conditioning)`` per tag (the base
    prompted with the tag words, no training), when it is not ``version`` itself. The tag is
    rendered client-side for the base model: the server keeps only the active and the previous
    version loaded, so after two promotions the bootstrap is no longer servable by number.
    With ``cfg.guidance`` the tags are guided away from each other, and the bootstrap is asked
    as ``adapter@v<boot>``, which the caller has loaded again (a mixture needs the server to
    render the tags)."""
    out = [Condition("base")]
    if version is None:
        return out
    label = f"{adapter}@v{version}"
    if cfg.attributes:
        w = tuple(cfg.attributes.items())
        return [*out, Condition(f"{label} {weights_label(w)}", adapter, version, attributes=w)]
    if not cfg.tags:
        return [*out, Condition(label, adapter, version)]
    g = cfg.guidance
    mixes = guided_pair(cfg.tags[0], cfg.tags[1], g)
    shown = f", guided w={g:g}" if g > 0 else ""
    out += [
        Condition(f"{label} [{t}{shown}]", adapter, version, t, mix=mixes.get(t, ()))
        for t in cfg.tags
    ]
    if prompted is not None and prompted[0] != version:
        boot, cond = prompted
        name = f"prompted {adapter}@v{boot}"
        if g > 0:
            out += [
                Condition(f"{name} [{t}{shown}]", adapter, boot, t, mix=mixes.get(t, ()))
                for t in cfg.tags
            ]
        else:
            out += [Condition(f"{name} [{t}]", feedback=t, render=cond) for t in cfg.tags]
    return out


def spread(high: Stats, low: Stats, label: str) -> Stats:
    """Per prompt-and-seed differences ``high − low`` as a condition of their own (so that two
    spreads can be compared pairwise)."""
    if len(high.scores) != len(low.scores):
        raise ValueError(f"{high.label} and {low.label} are not paired: {high.n} vs {low.n} scores")
    if high.prompts != low.prompts:
        raise ValueError(f"{high.label} and {low.label} are not paired: different prompts")
    diffs = [h - lo for h, lo in zip(high.scores, low.scores, strict=True)]
    m, ci = mean_ci(block_means(diffs, high.prompts))
    return Stats(label, len(diffs), m, ci, math.nan, None, tuple(diffs), (), high.prompts)
