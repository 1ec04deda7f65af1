"""The generation service: validate, condition, tokenize, run on the engine, assemble results.

Knows nothing about gRPC or vLLM. Safe to call concurrently from one event loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from .adapters import AdapterTable, LoadedAdapter
from .config import Limits
from .engine import Engine
from .errors import InvalidArgument, Unavailable, Unimplemented
from .prompt import render_chat, render_text
from .validation import check_attributes, check_feedback, check_input, resolve_sampling
from .values import (
    ChatTurn,
    CompletionResult,
    Delta,
    EngineRequest,
    Finish,
    GenerateRequest,
    GenerateResult,
    Prepared,
    StreamEnd,
    StreamEvent,
    StreamStart,
    Timing,
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


class GenerationService:
    def __init__(self, engine: Engine, adapters: AdapterTable, limits: Limits) -> None:
        self._engine = engine
        self._adapters = adapters
        self._limits = limits
        self._draining = False
        self._inflight = _InFlight()

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
        return Status(self._inflight.count, self._engine.num_unfinished(), self._draining)

    # ---------------------------------------------------------------- preparation

    def _render(self, req: GenerateRequest, adapter: LoadedAdapter) -> str:
        cond = adapter.conditioning
        feedback = req.feedback or (cond.default_tag if cond else None) or ""
        if req.chat is not None:
            turns: tuple[ChatTurn, ...] = req.chat
            if feedback and cond is not None:
                turns = render_chat(turns, feedback, cond)
            messages = [{"role": t.role, "content": t.content} for t in turns]
            try:
                text = self._engine.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except Exception as e:  # templates are model data; their errors are the request's
                raise InvalidArgument(f"chat could not be rendered: {e}", field="chat") from e
            return str(text)
        assert req.prompt is not None
        if feedback and cond is not None:
            return render_text(req.prompt, feedback, cond)
        return req.prompt

    def prepare(self, req: GenerateRequest) -> Prepared:
        """Check and render ``req``; raises ``TillerError`` subclasses for bad input."""
        accepted_at = time.monotonic()
        if self._draining:
            raise Unavailable("server is shutting down; retry on another replica")
        check_input(req, self._limits)
        sampling = resolve_sampling(req.sampling, self._limits)
        adapter = self._adapters.resolve(req.adapter)
        check_feedback(req, adapter, self._limits)
        check_attributes(req, adapter, self._limits)
        if req.feedback_mix:
            raise Unimplemented("feedback_mix is validated but not served by this server yet")
        if req.attributes:
            raise Unimplemented("attribute steering is validated but not served by this server yet")
        rendered = self._render(req, adapter)
        special = req.chat is None  # chat templates carry their own special tokens
        ids = self._engine.tokenizer.encode(rendered, add_special_tokens=special)
        limit = self._engine.max_model_len
        if len(ids) >= limit:
            raise InvalidArgument(
                f"prompt is {len(ids)} tokens; the model's context is {limit}",
                field="chat" if req.chat is not None else "prompt",
            )
        if len(ids) + sampling.max_tokens > limit:
            raise InvalidArgument(
                f"sampling.max_tokens {sampling.max_tokens} + {len(ids)} prompt tokens exceeds "
                f"the context of {limit}; at most {limit - len(ids)} fit",
                field="sampling.max_tokens",
            )
        request_id = req.request_id or uuid.uuid4().hex
        engine_request = EngineRequest(
            request_id=f"{request_id}-{uuid.uuid4().hex[:8]}",
            prompt_token_ids=tuple(ids),
            sampling=sampling,
            lora_name=f"{adapter.name}@v{adapter.version}" if adapter.lora_id else None,
            lora_id=adapter.lora_id,
            lora_path=str(adapter.path) if adapter.lora_id else None,
        )
        return Prepared(
            request_id=request_id,
            engine_request=engine_request,
            rendered_prompt=rendered,
            served_by=self._adapters.served_by(adapter),
            generation_ids=tuple(f"gen-{uuid.uuid4().hex}" for _ in range(sampling.n)),
            accepted_at=accepted_at,
        )

    # ---------------------------------------------------------------- running

    async def stream(self, req: GenerateRequest) -> AsyncGenerator[StreamEvent, None]:
        """StreamStart, then Deltas as the engine produces them, then StreamEnd.

        Closing the iterator early (client cancel, deadline) aborts the engine request.
        """
        prepared = self.prepare(req)
        self._inflight.count += 1
        self._inflight.idle.clear()
        try:
            er = prepared.engine_request
            yield StreamStart(
                request_id=prepared.request_id,
                served_by=prepared.served_by,
                seed=er.sampling.seed,
                generation_ids=prepared.generation_ids,
                rendered_prompt=prepared.rendered_prompt,
            )
            submitted = time.monotonic()
            first: float | None = None
            produced = 0
            async for deltas in self._engine.generate(er):
                for d in deltas:
                    if first is None and d.token_ids:
                        first = time.monotonic()
                    produced += len(d.token_ids)
                    yield d
            end = time.monotonic()
            yield StreamEnd(
                prompt_tokens=len(er.prompt_token_ids),
                completion_tokens=produced,
                timing=Timing(
                    queue_s=submitted - prepared.accepted_at,
                    time_to_first_token_s=(first or end) - prepared.accepted_at,
                    total_s=end - prepared.accepted_at,
                ),
            )
        finally:
            self._inflight.count -= 1
            if self._inflight.count == 0:
                self._inflight.idle.set()

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        """Run ``req`` to completion and return every sample."""
        texts: dict[int, list[str]] = {}
        tokens: dict[int, list[int]] = {}
        finish: dict[int, Finish] = {}
        start: StreamStart | None = None
        end: StreamEnd | None = None
        async for event in self.stream(req):
            if isinstance(event, StreamStart):
                start = event
            elif isinstance(event, Delta):
                texts.setdefault(event.index, []).append(event.text)
                tokens.setdefault(event.index, []).extend(event.token_ids)
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
        )
