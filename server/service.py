"""The generation service: validate, condition, tokenize, run on the engine, assemble results.

Knows nothing about gRPC or vLLM. Safe to call concurrently from one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace

from .adapters import AdapterTable
from .conditioning import prompt_token_ids, render_prompt, resolve_steer
from .config import Limits
from .engine import Engine
from .formats.errors import FailedPrecondition, Unavailable
from .lockstep import LockstepLost, mixed_deltas
from .logrecords import (
    FeedbackInput,
    GenerationRecord,
    check_feedback_input,
    insert_generations,
    record_feedback,
)
from .logwriter import LogLoss, LogWriter
from .validation import check_attributes, check_feedback, check_input, resolve_sampling
from .values import (
    BACKGROUND_PRIORITY,
    UNARY_STREAM_INTERVAL,
    CompletionResult,
    Delta,
    EngineRequest,
    Finish,
    GenerateRequest,
    GenerateResult,
    MixMember,
    Prepared,
    StreamEnd,
    StreamEvent,
    StreamStart,
    Timing,
    TokenLogprob,
)


@dataclass
class _InFlight:
    count: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass(frozen=True)
class Status:
    in_flight: int
    engine_unfinished: int
    draining: bool
    log_queue_depth: int = 0
    log_written: int = 0
    log_lost: int = 0


class GenerationService:
    def __init__(
        self, engine: Engine, adapters: AdapterTable, limits: Limits, log: LogWriter | None = None
    ) -> None:
        self._engine = engine
        self._log = log
        self._adapters = adapters
        self._limits = limits
        self._draining = False
        self._inflight = _InFlight()
        self._background: Seats | None = None  # made on first use: needs the engine's seats

    # ---------------------------------------------------------------- lifecycle

    def start_draining(self) -> None:
        """New requests get UNAVAILABLE from now on; accepted ones run to the end."""
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._inflight.idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def status(self) -> Status:
        log = self._log
        return Status(
            in_flight=self._inflight.count,
            engine_unfinished=self._engine.num_unfinished(),
            draining=self._draining,
            log_queue_depth=log.queue_depth if log else 0,
            log_written=log.stats.written if log else 0,
            log_lost=log.stats.lost if log else 0,
        )

    async def check_health(self) -> None:
        """``Unavailable`` unless the engine answers."""
        try:
            await self._engine.check_health()
        except Exception as e:
            raise Unavailable(f"the inference engine is not healthy: {e}") from e

    # ---------------------------------------------------------------- preparation

    def prepare(self, req: GenerateRequest) -> Prepared:
        """Check and render ``req``; raises ``TillerError`` subclasses for bad input."""
        accepted_at = time.monotonic()
        if self._draining:
            raise Unavailable("server is shutting down; retry on another replica")
        check_input(req, self._limits)
        sampling = resolve_sampling(req.sampling, self._limits, self._engine.sampling_defaults)
        adapter = self._adapters.resolve(req.adapter)
        check_feedback(req, adapter, self._limits)
        check_attributes(req, adapter, self._limits)
        steer, attributes = resolve_steer(req, adapter)
        request_id = req.request_id or uuid.uuid4().hex
        engine_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        mix: tuple[tuple[str, float], ...] = req.feedback_mix
        if len(mix) == 1 and mix[0][1] == 1.0:
            # One tag at weight 1 is plain conditioning: byte-identical by construction.
            req = replace(req, feedback=mix[0][0], feedback_mix=())
            mix = ()
        conditions = mix or ((req.feedback, 1.0),)
        siblings: list[EngineRequest] = []
        rendered_all: list[str] = []
        for member, (tag, weight) in enumerate(conditions):
            rendered = render_prompt(self._engine, req, adapter, tag)
            ids = prompt_token_ids(self._engine, self._limits, rendered, req, sampling.max_tokens)
            rendered_all.append(rendered)
            siblings.append(
                EngineRequest(
                    request_id=f"{engine_id}-m{member}" if mix else engine_id,
                    prompt_token_ids=ids,
                    sampling=sampling,
                    lora_name=adapter.lora_name,
                    lora_id=adapter.lora_id,
                    lora_path=str(adapter.path) if adapter.lora_id else None,
                    mix=MixMember(engine_id, member, len(conditions), weight) if mix else None,
                    steer=steer,
                    priority=BACKGROUND_PRIORITY if req.background else 0,
                )
            )
        self._adapters.acquire(adapter.name, adapter.version)  # released when the stream ends
        return Prepared(
            request_id=request_id,
            engine_request=siblings[0],
            # A mixed request reports every condition's rendering, as a JSON list.
            rendered_prompt=json.dumps(rendered_all) if mix else rendered_all[0],
            served_by=self._adapters.served_by(adapter),
            generation_ids=tuple(f"gen-{uuid.uuid4().hex}" for _ in range(sampling.n)),
            accepted_at=accepted_at,
            siblings=tuple(siblings) if mix else (),
            attributes=attributes,
        )

    # ---------------------------------------------------------------- running

    def _records(
        self,
        req: GenerateRequest,
        p: Prepared,
        texts: dict[int, list[str]],
        tokens: dict[int, list[int]],
        finish: dict[int, Finish],
        ttft: float,
        total: float,
    ) -> list[GenerationRecord]:
        s = p.served_by
        return [
            GenerationRecord(
                id=gid,
                request_id=p.request_id,
                group_id=p.engine_request.request_id,
                sample_index=i,
                request=replace(req, attributes=p.attributes) if p.attributes else req,
                rendered_prompt=p.rendered_prompt,
                adapter=s.name,
                adapter_version=s.version,
                base_model=s.base_model,
                sampling=p.engine_request.sampling,
                output_text="".join(texts.get(i, [])),
                output_token_ids=tuple(tokens.get(i, [])),
                finish_reason=finish.get(i, Finish.ABORT).value,
                prompt_tokens=len(p.engine_request.prompt_token_ids),
                latency_s=total,
                ttft_s=ttft,
            )
            for i, gid in enumerate(p.generation_ids)
        ]

    def _seats_for(
        self, req: GenerateRequest, prepared: Prepared
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Interactive requests go straight to the engine (counted, so background work yields
        to them); background ones first take a seat per sequence (``Limits``'
        ``background_seat_share`` of the engine's, ``background_seats_under_load`` while
        users are in the engine) and hold it to the end."""
        if self._background is None:
            share = self._limits.background_seat_share
            under_load = self._limits.background_seats_under_load
            self._background = Seats(
                max(1, int(self._engine.max_num_seqs * share)),
                None if under_load < 0 else under_load,
            )
        sequences = prepared.engine_request.sampling.n * max(1, len(prepared.siblings))
        if not req.background:
            return self._background.interactive(sequences)
        return self._background.take(sequences)

    def _wants_log(self, req: GenerateRequest) -> bool:
        return self._log is not None and req.log is not False

    async def stream(
        self, req: GenerateRequest, *, unary: bool = False
    ) -> AsyncGenerator[StreamEvent, None]:
        """StreamStart, then Deltas as the engine produces them, then StreamEnd.

        ``unary``: the caller only wants the whole result, so the engine delivers output in
        chunks of ``UNARY_STREAM_INTERVAL`` tokens (the first token at once, for the time to
        first token): fewer wake-ups per token. An aborted unary request logs what had arrived.

        Closing the iterator early (client cancel, deadline) aborts the engine request; what
        was generated so far is still logged, with finish reason ``abort`` (nothing when no token
        was generated). StreamEnd comes
        only after the log committed the generations (``logged``), so returned ids are durable.
        """
        prepared = self.prepare(req)
        self._inflight.count += 1
        self._inflight.idle.clear()
        texts: dict[int, list[str]] = {}
        tokens: dict[int, list[int]] = {}
        finish: dict[int, Finish] = {}
        first: float | None = None
        completed = False
        try:
            er = prepared.engine_request
            yield StreamStart(
                request_id=prepared.request_id,
                served_by=prepared.served_by,
                seed=er.sampling.seed,
                generation_ids=prepared.generation_ids,
                rendered_prompt=prepared.rendered_prompt,
            )
            async with self._seats_for(req, prepared):
                submitted = time.monotonic()
                deltas_in = (
                    mixed_deltas(self._engine, prepared.siblings)
                    if prepared.siblings  # lockstep needs every step's output
                    else self._engine.generate(
                        replace(er, stream_interval=UNARY_STREAM_INTERVAL) if unary else er
                    )
                )
                async for deltas in deltas_in:
                    for d in deltas:
                        if first is None and d.token_ids:
                            first = time.monotonic()
                        texts.setdefault(d.index, []).append(d.text)
                        tokens.setdefault(d.index, []).extend(d.token_ids)
                        if d.finish is not Finish.NONE:
                            finish[d.index] = d.finish
                        yield d
            end = time.monotonic()
            completed = True
            logged = False
            if self._wants_log(req):
                ttft = (first or end) - prepared.accepted_at
                records = self._records(
                    req, prepared, texts, tokens, finish, ttft, end - prepared.accepted_at
                )
                logged = await self._write_generations(records)
            yield StreamEnd(
                prompt_tokens=len(er.prompt_token_ids),
                completion_tokens=sum(len(t) for t in tokens.values()),
                timing=Timing(
                    queue_s=submitted - prepared.accepted_at,
                    time_to_first_token_s=(first or end) - prepared.accepted_at,
                    total_s=end - prepared.accepted_at,
                ),
                logged=logged,
            )
        finally:
            # An aborted request logs what it generated; one that never produced a token (the
            # engine failed or the client left while it queued) is no generation to keep.
            produced = any(tokens.values())
            if not completed and produced and self._wants_log(req) and self._log is not None:
                now = time.monotonic()
                records = self._records(
                    req,
                    prepared,
                    texts,
                    tokens,
                    {},
                    (first or now) - prepared.accepted_at,
                    now - prepared.accepted_at,
                )
                self._log.submit(insert_generations(records))  # fire and forget
            self._inflight.count -= 1
            if self._inflight.count == 0:
                self._inflight.idle.set()
            await self._adapters.release(prepared.served_by.name, prepared.served_by.version)

    async def _write_generations(self, records: list[GenerationRecord]) -> bool:
        assert self._log is not None
        try:
            return bool(await self._log.submit(insert_generations(records)))
        except LogLoss:
            return False  # counted and reported loudly by the writer

    async def generate(self, req: GenerateRequest, lockstep_retries: int = 2) -> GenerateResult:
        """Run ``req`` to completion and return every sample.

        A feedback-mix request that loses lockstep (preemption under memory pressure) is rerun
        from scratch up to ``lockstep_retries`` times — nothing was sent to the client yet —
        then fails with ABORTED.
        """
        for attempt in range(lockstep_retries + 1):
            try:
                return await self._generate_once(req)
            except LockstepLost:
                if attempt == lockstep_retries:
                    raise
        raise AssertionError("unreachable")

    async def _generate_once(self, req: GenerateRequest) -> GenerateResult:
        texts: dict[int, list[str]] = {}
        tokens: dict[int, list[int]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        finish: dict[int, Finish] = {}
        start: StreamStart | None = None
        end: StreamEnd | None = None
        async for event in self.stream(req, unary=True):
            if isinstance(event, StreamStart):
                start = event
            elif isinstance(event, Delta):
                texts.setdefault(event.index, []).append(event.text)
                tokens.setdefault(event.index, []).extend(event.token_ids)
                logprobs.setdefault(event.index, []).extend(event.logprobs)
                if event.finish is not Finish.NONE:
                    finish[event.index] = event.finish
            else:
                end = event
        assert start is not None and end is not None
        completions = tuple(
            CompletionResult(
                index=i,
                generation_id=start.generation_ids[i],
                text="".join(texts.get(i, [])),
                token_ids=tuple(tokens.get(i, [])),
                finish=finish.get(i, Finish.ABORT),
                logprobs=tuple(logprobs.get(i, ())),
            )
            for i in range(len(start.generation_ids))
        )
        return GenerateResult(
            request_id=start.request_id,
            completions=completions,
            prompt_tokens=end.prompt_tokens,
            completion_tokens=end.completion_tokens,
            served_by=start.served_by,
            timing=end.timing,
            rendered_prompt=start.rendered_prompt,
            seed=start.seed,
            logged=end.logged,
        )

    # ---------------------------------------------------------------- feedback

    async def submit_feedback(self, fb: FeedbackInput) -> tuple[str, bool]:
        """Record app feedback durably; returns (feedback id, was a duplicate of the key)."""
        if self._log is None:
            raise FailedPrecondition("the generation log is off on this server (--no-log)")
        check_feedback_input(fb)
        try:
            feedback_id, duplicate = await self._log.submit(record_feedback(fb))
        except LogLoss as e:
            raise Unavailable(f"feedback could not be recorded ({e}); retry") from e
        return str(feedback_id), bool(duplicate)


class Seats:
    """Background work's engine sequence seats: ``size`` of them, or ``under_load`` (None:
    ``size``) while interactive sequences are in the engine. ``take(k)`` waits until k fit (k
    above the capacity goes alone, when no seat is held and the capacity is not 0) and gives
    them back on exit, even when cancelled; ``interactive(k)`` counts users' sequences for as
    long as they run. The load lasts ``linger_s`` past the last user's sequence, so that a
    client's next request finds its seat free rather than background work admitted in the gap.
    Event loop only."""

    def __init__(self, size: int, under_load: int | None = None, linger_s: float = 1.0) -> None:
        self.size = size
        self.under_load = under_load
        self.linger_s = linger_s
        self.held = 0
        self.users = 0
        self._last_user = -math.inf
        self._turn = asyncio.Condition()
        self._wakers: set[asyncio.Task[None]] = set()

    @property
    def capacity(self) -> int:
        idle = self.users == 0 and time.monotonic() - self._last_user >= self.linger_s
        if idle or self.under_load is None:
            return self.size
        return min(self.size, self.under_load)

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.held)

    def _fits(self, k: int) -> bool:
        cap = self.capacity
        return self.held + k <= cap or (self.held == 0 and cap > 0)

    @contextlib.asynccontextmanager
    async def take(self, k: int) -> AsyncIterator[None]:
        async with self._turn:
            await self._turn.wait_for(lambda: self._fits(k))
            self.held += k
        try:
            yield
        finally:
            self.held -= k  # at once: a cancelled holder must not keep its seats
            self._notify()

    @contextlib.asynccontextmanager
    async def interactive(self, k: int) -> AsyncIterator[None]:
        if self.under_load is None:  # users change nothing: no bookkeeping on their path
            yield
            return
        self.users += k
        try:
            yield
        finally:
            self.users -= k
            self._last_user = time.monotonic()
            if self.users == 0:
                # waiters re-check once the load has lingered out
                asyncio.get_running_loop().call_later(self.linger_s + 0.01, self._notify)

    def _notify(self) -> None:
        waker = asyncio.get_running_loop().create_task(self._wake())
        self._wakers.add(waker)
        waker.add_done_callback(self._wakers.discard)

    async def _wake(self) -> None:
        async with self._turn:
            self._turn.notify_all()
