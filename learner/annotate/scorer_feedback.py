"""Offline CDF labellers: critique, refinement and pairwise feedback from a numeric scorer, for
machines where an LLM judge is too weak to write useful feedback.

- ``ScorerCritique`` (type ``scorer_critique``, kind ``critique``): a templated sentence from the
  scorer's verdict on the generation: whether the score must still move towards ``goal``
  (``template``) or already got there (``threshold`` reached: ``keep_template``). Fields:
  ``{score}`` (2 decimals, signed), ``{scorer}``, ``{goal}``, ``{direction}`` (``higher`` or
  ``lower``: where the score must go).
- ``ScorerRefinement`` (type ``scorer_refinement``, kind ``refinement``): the best by the scorer
  of ``k`` fresh samples of the same request from the policy that wrote the generation
  (``<adapter>@v<version>``, or ``model`` for the base), through Tiller's OpenAI-compatible API
  at background priority, unlogged. When none beats the original by more than ``min_margin``,
  the value is the original itself (the CDF builder skips it as unchanged; it still counts as
  labelled for the learner's trigger). A version the server no longer serves (HTTP 404) is an
  error annotation for that item; other faults sort as in ``transport``.
- ``ScorerPairwise`` (type ``scorer_pairwise``, kind ``preference``): consecutive samples of a
  request paired as the LLM judge pairs them, the winner by score (``tie`` within
  ``min_margin``), so CDF's hard route reads them as judge verdicts.

Scorers are ``scorers.make_scorer``'s; scoring runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import Annotation, GenerationView, ProviderUnavailable
from .quantile import score_all
from .scorers import check_scorer, make_scorer
from .transport import MAX_RAW_CHARS, classify, openai_client

TEMPLATE = "The text scores {score} on {scorer}; it needs a {direction} score: make it more {goal}."
KEEP_TEMPLATE = "The text scores {score} on {scorer}, already {goal}: keep it so, and fluent."
_FIELDS = {"score": "+0.00", "scorer": "s", "goal": "g", "direction": "higher"}


def _check(provider: str, scorer: str) -> None:
    try:
        check_scorer(scorer)
    except ValueError as e:
        raise ValueError(f"provider {provider!r}: {e}") from None


def _check_template(provider: str, key: str, template: str) -> None:
    try:
        template.format(**_FIELDS)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"provider {provider!r}: {key} {template!r} is not a template over "
            f"{', '.join('{' + f + '}' for f in _FIELDS)} ({type(e).__name__}: {e})"
        ) from None


@dataclass(frozen=True, kw_only=True)
class ScorerCritiqueConfig:
    provider_name: str
    scorer: str
    goal: str  # what a better score means, in words ("critical and negative")
    higher_is_better: bool = True
    threshold: float | None = None  # a score this good or better gets keep_template
    template: str = TEMPLATE
    keep_template: str = KEEP_TEMPLATE

    def __post_init__(self) -> None:
        _check(self.provider_name, self.scorer)
        if not self.goal.strip():
            raise ValueError(f"provider {self.provider_name!r}: goal is empty")
        _check_template(self.provider_name, "template", self.template)
        _check_template(self.provider_name, "keep_template", self.keep_template)


@dataclass(frozen=True, kw_only=True)
class ScorerPairwiseConfig:
    provider_name: str
    scorer: str
    higher_is_better: bool = True
    min_margin: float = 0.0  # closer scores are a tie

    def __post_init__(self) -> None:
        _check(self.provider_name, self.scorer)
        if self.min_margin < 0:
            raise ValueError(f"provider {self.provider_name!r}: min_margin must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ScorerRefinementConfig:
    provider_name: str
    scorer: str
    base_url: str  # Tiller's OpenAI-compatible API ("self" inside `tiller align`)
    model: str  # the base model's name there (for generations of the base)
    api_key: str = "unused"  # with tokens on: an admin token (background priority needs it)
    higher_is_better: bool = True
    k: int = 4  # resamples per generation
    min_margin: float = 0.0  # a resample must beat the original by more than this
    max_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float | None = None
    timeout_s: float = 120.0
    max_concurrency: int = 8
    extra_body: Mapping[str, Any] = field(default_factory=dict)  # more request fields

    def __post_init__(self) -> None:
        where = f"provider {self.provider_name!r}"
        _check(self.provider_name, self.scorer)
        if self.k < 1 or self.max_tokens < 1 or self.max_concurrency < 1:
            raise ValueError(f"{where}: k, max_tokens and max_concurrency must be >= 1")
        if self.min_margin < 0 or self.timeout_s <= 0:
            raise ValueError(f"{where}: min_margin must be >= 0 and timeout_s > 0")


def _fmt(score: float) -> str:
    return f"{score:+.2f}"


def _better(a: float, b: float, higher_is_better: bool, margin: float) -> bool:
    """``a`` beats ``b`` by more than ``margin``."""
    return (a - b if higher_is_better else b - a) > margin


async def _scores(scorer: Any, texts: Sequence[str]) -> list[float | str]:
    return await asyncio.to_thread(score_all, scorer, list(texts))


class ScorerCritique:
    """A ``Provider`` of templated critiques (module docstring)."""

    def __init__(self, config: ScorerCritiqueConfig) -> None:
        self.config = config
        self.name = config.provider_name
        self._scorer = make_scorer(config.scorer)

    def critique(self, score: float) -> str:
        c = self.config
        done = c.threshold is not None and not _better(c.threshold, score, c.higher_is_better, 0)
        direction = "higher" if c.higher_is_better else "lower"
        fields = {"score": _fmt(score), "scorer": c.scorer, "goal": c.goal, "direction": direction}
        return (c.keep_template if done else c.template).format(**fields)

    async def annotate(self, batch: Sequence[GenerationView]) -> list[Annotation]:
        out = []
        for g, s in zip(
            batch, await _scores(self._scorer, [g.output_text for g in batch]), strict=True
        ):
            if isinstance(s, str):
                out.append(Annotation(g.id, self.name, "critique", None, error=s))
            else:
                out.append(Annotation(g.id, self.name, "critique", self.critique(s), raw=repr(s)))
        return out


class ScorerPairwise:
    """A ``Provider`` of pairwise verdicts by score (module docstring)."""

    def __init__(self, config: ScorerPairwiseConfig) -> None:
        self.config = config
        self.name = config.provider_name
        self._scorer = make_scorer(config.scorer)

    async def annotate(self, batch: Sequence[GenerationView]) -> list[Annotation]:
        c = self.config
        scores = dict(
            zip(
                (g.id for g in batch),
                await _scores(self._scorer, [g.output_text for g in batch]),
                strict=True,
            )
        )
        groups: dict[str, list[GenerationView]] = {}
        for g in batch:
            groups.setdefault(g.group_id, []).append(g)
        out = []
        for m in groups.values():
            for a, b in ((m[i], m[i + 1]) for i in range(0, len(m) - 1, 2)):
                sa, sb = scores[a.id], scores[b.id]
                if isinstance(sa, str) or isinstance(sb, str):
                    error = sa if isinstance(sa, str) else str(sb)
                    out.append(Annotation(a.id, self.name, "preference", None, b.id, error=error))
                    continue
                winner = (
                    "a" if _better(sa, sb, c.higher_is_better, c.min_margin)
                    else "b" if _better(sb, sa, c.higher_is_better, c.min_margin)
                    else "tie"
                )  # fmt: skip
                raw = json.dumps({"score_a": sa, "score_b": sb})
                out.append(
                    Annotation(a.id, self.name, "preference", {"winner": winner}, b.id, raw=raw)
                )
        return out


def best_refinement(
    original: str, score: float, resamples: Sequence[tuple[float, str]], c: ScorerRefinementConfig
) -> str:
    """The best-scoring resample when it beats ``original`` (scored ``score``) by more than
    ``min_margin``; else ``original`` itself (the earliest resample wins a tie)."""
    sign = 1.0 if c.higher_is_better else -1.0
    best = max(resamples, key=lambda p: sign * p[0], default=None)
    if best is None or not _better(best[0], score, c.higher_is_better, c.min_margin):
        return original
    return best[1]


class ScorerRefinement:
    """A ``Provider`` of best-of-k refinements through the server (module docstring).
    One instance per configured provider, used from one event loop."""

    def __init__(self, config: ScorerRefinementConfig, client: Any = None) -> None:
        self.config = config
        self.name = config.provider_name
        self._scorer = make_scorer(config.scorer)
        self._client = client or openai_client(config.base_url, config.api_key, config.timeout_s)
        self._sem = asyncio.Semaphore(config.max_concurrency)

    def _request(self, g: GenerationView) -> tuple[Any, dict[str, Any]]:
        """The endpoint's ``create`` and its arguments: ``g``'s request again, ``k`` samples."""
        c = self.config
        extra: dict[str, Any] = {**c.extra_body, "log": False, "priority": "background"}
        if g.feedback:
            extra["feedback"] = g.feedback
        if c.repetition_penalty is not None:
            extra["repetition_penalty"] = c.repetition_penalty
        kw: dict[str, Any] = {
            "model": f"{g.adapter}@v{g.adapter_version}" if g.adapter else c.model,
            "n": c.k,
            "max_tokens": c.max_tokens,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "extra_body": extra,
        }
        if not g.prompt and g.chat_json:
            turns = [{"role": t["role"], "content": t["content"]} for t in json.loads(g.chat_json)]
            return self._client.chat.completions.create, {**kw, "messages": turns}
        return self._client.completions.create, {**kw, "prompt": g.prompt}

    async def _resample(self, g: GenerationView) -> list[str] | str:
        """``k`` texts, or a per-item error text; ``ProviderUnavailable`` when the server is."""
        create, kw = self._request(g)
        try:
            async with self._sem:
                resp = await asyncio.wait_for(create(**kw), self.config.timeout_s)
        except Exception as e:
            fault = classify(e)
            if fault is None:
                raise
            if getattr(e, "status_code", None) == 404:  # that version is gone: only it is
                return f"policy not served: {fault.reason}"
            if fault.scope == "endpoint":
                raise ProviderUnavailable(f"provider {self.name!r}: {fault.reason}") from e
            return fault.reason
        texts = [ch.message.content if hasattr(ch, "message") else ch.text for ch in resp.choices]
        return [t or "" for t in texts]

    async def _one(self, g: GenerationView) -> Annotation:
        c = self.config
        t = time.monotonic()
        texts = await self._resample(g)
        took = time.monotonic() - t
        if isinstance(texts, str):
            return Annotation(g.id, self.name, "refinement", None, latency_s=took, error=texts)
        scores = await _scores(self._scorer, [g.output_text, *texts])
        if isinstance(scores[0], str):
            return Annotation(g.id, self.name, "refinement", None, latency_s=took, error=scores[0])
        ok = [(s, x) for s, x in zip(scores[1:], texts, strict=True) if not isinstance(s, str)]
        value = best_refinement(g.output_text, scores[0], ok, c)
        raw = json.dumps({"original": scores[0], "resamples": [s for s, _ in ok]})[:MAX_RAW_CHARS]
        return Annotation(g.id, self.name, "refinement", value, raw=raw, latency_s=took)

    async def annotate(self, batch: Sequence[GenerationView]) -> list[Annotation]:
        results = await asyncio.gather(*(self._one(g) for g in batch), return_exceptions=True)
        for r in results:  # every call finished: raise the server-wide fault first
            if isinstance(r, ProviderUnavailable):
                raise r
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r for r in results if isinstance(r, Annotation)]


__all__ = [
    "ScorerCritique",
    "ScorerCritiqueConfig",
    "ScorerPairwise",
    "ScorerPairwiseConfig",
    "ScorerRefinement",
    "ScorerRefinementConfig",
]
