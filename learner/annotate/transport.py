"""One judge request over an OpenAI-compatible API, and what each way of failing means.

The annotator must outlive any judge, so every fault is sorted into one of two scopes.

Endpoint-wide faults: the judge cannot answer anyone now. The call is retried ``max_retries``
times with exponential backoff, then raises ``ProviderUnavailable``: nothing is committed, the
backlog keeps, and the runner tries the batch again later (with its own backoff).

- no connection (refused, reset, DNS, TLS) or a connection dropped mid-answer;
- no complete answer within ``timeout_s`` (a stall, or a body trickling in: the whole call is
  bounded, not only each read);
- HTTP 5xx, 429, 408, 409, 425; and 401, 403, 404 (credentials, URL or model name): these fail
  every item alike, so labelling items as errors would throw the backlog away;
- while the breaker is open (``breaker_threshold`` endpoint faults in a row), every call fails
  at once for ``breaker_cooldown_s``.

Per-item faults: the judge answered this request, but not usably. The item gets an error
annotation (``value`` None, ``error`` says why, ``raw`` at most ``MAX_RAW_CHARS`` of the answer)
and is never asked again:

- a body that is not JSON, is empty, or lacks choices / message / content: retried
  ``max_retries`` times first (a flaky proxy may recover);
- a body over ``MAX_BODY_BYTES``: reading stops there; retried likewise;
- any other 4xx (400, 413, 422...): the endpoint refuses this request; not retried;
- an answer that names no option or no complete rating (decided in ``judge``; not retried, the
  judge samples at temperature 0).

One 400 is neither: when its message names a vLLM-only request field (``structured_outputs``,
``guided_*``), structured outputs are switched off for this judge for the life of the process
(one warning line) and the request is sent again at once as plain prompting, whose answers are
parsed as always. A 400 naming ``logprobs`` drops log-probabilities the same way.

Thread-safety: one ``JudgeClient`` per judge, used from one event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .base import ProviderUnavailable

if TYPE_CHECKING:
    from .judge import JudgeConfig

log = logging.getLogger("tiller.annotate")

MAX_BODY_BYTES = 1 << 20  # a judge's answer is a few hundred tokens; read at most 1 MiB
MAX_TEXT_CHARS = 32_000  # answer text kept for parsing and as a critique's value
MAX_RAW_CHARS = 4_000  # answer text stored in an annotation's ``raw``

Scope = Literal["endpoint", "item", "field"]
_VLLM_FIELD = re.compile(r"structured_outputs|guided_\w+")
_ENDPOINT_STATUS = frozenset({401, 403, 404, 408, 409, 425, 429})


@dataclass(frozen=True)
class Fault:
    """How one failed call is handled: ``scope`` as in the module docstring; ``retry`` whether
    the same request is worth sending again; ``field`` the request field to drop (scope
    ``"field"``); ``raw`` what came back, bounded."""

    scope: Scope
    reason: str
    retry: bool = True
    field: str = ""
    raw: str = ""


class JudgeFault(Exception):
    """A per-item fault after its retries: the caller records an error annotation."""

    def __init__(self, reason: str, raw: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


class BadAnswer(Exception):
    """The body arrived but is not a usable completion (per-item)."""

    def __init__(self, reason: str, raw: str = "") -> None:
        super().__init__(reason)
        self.raw = raw[:MAX_RAW_CHARS]


class Dropped(Exception):
    """The connection failed while the body was being read (endpoint-wide)."""


def classify_status(status: int, message: str) -> Fault:
    """The fault for an HTTP error ``status`` whose body says ``message``."""
    short = message[:300]
    if status == 400:
        m = _VLLM_FIELD.search(message)
        if m:
            return Fault("field", f"HTTP 400 names {m.group(0)}", field="structured_outputs")
        if "logprobs" in message:
            return Fault("field", "HTTP 400 names logprobs", field="logprobs")
    if status >= 500 or status in _ENDPOINT_STATUS:
        return Fault("endpoint", f"HTTP {status}: {short}")
    return Fault("item", f"HTTP {status}: {short}", retry=False, raw=message[:MAX_RAW_CHARS])


def classify(exc: Exception) -> Fault | None:
    """The fault for an exception raised by a judge call; None for one that is not a judge
    fault (a bug: the caller lets it propagate)."""
    import openai

    if isinstance(exc, (TimeoutError, openai.APITimeoutError)):
        return Fault("endpoint", f"Timeout: {type(exc).__name__} {exc}".strip())
    if isinstance(exc, (openai.APIConnectionError, Dropped)):
        return Fault("endpoint", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, (dict, list, str)) else ""
        return classify_status(exc.status_code, f"{exc.message} {json.dumps(body)}")
    if isinstance(exc, BadAnswer):
        return Fault("item", str(exc), raw=exc.raw)
    return None


@dataclass(frozen=True)
class Reply:
    text: str
    logprobs: dict[str, float] = field(default_factory=dict)  # first-token alternatives
    latency_s: float = 0.0


def parse_completion(body: bytes, latency_s: float = 0.0) -> Reply:
    """The first choice's text and first-token log-probabilities from a chat completion body;
    ``BadAnswer`` when the body is not one. The text is cut to ``MAX_TEXT_CHARS``."""
    raw = body[:MAX_RAW_CHARS].decode("utf-8", "replace")
    if not body.strip():
        raise BadAnswer("empty body")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadAnswer("body is not JSON", raw) from None
    choices = data.get("choices") if isinstance(data, Mapping) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise BadAnswer("no choices in the body", raw)
    message = choices[0].get("message")
    if not isinstance(message, Mapping):
        raise BadAnswer("no message in the first choice", raw)
    content = message.get("content")
    if not isinstance(content, str):
        raise BadAnswer("no text content in the message", raw)
    return Reply(content[:MAX_TEXT_CHARS], _first_token_alternatives(choices[0]), latency_s)


def _first_token_alternatives(choice: Mapping[str, Any]) -> dict[str, float]:
    try:
        top = choice["logprobs"]["content"][0]["top_logprobs"]
        return {str(x["token"]).strip(): float(x["logprob"]) for x in top}
    except (KeyError, IndexError, TypeError, ValueError):
        return {}


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


def openai_client(base_url: str, api_key: str, timeout_s: float) -> Any:
    """An ``AsyncOpenAI`` without the SDK's own retries: retries and backoff are the caller's
    (``classify`` sorts each fault)."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)


class JudgeClient:
    """Sends prompts to one judge: returns a ``Reply``, raises ``JudgeFault`` for a per-item
    fault and ``ProviderUnavailable`` for an endpoint-wide one (module docstring)."""

    def __init__(self, config: JudgeConfig, client: Any = None) -> None:
        self.config = config
        self.structured = config.structured  # off for good after a 400 naming the field
        self.logprobs = True
        self._client = client or openai_client(config.base_url, config.api_key, config.timeout_s)
        self._sem = asyncio.Semaphore(config.max_concurrency)
        self.breaker = Breaker(config.breaker_threshold, config.breaker_cooldown_s)
        self._limiter = RateLimiter(config.requests_per_s)

    async def _post(self, kw: dict[str, Any]) -> bytes:
        """The body of a 2xx answer, read up to ``MAX_BODY_BYTES``."""
        api = self._client.chat.completions.with_streaming_response
        async with api.create(**kw) as resp:
            chunks: list[bytes] = []
            size = 0
            try:
                async for chunk in resp.iter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        head = b"".join(chunks)[:MAX_RAW_CHARS].decode("utf-8", "replace")
                        raise BadAnswer(f"body over {MAX_BODY_BYTES} bytes", head)
            except BadAnswer:
                raise
            except Exception as e:  # the stream broke after the headers
                raise Dropped(f"{type(e).__name__}: {e}") from e
            return b"".join(chunks)

    def _drop(self, what: str, reason: str) -> None:
        if what == "logprobs":
            if self.logprobs:
                self.logprobs = False
                log.warning("judge %s: %s; asking without logprobs", self.config.name, reason)
        elif self.structured:
            self.structured = False
            log.warning(
                "judge %s: %s; switching to plain prompting with parsing", self.config.name, reason
            )

    async def ask(
        self, prompt: str, *, max_tokens: int, logprobs: bool, constraint: dict[str, Any]
    ) -> Reply:
        """One completion of ``prompt`` at temperature 0; ``constraint`` is the vLLM
        ``structured_outputs`` body (sent only while structured outputs are on)."""
        c = self.config
        attempt = 0
        while True:
            self.breaker.check()
            await self._limiter.wait()
            kw: dict[str, Any] = {
                "model": c.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0.0,
            }
            want_lp = sent_structured = False
            try:
                async with self._sem:
                    # Built once a slot is free: a field switched off meanwhile stays off.
                    want_lp = logprobs and self.logprobs
                    if want_lp:
                        kw |= {"logprobs": True, "top_logprobs": 5}
                    extra = dict(c.extra_body)
                    sent_structured = self.structured and bool(constraint)
                    if sent_structured:
                        extra["structured_outputs"] = constraint
                    if extra:
                        kw["extra_body"] = extra
                    t = time.monotonic()
                    body = await asyncio.wait_for(self._post(kw), c.timeout_s)
                reply = parse_completion(body, time.monotonic() - t)
            except Exception as e:
                fault = classify(e)
                if fault is None:
                    raise
                if fault.scope == "field" and (
                    (fault.field == "logprobs" and want_lp)
                    or (fault.field != "logprobs" and sent_structured)
                ):
                    self._drop(fault.field, fault.reason)
                    continue  # the same request without the field, not counted as a retry
                if fault.scope == "endpoint":
                    self.breaker.record(False, fault.reason)
                    if attempt >= c.max_retries:
                        raise ProviderUnavailable(f"judge {c.name!r}: {fault.reason}") from e
                elif not fault.retry or attempt >= c.max_retries or fault.scope == "field":
                    raise JudgeFault(fault.reason, fault.raw) from e
                await asyncio.sleep(c.backoff_s * 2**attempt)
                attempt += 1
                continue
            self.breaker.record(True)
            return reply
