"""Held-out generation: conditions × prompts with fixed seeds through the server, then scored.

The eval gate (``learn.gate``), ``tiller align``'s evaluation (``align.evaluate``) and the
attribute-weight sweep (``align.sweep``) all measure the same way: every condition answers the
same prompts with ``HeldoutSampling.samples`` samples each, prompt ``i`` with seed
``seed + i`` and ``log=False`` (held-out traffic never enters the training data). Two runs with
the same spec therefore ask the server the same requests, and score ``k`` of one condition
pairs with score ``k`` of another (same prompt, same seed).

A guided condition (``Condition.mix``, a feedback mixture the server applies) samples one text
per request (a mixture serves ``n = 1``): sample ``j`` of prompt ``i`` with seed
``seed + i + j·len(prompts)``, so guided conditions pair with each other the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from tiller.client import AsyncClient
from tiller.server.formats.manifest import Conditioning
from tiller.server.formats.prompt import render_text

from .annotate.scorers import make_scorer
from .learn.sampling import GenerationJob, generate_each

Weights = tuple[tuple[str, float], ...]


def weights_label(weights: Iterable[tuple[str, float]]) -> str:
    """Attribute weights as reports name them: ``{critical=1, simple=0}``."""
    return "{" + ", ".join(f"{k}={v:g}" for k, v in weights) + "}"


@dataclass(frozen=True, kw_only=True)
class HeldoutSampling:
    """How each condition samples the held-out prompts (``[gate.sampling]``,
    ``[eval.sampling]``): ``samples`` per prompt, prompt ``i`` with seed ``seed + i``, at most
    ``concurrency`` requests in flight per ``generate`` call."""

    samples: int = 2
    max_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float | None = None
    seed: int = 1234
    concurrency: int = 16

    def __post_init__(self) -> None:
        for name in ("samples", "max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"sampling.{name} must be >= 1")


@dataclass(frozen=True)
class Condition:
    """Who generates and how: the base model (``adapter=''``) or ``adapter@version``.

    ``feedback`` is a tag the server renders, or, with ``render``, a tag rendered here into
    the prompt (the base model has no vocabulary); ``attributes`` are steering weights (a
    version with heads). ``mix``, when given, is the feedback mixture sent instead of
    ``feedback`` (which then only names the condition's tag: ``guided``). ``label`` names the
    condition in reports."""

    label: str = ""
    adapter: str = ""
    version: int | None = None
    feedback: str = ""
    render: Conditioning | None = None
    attributes: Weights = ()
    mix: Weights = ()

    def __post_init__(self) -> None:
        if self.mix and (self.render is not None or not self.adapter):
            raise ValueError(f"{self.label}: a feedback mix needs a served version's tags")


def check_guidance(w: float, spec: HeldoutSampling, where: str) -> None:
    """``ValueError`` naming ``<where>.guidance`` or ``<where>.sampling.repetition_penalty``
    unless ``w`` is a usable guidance weight for ``spec`` (vLLM's repetition penalty counts the
    prompt's tokens, which differ between mixed conditions: a mixture refuses it)."""
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"{where}.guidance must be a finite number >= 0 (0: off), got {w}")
    if w > 0 and spec.repetition_penalty not in (None, 1.0):
        raise ValueError(
            f"{where}.sampling.repetition_penalty must be unset with {where}.guidance > 0 "
            f"(a feedback mix cannot apply it), got {spec.repetition_penalty}"
        )


def guided(tag: str, away: str, w: float) -> Weights:
    """Guidance toward ``tag`` and away from ``away`` with weight ``w`` (classifier-free
    guidance over the two conditionals): ``(1 + w)·log p(y | x, tag) − w·log p(y | x, away)``.
    ``w = 0`` is ``tag`` alone."""
    if not (w >= 0 and w < float("inf")):
        raise ValueError(f"guidance weight must be a finite number >= 0, got {w}")
    return ((tag, 1.0 + w), (away, -w)) if w > 0 else ((tag, 1.0),)


def guided_pair(high: str, low: str, w: float) -> dict[str, Weights]:
    """Each of two extreme tags guided away from the other with ``w`` (``guided``); empty when
    ``w`` is 0 (unguided: send the tag itself)."""
    return {high: guided(high, low, w), low: guided(low, high, w)} if w > 0 else {}


@dataclass(frozen=True)
class Sample:
    """One generated text; ``prompt`` is the held-out prompt as given (before any rendering)."""

    prompt: str
    text: str


@dataclass(frozen=True)
class HeldoutRun:
    """A condition's samples in prompt order (``samples`` per prompt, consecutive) and, per
    scorer name, each sample's score in the same order."""

    condition: Condition
    samples: tuple[Sample, ...]
    scores: Mapping[str, tuple[float, ...]]


def jobs(
    cond: Condition, prompts: Sequence[str], spec: HeldoutSampling
) -> list[tuple[int, GenerationJob]]:
    """The requests ``cond`` sends for ``prompts``, each with the index of its prompt: one per
    prompt with seed ``spec.seed + i``, or for a guided condition one per sample (module
    docstring), prompt-major."""
    out = []
    for i, prompt in enumerate(prompts):
        sent, feedback = prompt, cond.feedback
        if cond.feedback and cond.render is not None:
            sent, feedback = render_text(prompt, cond.feedback, cond.render), ""
        job = GenerationJob(
            prompt=sent,
            n=spec.samples,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            repetition_penalty=spec.repetition_penalty,
            seed=spec.seed + i,
            adapter=cond.adapter,
            adapter_version=cond.version if cond.adapter else None,
            feedback=feedback,
            attributes=cond.attributes,
            log=False,
        )
        if not cond.mix:
            out.append((i, job))
            continue
        for j in range(spec.samples):
            seed = spec.seed + i + j * len(prompts)
            out.append((i, replace(job, n=1, seed=seed, feedback="", feedback_mix=cond.mix)))
    return out


def score(texts: Sequence[str], scorers: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """Each named scorer's score of every text, in order."""
    out = {}
    for name in dict.fromkeys(scorers):
        scorer = make_scorer(name)
        batch = getattr(scorer, "score_batch", None)  # reward models score a batch at once
        out[name] = tuple(batch(list(texts))) if batch else tuple(scorer.score(t) for t in texts)
    return out


async def generate(
    client: AsyncClient,
    conditions: Sequence[Condition],
    prompts: Sequence[str],
    spec: HeldoutSampling,
    scorers: Sequence[str] = (),
) -> list[HeldoutRun]:
    """Generate ``prompts`` under every condition (all requests of the call at once, at most
    ``spec.concurrency`` in flight, so the server batches them together), then score every
    sample with each of ``scorers``. Returns one run per condition, in order. Server errors
    propagate as ``TillerClientError``; an unknown scorer is a ``ValueError``."""
    per = [jobs(c, prompts, spec) for c in conditions]
    texts = await generate_each(client, [j for js in per for _, j in js], spec.concurrency)
    runs, start = [], 0
    for cond, js in zip(conditions, per, strict=True):
        mine, start = texts[start : start + len(js)], start + len(js)
        samples = tuple(
            Sample(prompts[i], t) for (i, _), ts in zip(js, mine, strict=True) for t in ts
        )
        runs.append(HeldoutRun(cond, samples, score([s.text for s in samples], scorers)))
    return runs
