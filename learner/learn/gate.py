"""The eval gate's checks: a candidate adapter version against the one being served, on
held-out prompts. This module is pure (config, aggregation, ``decide``); ``gate_runs``
generates the sides' runs and keeps them between iterations.

Both sides generate the held-out prompts through the running Tiller server with the same seeds
and sampling settings (``tiller.learner.heldout``: ``log=False``, gate traffic never enters the
training data). The incumbent
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
perplexity on its own gate texts (an anchor that does not move); ``distinct2`` also at least
``min_base_distinct2_ratio`` × the base model's on its own gate texts (the same anchor: a
per-version floor lets diversity fall a little every version); ``win_rate`` at least
``min_win_rate``; and for a version with several heads, each ``heads`` check (further weights,
each with its own scorer and margin: CMPO's other heads at their extremes) passes the same
``value`` test as the main one and the same ``min_distinct2_ratio`` floor (perplexity is
measured at ``attributes`` only). The verdict records every number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from tiller.server.formats.manifest import Conditioning

from ..annotate.judge import JudgeConfig
from ..annotate.scorers import check_scorer
from ..heldout import HeldoutSampling, check_guidance, score, weights_label
from ..stats import mean_halfwidth

Metric = Literal["mean", "spread"]


@dataclass(frozen=True)
class HeadCheck:
    """`[[gate.heads]]`: one more attribute-weight point both sides generate at, scored by its
    own scorer and tested as the gate's main value is (CMPO: each further head at its extreme,
    so that no head's attribute may regress while the first head's is checked)."""

    # the weights both sides generate with for this check (a side without heads: none)
    attributes: Mapping[str, float]
    # the scorer this check's value is measured with
    scorer: str
    # is a higher score better for this check?
    higher_is_better: bool = True
    # how far below the incumbent this check's value may fall, in its scorer's units
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not self.attributes:
            raise ValueError("gate.heads: attributes is empty")
        for name, w in self.attributes.items():
            if not math.isfinite(w):
                raise ValueError(f"gate.heads: attributes.{name} must be finite, got {w}")
        check_scorer(self.scorer)
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"gate.heads: margin must be a finite number >= 0, got {self.margin}")

    @property
    def label(self) -> str:
        return weights_label(self.attributes.items())


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
    min_base_distinct2_ratio: float = 0.0  # 0: off; against the base model's own texts
    judge: JudgeConfig | None = None
    min_win_rate: float = 0.5
    sampling: HeldoutSampling = field(default_factory=HeldoutSampling)  # [gate.sampling]
    # metric "spread": each served side samples each extreme tag guided away from the other
    # (heldout.guided) with this weight; the base model's anchor run stays unguided. 0: off.
    guidance: float = 0.0
    # The admin address of every replica behind ``server``: the candidate is loaded on each
    # (the gate's requests still go to ``server``). Empty: the gate is pinned to one server.
    replicas: tuple[str, ...] = ()
    # CMPO: further weight points with their own scorers, each tested like ``value``
    heads: tuple[HeadCheck, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("gate.prompts is empty: the gate needs held-out prompts")
        if self.metric not in ("mean", "spread"):
            raise ValueError(f"gate.metric {self.metric!r} is not one of: mean, spread")
        if self.metric == "spread" and not (self.high_tag and self.low_tag):
            raise ValueError("gate.metric 'spread' needs gate.high_tag and gate.low_tag")
        if self.scorer is None and self.judge is None:
            raise ValueError("gate needs a scorer, a judge, or both")
        if self.scorer is not None:
            check_scorer(self.scorer)  # at config time: a bad rm: directory fails here
        if self.judge is not None and self.judge.mode != "pairwise":
            raise ValueError(f"gate.judge.mode must be 'pairwise', got {self.judge.mode!r}")
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
        # Against the incumbent, above 1 is a demand for more diversity than is served; the
        # base-anchored bound is a floor under the base model's own, so at most 1.
        if not (math.isfinite(self.min_distinct2_ratio) and self.min_distinct2_ratio >= 0):
            raise ValueError(
                f"gate.min_distinct2_ratio must be a finite number >= 0 (0: off), "
                f"got {self.min_distinct2_ratio}"
            )
        r = self.min_base_distinct2_ratio
        if not (math.isfinite(r) and 0 <= r <= 1):
            raise ValueError(f"gate.min_base_distinct2_ratio must be in [0, 1] (0: off), got {r}")
        check_guidance(self.guidance, self.sampling, "gate")
        if self.guidance > 0 and self.metric != "spread":
            raise ValueError("gate.guidance needs gate.metric 'spread' (two tags to guide between)")
        for r in self.replicas:
            if not r or r != r.strip() or ":" not in r:
                raise ValueError(f"gate.replicas: {r!r} is not a host:port address")
        if len(set(self.replicas)) != len(self.replicas):
            raise ValueError(f"gate.replicas lists an address twice: {list(self.replicas)}")
        if self.heads and not (self.attributes and self.metric == "mean" and not self.feedback):
            raise ValueError(
                "gate.heads needs a CMPO gate: gate.attributes set, metric 'mean', no feedback"
            )

    def head(self, k: int) -> GateConfig:
        """The gate as ``heads[k]`` sees it: its weights, its scorer and direction."""
        h = self.heads[k]
        return replace(
            self,
            attributes=h.attributes,
            scorer=h.scorer,
            higher_is_better=h.higher_is_better,
            margin=h.margin,
            heads=(),
        )

    @property
    def tags(self) -> tuple[str, ...]:
        """The feedback tags each side generates with (``''``: none)."""
        return (self.high_tag, self.low_tag) if self.metric == "spread" else (self.feedback,)

    @property
    def measures_perplexity(self) -> bool:
        return self.max_perplexity_ratio > 0 or self.max_base_perplexity_ratio > 0

    @property
    def anchors_on_base(self) -> bool:
        """A check compares the candidate with the base model's own run."""
        return self.max_base_perplexity_ratio > 0 or self.min_base_distinct2_ratio > 0


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
    heads: tuple[Evaluation, ...] = ()  # one per ``gate.heads`` check, in order


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
    base_distinct2: float | None = None  # with ``min_base_distinct2_ratio``: the anchor
    placement: str = ""  # where the candidate was served (the learner's word, as it reports it)
    # per ``gate.heads`` check: its weights, scorer, both sides' values and the paired bound
    heads: tuple[dict[str, Any], ...] = ()

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


def evaluate(
    side: Side,
    texts: Sequence[tuple[str, str, str]],
    cfg: GateConfig,
    perplexity: float | None = None,
    scores: Sequence[float] | None = None,
    heads: Sequence[tuple[Sequence[tuple[str, str, str]], Sequence[float] | None]] = (),
) -> Evaluation:
    """Aggregate one side's generations (module docstring); ``scores``: the scorer's value of
    each text, in order (None: scored here). ``heads``: (texts, scores) per ``gate.heads``
    check, evaluated with that check's view of the gate."""
    by_tag: dict[str, float] = {}
    value: float | None = None
    per_prompt: tuple[float, ...] = ()
    if cfg.scorer is not None:
        if scores is None:
            scores = score([t for _, _, t in texts], (cfg.scorer,))[cfg.scorer]
        sign = 1.0 if cfg.higher_is_better else -1.0
        # tag -> prompt -> scores; prompts keep the gate's order
        cells: dict[str, dict[str, list[float]]] = {tag: {} for tag in cfg.tags}
        for (g, p, _), v in zip(texts, scores, strict=True):
            if g in cells:
                cells[g].setdefault(p, []).append(v)
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
        heads=tuple(evaluate(side, t, cfg.head(k), scores=v) for k, (t, v) in enumerate(heads)),
    )


def paired_upper_bound(
    candidate: Sequence[float], incumbent: Sequence[float], level: float
) -> float:
    """One-sided ``level`` upper confidence bound of mean(candidate − incumbent), paired by
    position (Student t); +inf when there are fewer than two pairs."""
    mean, margin = mean_halfwidth([c - i for c, i in zip(candidate, incumbent, strict=True)], level)
    return mean + margin


def _distinct2_floor(
    c: Evaluation, i: Evaluation, ratio: float, what: str, reasons: list[str]
) -> None:
    """Fail (a reason prefixed ``what``) when ``c``'s distinct-2 is below ``ratio`` × ``i``'s."""
    if ratio > 0 and c.distinct2 < ratio * i.distinct2:
        reasons.append(
            f"{what}fluency: distinct-2 {c.distinct2:.3f} < {ratio} × incumbent {i.distinct2:.3f}"
        )


def decide(
    candidate: Evaluation,
    incumbent: Evaluation,
    cfg: GateConfig,
    win_rate: float | None = None,
    base_perplexity: float | None = None,
    base_distinct2: float | None = None,
) -> Verdict:
    """Apply the gate's checks (module docstring); the reasons list the failed ones."""
    reasons: list[str] = []
    upper: float | None = None
    if cfg.scorer is not None:
        upper = _value_check(candidate, incumbent, cfg, "score", reasons)
    heads: list[dict[str, Any]] = []
    if cfg.heads and not (len(candidate.heads) == len(incumbent.heads) == len(cfg.heads)):
        reasons.append(f"heads: {len(cfg.heads)} head checks, not measured on both sides")
    elif cfg.heads:
        for k, (h, c, i) in enumerate(
            zip(cfg.heads, candidate.heads, incumbent.heads, strict=True)
        ):
            what = f"head {h.label} ({h.scorer})"
            bound = _value_check(c, i, cfg.head(k), what, reasons)
            _distinct2_floor(c, i, cfg.min_distinct2_ratio, f"{what}: ", reasons)
            heads.append(
                {
                    "attributes": dict(h.attributes),
                    "scorer": h.scorer,
                    "candidate": c.value,
                    "incumbent": i.value,
                    "distinct2": {"candidate": c.distinct2, "incumbent": i.distinct2},
                    "paired_upper": bound if bound is None or math.isfinite(bound) else None,
                }
            )
    _distinct2_floor(candidate, incumbent, cfg.min_distinct2_ratio, "", reasons)
    if cfg.min_base_distinct2_ratio > 0:
        r = cfg.min_base_distinct2_ratio
        if base_distinct2 is None:
            reasons.append("fluency: no distinct-2 of the base model's to compare with")
        elif candidate.distinct2 < r * base_distinct2:
            reasons.append(
                f"fluency: distinct-2 {candidate.distinct2:.3f} < {r} × the base model's own "
                f"{base_distinct2:.3f}"
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
        base_distinct2=base_distinct2,
        heads=tuple(heads),
    )


def _value_check(
    candidate: Evaluation, incumbent: Evaluation, cfg: GateConfig, what: str, reasons: list[str]
) -> float | None:
    """The ``value`` test of ``decide`` (point or paired non-inferiority); a failure is
    appended to ``reasons`` under ``what``. Returns the paired upper bound, if one was used."""
    c, i = candidate.value, incumbent.value
    if c is None or i is None or math.isnan(c) or math.isnan(i):
        reasons.append(f"{what}: no value to compare")
        return None
    if cfg.confidence <= 0:
        if c < i - cfg.margin:
            reasons.append(f"{what}: {c:.4f} < incumbent {i:.4f} - margin {cfg.margin}")
        return None
    if len(candidate.per_prompt) != len(incumbent.per_prompt):
        reasons.append(f"{what}: the sides scored different prompts")
        return None
    upper = paired_upper_bound(candidate.per_prompt, incumbent.per_prompt, cfg.confidence)
    if upper < -cfg.margin:
        reasons.append(
            f"{what}: {c:.4f} vs incumbent {i:.4f}: worse at {cfg.confidence:.0%} "
            f"confidence (paired upper bound {upper:+.4f} < -margin {cfg.margin})"
        )
    return upper
