"""The eval gate: a candidate adapter version against the one being served, on held-out prompts.

Both sides generate through the running Tiller server (``log=False``: gate traffic never
enters the training data) with the same prompts, seeds and sampling settings. The incumbent
is the active version of the adapter, or the base model before the first promotion; for the
base, a feedback-conditioned prompt is sent already rendered (the base has no vocabulary).

A side's evaluation yields:

- ``value``: with ``metric='mean'``, the mean scorer value of its generations (conditioned on
  ``feedback`` when set); with ``metric='spread'``, mean(score | ``high_tag``) −
  mean(score | ``low_tag``): ALT's promise that one adapter moves the property with the tag.
  The sign is flipped when ``higher_is_better`` is false, so a larger ``value`` is better.
- ``distinct2``: unique word bigrams ÷ all word bigrams over the side's texts (a collapse into
  repeated words drives it down: the reward-hacking guard).
- ``perplexity`` (with ``max_perplexity_ratio``): of the side's texts given their prompts under
  the base model (``learner.fluency``). The other face of reward hacking: text that drifted into
  glued tokens and invented words keeps a high distinct-2 but is unlikely under the base.
- ``win_rate``: with a pairwise ``judge``, the candidate's share of wins over the incumbent on
  the same prompt and seed (both orders asked; ties count one half; unparseable verdicts are
  left out).

``decide`` passes a candidate when every configured check holds: ``value`` not below the
incumbent's by more than ``margin`` (with ``confidence`` c > 0, a non-inferiority test instead:
the candidate fails only when the one-sided c upper confidence bound of the paired per-prompt
difference, candidate − incumbent, lies below −``margin``; both sides use the same prompts and
seeds, so the pairing removes the prompt-to-prompt variance a point comparison of two noisy
means would act on); ``distinct2`` at least ``min_distinct2_ratio`` × the
incumbent's; ``perplexity`` at most ``max_perplexity_ratio`` × the incumbent's (per version, so
drift compounds over promotions) and at most ``max_base_perplexity_ratio`` × the base model's
perplexity on its own gate texts (an anchor that does not move); ``win_rate`` at
least ``min_win_rate``. The verdict records every number.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, NamedTuple

from tiller.client import AsyncClient
from tiller.server.formats.manifest import Conditioning
from tiller.server.formats.prompt import render_text

from ..annotate.base import GenerationView
from ..annotate.judge import JudgeConfig, LLMJudge
from ..annotate.scorers import make_scorer
from ..fluency import Scorer, perplexity
from ..stats import mean_halfwidth
from .sampling import generate_each

Metric = Literal["mean", "spread"]


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """What the gate generates and how it decides (module docstring)."""

    prompts: tuple[str, ...]
    scorer: str | None = None
    higher_is_better: bool = True
    metric: Metric = "mean"
    feedback: str = ""
    # CMPO: the attribute weights both sides generate with (a side without heads: none)
    attributes: Mapping[str, float] = field(default_factory=dict)
    high_tag: str = ""
    low_tag: str = ""
    margin: float = 0.0
    confidence: float = 0.0  # 0: point comparison; else one-sided non-inferiority level
    min_distinct2_ratio: float = 0.0
    max_perplexity_ratio: float = 0.0  # 0: off
    max_base_perplexity_ratio: float = 0.0  # 0: off; against the base model's own texts
    judge: JudgeConfig | None = None
    min_win_rate: float = 0.5
    samples: int = 2
    max_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float | None = None
    seed: int = 1234
    concurrency: int = 16

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("gate.prompts is empty: the gate needs held-out prompts")
        if self.metric not in ("mean", "spread"):
            raise ValueError(f"gate.metric {self.metric!r} is not one of: mean, spread")
        if self.metric == "spread" and not (self.high_tag and self.low_tag):
            raise ValueError("gate.metric 'spread' needs gate.high_tag and gate.low_tag")
        if self.scorer is None and self.judge is None:
            raise ValueError("gate needs a scorer, a judge, or both")
        if self.judge is not None and self.judge.mode != "pairwise":
            raise ValueError(f"gate.judge.mode must be 'pairwise', got {self.judge.mode!r}")
        for name in ("samples", "max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"gate.{name} must be >= 1")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"gate.margin must be a finite number >= 0, got {self.margin}")
        if not (self.confidence == 0 or 0.5 <= self.confidence < 1):
            raise ValueError(
                f"gate.confidence must be 0 (off) or in [0.5, 1), got {self.confidence}"
            )
        for name in ("max_perplexity_ratio", "max_base_perplexity_ratio"):
            r = getattr(self, name)
            if not (math.isfinite(r) and (r == 0 or r >= 1)):
                raise ValueError(f"gate.{name} must be 0 (off) or >= 1, got {r}")

    @property
    def measures_perplexity(self) -> bool:
        return self.max_perplexity_ratio > 0 or self.max_base_perplexity_ratio > 0


@dataclass(frozen=True)
class Side:
    """Who generates: an adapter pinned to a version; ``name=''`` is the base model."""

    name: str
    version: int = 0
    conditioning: Conditioning | None = None
    attributes: tuple[tuple[str, float], ...] = ()  # steering weights (a version with heads)

    @property
    def label(self) -> str:
        return f"{self.name}@v{self.version}" if self.name else "base"


@dataclass(frozen=True)
class Evaluation:
    side: str
    value: float | None
    distinct2: float
    scores: dict[str, float]  # tag ('' without one) -> mean raw score
    texts: tuple[tuple[str, str, str], ...] = field(repr=False)  # (tag, prompt, text)
    perplexity: float | None = None  # under the base model, when the gate measures it
    per_prompt: tuple[float, ...] = ()  # the value per gate prompt (same order on both sides)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]
    candidate: dict[str, Any]
    incumbent: dict[str, Any]
    win_rate: float | None = None
    paired_upper: float | None = None  # with ``confidence``: the bound the test used
    incumbent_reused: bool = False  # the incumbent's run was given, not generated by this gate
    # where a given run came from (the learner's word): "promoted" (the gate that promoted the
    # incumbent) or "sampling" (generated beside the iteration's sampling)
    incumbent_source: str = ""
    base_perplexity: float | None = None  # with ``max_base_perplexity_ratio``: the anchor

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique word n-grams ÷ all word n-grams over ``texts`` (1.0 when there are none)."""
    grams = [
        tuple(words[i : i + n])
        for words in (t.split() for t in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 1.0


def _tags(cfg: GateConfig) -> tuple[str, ...]:
    return (cfg.high_tag, cfg.low_tag) if cfg.metric == "spread" else (cfg.feedback,)


def _job(
    side: Side, tag: str, prompt: str, cfg: GateConfig, index: int
) -> tuple[str, dict[str, Any]]:
    kw: dict[str, Any] = {
        "n": cfg.samples,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "seed": cfg.seed + index,
        "repetition_penalty": cfg.repetition_penalty,
        "log": False,
    }
    if side.name:
        kw |= {"adapter": side.name, "adapter_version": side.version, "feedback": tag}
        if side.attributes:
            kw["attributes"] = dict(side.attributes)
    elif tag:
        if side.conditioning is None:
            raise ValueError("the gate needs a conditioning to render tags for the base model")
        prompt = render_text(prompt, tag, side.conditioning)
    return prompt, kw


async def generate_side(
    client: AsyncClient, side: Side, cfg: GateConfig
) -> list[tuple[str, str, str]]:
    """(tag, prompt, text) for every gate prompt × tag × sample, in a stable order."""
    asked = [(tag, i, p) for tag in _tags(cfg) for i, p in enumerate(cfg.prompts)]
    jobs = [_job(side, tag, p, cfg, i) for tag, i, p in asked]
    texts = await generate_each(client, jobs, cfg.concurrency)
    return [(tag, p, t) for (tag, _, p), ts in zip(asked, texts, strict=True) for t in ts]


def evaluate(
    side: Side,
    texts: Sequence[tuple[str, str, str]],
    cfg: GateConfig,
    perplexity: float | None = None,
) -> Evaluation:
    """Score one side's generations (module docstring)."""
    by_tag: dict[str, float] = {}
    value: float | None = None
    per_prompt: tuple[float, ...] = ()
    if cfg.scorer is not None:
        scorer = make_scorer(cfg.scorer)
        sign = 1.0 if cfg.higher_is_better else -1.0
        # tag -> prompt -> scores; prompts keep the gate's order
        cells: dict[str, dict[str, list[float]]] = {tag: {} for tag in _tags(cfg)}
        for g, p, t in texts:
            if g in cells:
                cells[g].setdefault(p, []).append(scorer.score(t))
        for tag, row in cells.items():
            vals = [v for vs in row.values() for v in vs]
            by_tag[tag] = sum(vals) / len(vals) if vals else float("nan")
        means = {tag: {p: sum(v) / len(v) for p, v in row.items()} for tag, row in cells.items()}
        if cfg.metric == "spread":
            value = sign * (by_tag[cfg.high_tag] - by_tag[cfg.low_tag])
            hi, lo = means[cfg.high_tag], means[cfg.low_tag]
            per_prompt = tuple(sign * (hi[p] - lo[p]) for p in hi if p in lo)
        else:
            value = sign * by_tag[cfg.feedback]
            per_prompt = tuple(sign * v for v in means[cfg.feedback].values())
    return Evaluation(
        side=side.label,
        value=value,
        distinct2=distinct_n([t for _, _, t in texts]),
        scores=by_tag,
        texts=tuple(texts),
        perplexity=perplexity,
        per_prompt=per_prompt,
    )


def paired_upper_bound(
    candidate: Sequence[float], incumbent: Sequence[float], level: float
) -> float:
    """One-sided ``level`` upper confidence bound of mean(candidate − incumbent), paired by
    position (Student t); +inf when there are fewer than two pairs."""
    mean, margin = mean_halfwidth([c - i for c, i in zip(candidate, incumbent, strict=True)], level)
    return mean + margin


def _view(i: int, group: str, prompt: str, text: str, side: str) -> GenerationView:
    return GenerationView(
        seq=i,
        id=f"gate-{side}-{i}",
        group_id=group,
        sample_index=0,
        prompt=prompt,
        chat_json="",
        rendered_prompt=prompt,
        feedback="",
        adapter="",
        adapter_version=0,
        output_text=text,
        finish_reason="stop",
        created_at=0.0,
    )


async def judge_win_rate(
    judge: LLMJudge,
    candidate: Sequence[tuple[str, str, str]],
    incumbent: Sequence[tuple[str, str, str]],
) -> tuple[float | None, int]:
    """The candidate's win rate over the incumbent, row by row (same prompt, tag and sample);
    returns (rate or None when no verdict parsed, verdicts counted)."""
    views = []
    for i, ((_, prompt, a), (_, _, b)) in enumerate(zip(candidate, incumbent, strict=True)):
        views += [_view(2 * i, f"g{i}", prompt, a, "c"), _view(2 * i + 1, f"g{i}", prompt, b, "i")]
    notes = await judge.annotate(views)
    points = []
    for note in notes:
        if note.error or not isinstance(note.value, dict):
            continue
        winner = note.value.get("winner")
        points.append(1.0 if winner == "a" else 0.0 if winner == "b" else 0.5)
    return (sum(points) / len(points) if points else None), len(points)


def decide(
    candidate: Evaluation,
    incumbent: Evaluation,
    cfg: GateConfig,
    win_rate: float | None = None,
    base_perplexity: float | None = None,
) -> Verdict:
    """Apply the gate's checks (module docstring); the reasons list the failed ones."""
    reasons: list[str] = []
    upper: float | None = None
    if cfg.scorer is not None:
        c, i = candidate.value, incumbent.value
        if c is None or i is None or math.isnan(c) or math.isnan(i):
            reasons.append("score: no value to compare")
        elif cfg.confidence > 0:
            if len(candidate.per_prompt) != len(incumbent.per_prompt):
                reasons.append("score: the sides scored different prompts")
            else:
                upper = paired_upper_bound(
                    candidate.per_prompt, incumbent.per_prompt, cfg.confidence
                )
                if upper < -cfg.margin:
                    reasons.append(
                        f"score: {c:.4f} vs incumbent {i:.4f}: worse at {cfg.confidence:.0%} "
                        f"confidence (paired upper bound {upper:+.4f} < -margin {cfg.margin})"
                    )
        elif c < i - cfg.margin:
            reasons.append(f"score: {c:.4f} < incumbent {i:.4f} - margin {cfg.margin}")
    if cfg.min_distinct2_ratio > 0:
        floor = cfg.min_distinct2_ratio * incumbent.distinct2
        if candidate.distinct2 < floor:
            reasons.append(
                f"fluency: distinct-2 {candidate.distinct2:.3f} < {cfg.min_distinct2_ratio} × "
                f"incumbent {incumbent.distinct2:.3f}"
            )
    if cfg.max_perplexity_ratio > 0:
        cp, ip = candidate.perplexity, incumbent.perplexity
        if cp is None or ip is None or not (math.isfinite(cp) and math.isfinite(ip)):
            reasons.append("fluency: no perplexity to compare")
        elif cp > cfg.max_perplexity_ratio * ip:
            reasons.append(
                f"fluency: perplexity under the base {cp:.1f} > {cfg.max_perplexity_ratio} × "
                f"incumbent {ip:.1f}"
            )
    if cfg.max_base_perplexity_ratio > 0:
        cp, bp, r = candidate.perplexity, base_perplexity, cfg.max_base_perplexity_ratio
        if cp is None or bp is None or not (math.isfinite(cp) and math.isfinite(bp)):
            reasons.append("fluency: no perplexity to compare with the base model's")
        elif cp > r * bp:
            reasons.append(
                f"fluency: perplexity under the base {cp:.1f} > {r} × the base model's own {bp:.1f}"
            )
    if cfg.judge is not None:
        if win_rate is None:
            reasons.append("judge: no parseable verdict")
        elif win_rate < cfg.min_win_rate:
            reasons.append(f"judge: win rate {win_rate:.3f} < {cfg.min_win_rate}")

    def summary(e: Evaluation) -> dict[str, Any]:
        scores = {k: (v if math.isfinite(v) else None) for k, v in e.scores.items()}
        return {
            "side": e.side,
            "value": e.value,
            "distinct2": e.distinct2,
            "perplexity": e.perplexity,
            "scores": scores,
        }

    return Verdict(
        passed=not reasons,
        reasons=tuple(reasons),
        candidate=summary(candidate),
        incumbent=summary(incumbent),
        win_rate=win_rate,
        paired_upper=upper if upper is None or math.isfinite(upper) else None,
        base_perplexity=base_perplexity,
    )


@dataclass(frozen=True)
class SideRun:
    """One side's gate generations and their perplexity under the base (``None``: not measured).

    A promoted candidate's run is the next gate's incumbent run: same prompts, seeds and
    sampling, same weights, only the adapter name differs (``run_gate``'s ``incumbent_run``)."""

    texts: tuple[tuple[str, str, str], ...]
    perplexity: float | None = None


async def run_side(
    client: AsyncClient,
    side: Side,
    cfg: GateConfig,
    fluency: Callable[[], Scorer] | None = None,
) -> SideRun:
    """Generate with ``side``; with a perplexity bound set, measure the perplexity too."""
    return (await run_sides(client, (side,), cfg, fluency))[0]


async def run_sides(
    client: AsyncClient,
    sides: Sequence[Side],
    cfg: GateConfig,
    fluency: Callable[[], Scorer] | None = None,
) -> list[SideRun]:
    """``run_side`` for each of ``sides``. All sides generate at once: the server batches
    their requests together (one batch of 128 beside the serving load, not two of 64), and
    only then does the base model score their perplexities, one side after the other."""
    if cfg.measures_perplexity and fluency is None:
        raise ValueError("gate.max_perplexity_ratio needs the base model to score with")
    runs = await asyncio.gather(*(generate_side(client, side, cfg) for side in sides))
    if not cfg.measures_perplexity or fluency is None:
        return [SideRun(tuple(texts)) for texts in runs]
    model = await asyncio.to_thread(fluency)
    out = []
    for texts in runs:
        pairs = [(p, t) for _, p, t in texts]
        out.append(SideRun(tuple(texts), await asyncio.to_thread(perplexity, model, pairs)))
    return out


class GateOutcome(NamedTuple):
    """``run_gate``'s result: the verdict, the candidate's run (the next gate's incumbent run
    if it is promoted) and the base model's run it measured against (``None``: none), which
    does not change and can be passed back as ``base_run``."""

    verdict: Verdict
    candidate: SideRun
    base: SideRun | None


async def run_gate(
    client: AsyncClient,
    candidate: Side,
    incumbent: Side,
    cfg: GateConfig,
    fluency: Callable[[], Scorer] | None = None,
    *,
    incumbent_run: SideRun | None = None,
    base_run: SideRun | None = None,
) -> GateOutcome:
    """Generate with both sides, score, judge, decide. ``fluency`` returns the base model for
    the perplexity checks (called only when one is set; may cache). ``incumbent_run``: the
    incumbent's run from an earlier gate with this config (it was that gate's promoted
    candidate); it is used instead of generating again, which halves the gate's cost after a
    promotion; without it, both sides generate at once (``run_sides``). ``base_run``: the base
    model's run with this config, for ``max_base_perplexity_ratio`` (when the incumbent is not
    the base and none is given, the base generates beside the other sides; when the incumbent
    is the base, its run is the base's)."""
    base: Side | None = None
    if cfg.max_base_perplexity_ratio > 0 and base_run is None and incumbent.name:
        base = Side("", 0, incumbent.conditioning)
    todo = [candidate] + ([incumbent] if incumbent_run is None else []) + ([base] if base else [])
    done = await run_sides(client, todo, cfg, fluency)
    cand = done[0]
    inc = incumbent_run if incumbent_run is not None else done[1]
    if base is not None:
        base_run = done[-1]
    elif base_run is None and not incumbent.name:
        base_run = inc  # the incumbent is the base model
    win_rate = None
    if cfg.judge is not None:
        win_rate, _ = await judge_win_rate(LLMJudge(cfg.judge), cand.texts, inc.texts)
    verdict = decide(
        evaluate(candidate, cand.texts, cfg, cand.perplexity),
        evaluate(incumbent, inc.texts, cfg, inc.perplexity),
        cfg,
        win_rate,
        base_perplexity=base_run.perplexity if base_run is not None else None,
    )
    return GateOutcome(replace(verdict, incumbent_reused=incumbent_run is not None), cand, base_run)
