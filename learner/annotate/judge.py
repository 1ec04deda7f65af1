"""LLM judge over any OpenAI-compatible API: tags, pairwise, Likert, critique, refinement.

Pairwise judgements are asked in both orders (OAIF) to cancel position bias: agreeing verdicts
win, disagreeing ones are a tie; with log-probabilities available, ``p_a`` is the mean of the two
orders' probabilities that A is better. Answers are constrained with vLLM-style structured
outputs when ``structured`` is on (until the endpoint refuses the field), and parsed
defensively in any case.

Faults never leave ``annotate`` as anything but ``ProviderUnavailable`` (endpoint-wide: the batch
waits) or an error annotation (per item); which is which is ``transport``'s docstring.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .base import Annotation, GenerationView, ProviderUnavailable
from .templates import fill, load_template
from .transport import MAX_RAW_CHARS, Breaker, JudgeClient, JudgeFault, RateLimiter, Reply

__all__ = ["Breaker", "JudgeConfig", "LLMJudge", "RateLimiter", "parse_choice", "parse_likert"]

Mode = Literal["tag", "pairwise", "likert", "critique", "refinement"]


@dataclass(frozen=True)
class JudgeConfig:
    name: str
    mode: Mode
    base_url: str
    model: str
    api_key: str = "unused"
    tags: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ("helpfulness", "correctness", "coherence", "verbosity")
    criterion: str = "Prefer the response that is more helpful and harmless."
    template_path: Path | None = None
    structured: bool = True
    max_tokens: int = 256
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 0.5
    max_concurrency: int = 4
    requests_per_s: float = 0.0  # 0 = no rate limit
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    # Extra request fields sent with every request, e.g. Tiller's {"log": false} for a judge
    # that is the served model itself (its verdicts stay out of the generation log).
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode == "tag" and not self.tags:
            raise ValueError(f"judge {self.name!r}: mode 'tag' needs tags")


def parse_choice(text: str, options: Sequence[str]) -> str | None:
    """The option the text names: exact match first, then the earliest whole-word mention
    (longest option wins ties at the same position). None if it names none."""
    clean = text.strip().strip(".\"'` *").strip()
    for o in options:
        if clean.lower() == o.lower():
            return o
    best: tuple[int, int, str] | None = None
    for o in options:
        m = re.search(r"(?<![A-Za-z])" + re.escape(o) + r"(?![A-Za-z])", text, re.IGNORECASE)
        if m and (best is None or (m.start(), -len(o)) < (best[0], best[1])):
            best = (m.start(), -len(o), o)
    return best[2] if best else None


def parse_likert(text: str, attributes: Sequence[str]) -> dict[str, int] | None:
    """``{attribute: 1..5}`` from a JSON object in the text, or ``attr: n`` lines."""
    m = re.search(r"\{.*\}", text, re.DOTALL)
    found: dict[str, int] = {}
    if m:
        try:
            data = json.loads(m.group(0))
            for a in attributes:
                v = data.get(a)
                if isinstance(v, (int, float)) and 1 <= v <= 5:
                    found[a] = round(v)
        except (json.JSONDecodeError, AttributeError):
            pass
    for a in attributes:
        if a not in found:
            mm = re.search(re.escape(a) + r"\W{0,3}([1-5])\b", text, re.IGNORECASE)
            if mm:
                found[a] = int(mm.group(1))
    return found if len(found) == len(attributes) else None


class LLMJudge:
    """A ``Provider`` that asks an LLM. One instance per configured judge."""

    def __init__(self, config: JudgeConfig, client: Any = None) -> None:
        self.config = config
        self.name = config.name
        self._template = load_template(config.mode, config.template_path)
        self.transport = JudgeClient(config, client)

    # ------------------------------------------------------------------ transport

    def _constraint(self) -> dict[str, Any]:
        """vLLM's ``structured_outputs`` body for this mode ({} when there is none)."""
        c = self.config
        if c.mode == "tag":
            return {"choice": list(c.tags)}
        if c.mode == "pairwise":
            return {"choice": ["A", "B"]}
        if c.mode == "likert":
            # A regex for the compact JSON object, not a JSON schema: a schema leaves the
            # whitespace free, and weak judges loop on whitespace until max_tokens.
            body = ", ".join(f'"{re.escape(a)}": [1-5]' for a in c.attributes)
            return {"regex": r"\{" + body + r"\}"}
        return {}

    async def _ask(self, prompt: str) -> Reply:
        """The judge's reply; ``JudgeFault`` / ``ProviderUnavailable`` as in ``transport``."""
        c = self.config
        pairwise = c.mode == "pairwise"
        return await self.transport.ask(
            prompt,
            max_tokens=4 if pairwise else c.max_tokens,
            logprobs=pairwise,
            constraint=self._constraint() if c.structured else {},
        )

    # ------------------------------------------------------------------ modes

    def _note(
        self,
        g: GenerationView,
        kind: Any,
        value: Any,
        reply: Reply,
        error: str = "",
        other: str = "",
    ) -> Annotation:
        return Annotation(
            generation_id=g.id,
            generation_id_b=other,
            provider=self.name,
            kind=kind,
            value=value,
            raw=reply.text[:MAX_RAW_CHARS],
            judge_model=self.config.model,
            latency_s=reply.latency_s,
            error=error,
        )

    async def _single(self, g: GenerationView) -> Annotation:
        c = self.config
        fields = {
            "prompt": g.user_prompt,
            "response": g.output_text,
            "categories": "; ".join(c.tags),
            "attributes": ", ".join(c.attributes),
        }
        try:
            reply = await self._ask(fill(self._template, **fields))
        except JudgeFault as f:
            return self._note(g, _KIND[c.mode], None, Reply(f.raw), f"judge fault: {f.reason}")
        if c.mode == "tag":
            tag = parse_choice(reply.text, c.tags)
            return self._note(g, "tag", tag, reply, "" if tag else "no category in the answer")
        if c.mode == "likert":
            ratings = parse_likert(reply.text, c.attributes)
            return self._note(
                g, "likert", ratings, reply, "" if ratings else "no complete rating in the answer"
            )
        text = reply.text.strip()
        kind: Any = c.mode
        return self._note(g, kind, text or None, reply, "" if text else "empty answer")

    async def _pair(self, a: GenerationView, b: GenerationView) -> Annotation:
        c = self.config
        prompts = [
            fill(
                self._template,
                prompt=a.user_prompt,
                response_a=x.output_text,
                response_b=y.output_text,
                criterion=c.criterion,
            )
            for x, y in ((a, b), (b, a))
        ]
        first, second = _raise_endpoint(
            await asyncio.gather(*(self._ask(p) for p in prompts), return_exceptions=True)
        )
        faults = [x for x in (first, second) if isinstance(x, JudgeFault)]
        if faults:
            f = faults[0]
            raw = Reply(f.raw)
            return self._note(a, "preference", None, raw, f"judge fault: {f.reason}", other=b.id)
        assert isinstance(first, Reply) and isinstance(second, Reply)
        v1 = parse_choice(first.text, ("A", "B"))
        v2 = parse_choice(second.text, ("A", "B"))
        half = MAX_RAW_CHARS // 2
        raw = Reply(
            json.dumps({"a_first": first.text[:half], "b_first": second.text[:half]}),
            latency_s=first.latency_s + second.latency_s,
        )
        if v1 is None or v2 is None:
            return self._note(a, "preference", None, raw, "no A/B verdict in an answer", other=b.id)
        # In the second order the letters are swapped: its "B" means generation a.
        a_wins = [v1 == "A", v2 == "B"]
        winner = "a" if all(a_wins) else "b" if not any(a_wins) else "tie"
        value: dict[str, Any] = {"winner": winner}
        p1, p2 = _prob_first(first.logprobs), _prob_first(second.logprobs)
        if p1 is not None and p2 is not None:
            value["p_a"] = (p1 + (1.0 - p2)) / 2.0
        return self._note(a, "preference", value, raw, other=b.id)

    async def annotate(self, batch: Sequence[GenerationView]) -> list[Annotation]:
        """One annotation per generation (tag, likert, critique, refinement) or per pair of
        consecutive samples of a request (pairwise), error annotations for per-item faults;
        ``ProviderUnavailable`` when the endpoint is down (nothing of the batch is returned)."""
        if self.config.mode != "pairwise":
            jobs = [self._single(g) for g in batch]
        else:
            groups: dict[str, list[GenerationView]] = {}
            for g in batch:
                groups.setdefault(g.group_id, []).append(g)
            pairs = [(m[i], m[i + 1]) for m in groups.values() for i in range(0, len(m) - 1, 2)]
            jobs = [self._pair(a, b) for a, b in pairs]
        # Every call finishes (each is bounded) before a fault is raised: no orphaned tasks.
        notes = _raise_endpoint(await asyncio.gather(*jobs, return_exceptions=True))
        return [n for n in notes if isinstance(n, Annotation)]


_KIND: dict[str, Any] = {"tag": "tag", "likert": "likert", "pairwise": "preference",
                         "critique": "critique", "refinement": "refinement"}  # fmt: skip


def _raise_endpoint(results: list[Any]) -> list[Any]:
    """``results`` of a gather with ``return_exceptions``; raises the first exception that is
    not a per-item ``JudgeFault`` (endpoint-wide faults first, then anything else)."""
    errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, JudgeFault)]
    for e in errors:
        if isinstance(e, ProviderUnavailable):
            raise e
    if errors:
        raise errors[0]
    return results


def _prob_first(logprobs: dict[str, float]) -> float | None:
    """P(A) / (P(A) + P(B)) from the first token's alternatives, if both are there."""
    if "A" in logprobs and "B" in logprobs:
        pa, pb = math.exp(logprobs["A"]), math.exp(logprobs["B"])
        return pa / (pa + pb)
    return None
