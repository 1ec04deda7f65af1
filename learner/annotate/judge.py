"""LLM judge over any OpenAI-compatible API: tags, pairwise, Likert, critique, refinement.

Pairwise judgements are asked in both orders (OAIF) to cancel position bias: agreeing verdicts
win, disagreeing ones are a tie; with log-probabilities available, ``p_a`` is the mean of the two
orders' probabilities that A is better. Answers are constrained with vLLM-style structured
outputs when ``structured`` is on, and parsed defensively in any case.

Transient failures (connection, timeout, 429, 5xx) are retried with exponential backoff; after
``breaker_threshold`` consecutive failures the breaker opens for ``breaker_cooldown_s`` and every
call raises ``ProviderUnavailable`` at once: the annotator keeps the batch for later.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .base import Annotation, GenerationView, ProviderUnavailable
from .templates import fill, load_template

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

    def __post_init__(self) -> None:
        if self.mode == "tag" and not self.tags:
            raise ValueError(f"judge {self.name!r}: mode 'tag' needs tags")


@dataclass
class Breaker:
    threshold: int
    cooldown_s: float
    failures: int = 0
    opened_at: float | None = None
    last_error: str = ""

    def check(self) -> None:
        if self.opened_at is not None:
            if time.monotonic() - self.opened_at < self.cooldown_s:
                raise ProviderUnavailable(
                    f"judge circuit breaker is open after {self.failures} failures "
                    f"(last: {self.last_error})"
                )
            self.opened_at = None  # half-open: let one batch try
            self.failures = self.threshold - 1

    def record(self, ok: bool, error: str = "") -> None:
        if ok:
            self.failures = 0
            return
        self.failures += 1
        self.last_error = error
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()


class RateLimiter:
    """Spaces calls at least ``1 / rate`` seconds apart (``rate`` <= 0: no limit)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self._interval:
            return
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self._interval
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass(frozen=True)
class Reply:
    text: str
    logprobs: dict[str, float] = field(default_factory=dict)  # first-token alternatives
    latency_s: float = 0.0


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
        from openai import AsyncOpenAI

        self.config = config
        self.name = config.name
        self._template = load_template(config.mode, config.template_path)
        self._client = client or AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key,
            timeout=config.timeout_s,
            max_retries=0,
        )
        self._sem = asyncio.Semaphore(config.max_concurrency)
        self._breaker = Breaker(config.breaker_threshold, config.breaker_cooldown_s)
        self._limiter = RateLimiter(config.requests_per_s)

    # ------------------------------------------------------------------ transport

    def _constraint(self) -> dict[str, Any]:
        c = self.config
        if not c.structured:
            return {}
        if c.mode == "tag":
            return {"structured_outputs": {"choice": list(c.tags)}}
        if c.mode == "pairwise":
            return {"structured_outputs": {"choice": ["A", "B"]}}
        if c.mode == "likert":
            # A regex for the compact JSON object, not a JSON schema: a schema leaves the
            # whitespace free, and weak judges loop on whitespace until max_tokens.
            body = ", ".join(f'"{re.escape(a)}": [1-5]' for a in c.attributes)
            return {"structured_outputs": {"regex": r"\{" + body + r"\}"}}
        return {}

    async def _ask(self, prompt: str) -> Reply:
        import openai

        transient = (
            openai.APIConnectionError,
            openai.APITimeoutError,
            openai.RateLimitError,
            openai.InternalServerError,
        )
        c = self.config
        for attempt in range(c.max_retries + 1):
            self._breaker.check()
            await self._limiter.wait()
            t = time.monotonic()
            try:
                async with self._sem:
                    resp = await self._client.chat.completions.create(
                        model=c.model,
                        messages=[{"role": "user", "content": prompt}],
                        max_tokens=4 if c.mode == "pairwise" else c.max_tokens,
                        temperature=0.0,
                        logprobs=c.mode == "pairwise",
                        top_logprobs=5 if c.mode == "pairwise" else None,
                        extra_body=self._constraint() or None,
                    )
            except transient as e:
                self._breaker.record(False, f"{type(e).__name__}: {e}")
                if attempt == c.max_retries:
                    raise ProviderUnavailable(f"judge {c.name!r}: {type(e).__name__}: {e}") from e
                await asyncio.sleep(c.backoff_s * 2**attempt)
                continue
            self._breaker.record(True)
            choice = resp.choices[0]
            alts: dict[str, float] = {}
            lp = getattr(choice, "logprobs", None)
            if lp is not None and lp.content:
                alts = {x.token.strip(): x.logprob for x in lp.content[0].top_logprobs or []}
            return Reply(choice.message.content or "", alts, time.monotonic() - t)
        raise AssertionError("unreachable")

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
            raw=reply.text,
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
        reply = await self._ask(fill(self._template, **fields))
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
        first, second = await asyncio.gather(*(self._ask(p) for p in prompts))
        v1 = parse_choice(first.text, ("A", "B"))
        v2 = parse_choice(second.text, ("A", "B"))
        raw = Reply(
            json.dumps({"a_first": first.text, "b_first": second.text}),
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
        if self.config.mode != "pairwise":
            return list(await asyncio.gather(*(self._single(g) for g in batch)))
        groups: dict[str, list[GenerationView]] = {}
        for g in batch:
            groups.setdefault(g.group_id, []).append(g)
        pairs = [(m[i], m[i + 1]) for m in groups.values() for i in range(0, len(m) - 1, 2)]
        return list(await asyncio.gather(*(self._pair(a, b) for a, b in pairs)))


def _prob_first(logprobs: dict[str, float]) -> float | None:
    """P(A) / (P(A) + P(B)) from the first token's alternatives, if both are there."""
    if "A" in logprobs and "B" in logprobs:
        pa, pb = math.exp(logprobs["A"]), math.exp(logprobs["B"])
        return pa / (pa + pb)
    return None
