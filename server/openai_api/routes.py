"""The HTTP routes: per request, the same edge as gRPC's interceptor (token and role from
``auth.ROLE_OF``, a concurrency permit, the server's duration cap, metrics), then a call into the
same ``GenerationService``, then ``responses``. Used from the event loop only."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from ..adapters import AdapterTable
from ..auth import Authenticator, bearer
from ..config import Limits, TokenGrant
from ..deadline import Watchdog
from ..formats.errors import InvalidArgument, LimitExceeded, NotFound, TillerError
from ..metrics import Metrics, steering_kind
from ..service import GenerationService
from ..values import AdapterPick, Delta, GenerateRequest, StreamEnd, StreamStart
from . import responses
from .errors import error_body, tiller_error_body, validation_error
from .schema import ChatBody, CompletionBody, FeedbackBody

log = logging.getLogger("tiller.http")
_DONE = b"data: [DONE]\n\n"
# Metric names of the HTTP methods (the gRPC ones are the RPC names).
_METRIC = {
    "/v1/completions": "/openai/Completions",
    "/v1/chat/completions": "/openai/ChatCompletions",
    "/v1/feedback": "/openai/Feedback",
    "/v1/models": "/openai/Models",
}


@dataclass
class Api:
    """What the routes serve from. ``auth=None``: no tokens; ``metrics=None``: no metrics."""

    service: GenerationService
    adapters: AdapterTable
    limits: Limits
    engine_model_id: str
    auth: Authenticator | None = None
    metrics: Metrics | None = None

    def pick(self, model: str, version: int | None) -> AdapterPick:
        """The adapter ``model`` names: the base model, ``name`` (its active version) or
        ``name@vN``; ``NotFound`` (404) for anything not served."""
        base = self.adapters.base_model
        if not model:
            return AdapterPick("", version)
        if model in (base, self.engine_model_id, "base"):
            if version is not None:
                raise InvalidArgument(
                    f"adapter_version needs an adapter model, not the base model {model!r}",
                    field="adapter_version",
                )
            return AdapterPick("base")
        name, sep, tail = model.rpartition("@")
        pinned: int | None = version
        if sep:
            digits = tail[1:] if tail.startswith("v") else tail
            if not digits.isdigit():
                raise NotFound(self._unknown(model), field="model")
            pinned = int(digits)
            if version is not None and version != pinned:
                raise InvalidArgument(
                    f"adapter_version {version} contradicts model {model!r}",
                    field="adapter_version",
                )
        else:
            name = model
        pick = AdapterPick(name, pinned)
        try:
            self.adapters.resolve(pick)  # the table's own lookup: a name or version it lacks
        except InvalidArgument:
            raise NotFound(self._unknown(model), field="model") from None
        return pick

    def _unknown(self, model: str) -> str:
        return f"model {model!r} does not exist; GET /v1/models lists: " + ", ".join(
            m["id"] for m in self.models()
        )

    def models(self) -> list[dict[str, Any]]:
        """``/v1/models``: the base model, each adapter by name (its active version) and each
        loaded version as ``name@vN``."""
        base = self.adapters.base_model
        created = int(time.time())

        def entry(id_: str, parent: str | None, **extra: Any) -> dict[str, Any]:
            root = self.engine_model_id if parent is None else base
            out = {"id": id_, "object": "model", "created": created, "owned_by": "tiller"}
            return {**out, "root": root, "parent": parent, **extra}

        out = [entry(base, None)]
        for name, active, versions, is_default in self.adapters.snapshot():
            if name == "base":
                continue
            top = versions[-1]
            meta = {
                "active_version": active,
                "is_default": is_default,
                "feedback_tags": list(top.conditioning.tags if top.conditioning else ()),
                "attributes": list(top.attributes),
            }
            if active:
                out.append(entry(name, base, tiller=meta))
            out.extend(entry(f"{name}@v{v.version}", name) for v in versions)
        return out


class _Call:
    """One HTTP request passing the edge: its grant, its permit, its deadline, its outcome."""

    def __init__(self, api: Api, path: str, request: Request) -> None:
        self.api = api
        self.path = path
        self.request = request
        self.start = time.perf_counter()
        self.grant: TokenGrant | None = None
        self.status = 200
        self.watchdog = Watchdog(path, api.limits.max_request_s)
        self._finished = False

    def admit(self) -> None:
        auth = self.api.auth
        if auth is None:
            return
        token = bearer(self.request.headers.items())
        grant = auth.authorize(self.path, token)
        auth.acquire(grant)
        self.grant = grant

    async def body(self, model: type[BaseModel]) -> Any:
        cap = self.api.limits.max_message_bytes
        declared = self.request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise LimitExceeded(f"request body of {declared} bytes is over the {cap} limit")
        raw = await self.request.body()
        if len(raw) > cap:
            raise LimitExceeded(f"request body of {len(raw)} bytes is over the {cap} limit")
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            if any(err["type"] == "json_invalid" for err in e.errors()):
                raise InvalidArgument("the request body is not valid JSON", field=None) from None
            raise validation_error(e) from None

    def error(self, e: TillerError) -> JSONResponse:
        status, body = tiller_error_body(e)
        self.status = status
        if status in (401, 403):
            log.info("%s refused: %s", self.path, e.message)  # names the token's name at most
        return JSONResponse(body, status_code=status)

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.watchdog.close()
        if self.grant is not None and self.api.auth is not None:
            self.api.auth.release(self.grant)
        if self.api.metrics is not None:
            seconds = time.perf_counter() - self.start
            self.api.metrics.observe(_METRIC[self.path], str(self.status), seconds)

    def _rearm(self) -> None:
        cap = self.api.limits.max_request_s
        self.watchdog.close()
        left = None if cap is None else max(0.0, cap - (time.perf_counter() - self.start))
        self.watchdog = Watchdog(self.path, left)

    def check_priority(self, req: GenerateRequest) -> None:
        """Background priority is the learner's: it needs the admin role, as over gRPC."""
        if req.background and self.api.auth is not None and self.grant is not None:
            self.api.auth.require(self.grant, "admin", "priority background")

    def count(self, req: GenerateRequest) -> None:
        if self.api.metrics is not None:
            self.api.metrics.steering.labels(steering_kind(req)).inc()

    async def stream(self, req: GenerateRequest, encoder: responses.StreamEncoder) -> Response:
        """An SSE response. Errors before the first event are plain HTTP errors (raised here);
        after it, an ``error`` event and ``[DONE]``. A client that goes away cancels the
        engine request, as a cancelled RPC does."""
        events = self.api.service.stream(req)
        try:
            first = await self.watchdog.wait(anext(events))
        except BaseException:
            await events.aclose()
            raise
        assert isinstance(first, StreamStart)
        self.count(req)
        return StreamingResponse(self._sse(first, events, encoder), media_type="text/event-stream")

    async def _sse(
        self,
        first: StreamStart,
        events: AsyncGenerator[StreamStart | Delta | StreamEnd, None],
        encoder: responses.StreamEncoder,
    ) -> AsyncGenerator[bytes, None]:
        metrics = self.api.metrics
        tokens = 0
        self._rearm()  # this generator runs in the response's task, not the handler's
        try:
            for chunk in encoder.start(first):
                yield responses.sse(chunk)
            while True:
                try:
                    event = await self.watchdog.wait(anext(events))
                except StopAsyncIteration:
                    break
                if isinstance(event, Delta):
                    if metrics is not None and event.token_ids:
                        if not tokens:
                            metrics.first_chunk.observe(time.perf_counter() - self.start)
                        tokens += len(event.token_ids)
                    yield encoder.delta_sse(event)
                elif isinstance(event, StreamEnd):
                    yield responses.sse(encoder.end(event))
            yield _DONE
        except TillerError as e:
            status, body = tiller_error_body(e)
            self.status = status
            yield responses.sse(body)
            yield _DONE
        except BaseException:
            self.status = 499  # the client went away (nginx's convention)
            raise
        finally:
            await events.aclose()  # aborts the engine request if it is still running
            if metrics is not None and tokens:
                metrics.tokens.inc(tokens)
            self.finish()


def build_app(api: Api) -> FastAPI:
    app = FastAPI(title="Tiller", docs_url=None, redoc_url=None, openapi_url=None)

    async def generate(request: Request, path: str) -> Response:
        call = _Call(api, path, request)
        streaming = False
        try:
            call.admit()
            created = int(time.time())
            chat = path == "/v1/chat/completions"
            body: ChatBody | CompletionBody = await call.body(ChatBody if chat else CompletionBody)
            pick = api.pick(body.model, body.adapter_version)
            reqs = [body.request(pick)] if isinstance(body, ChatBody) else body.requests(pick)
            call.check_priority(reqs[0])
            want = body.logprobs if isinstance(body, ChatBody) else body.logprobs is not None
            if body.stream:
                if len(reqs) > 1:
                    raise InvalidArgument(
                        "stream takes one prompt; send a request per prompt", field="prompt"
                    )
                usage = bool(body.stream_options and body.stream_options.include_usage)
                enc = responses.StreamEncoder("chat" if chat else "text", created, want, usage)
                response = await call.stream(reqs[0], enc)
                streaming = True
                return response
            results = []
            for r in reqs:
                call.count(r)
                results.append(await call.watchdog.wait(api.service.generate(r)))
            _count_tokens(api, sum(r.completion_tokens for r in results))
            if chat:
                return JSONResponse(responses.chat(results[0], created, want))
            return JSONResponse(responses.completion(results, created, want))
        except TillerError as e:
            return call.error(e)
        finally:
            if not streaming:
                call.finish()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "/v1/chat/completions")

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        call = _Call(api, "/v1/feedback", request)
        try:
            call.admit()
            body: FeedbackBody = await call.body(FeedbackBody)
            fid, duplicate = await call.watchdog.wait(api.service.submit_feedback(body.feedback()))
            return JSONResponse({"id": fid, "object": "feedback", "duplicate": duplicate})
        except TillerError as e:
            return call.error(e)
        finally:
            call.finish()

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        call = _Call(api, "/v1/models", request)
        try:
            call.admit()
            return JSONResponse({"object": "list", "data": api.models()})
        except TillerError as e:
            return call.error(e)
        finally:
            call.finish()

    @app.get("/health")
    async def health() -> Response:
        """Liveness: the engine answers."""
        try:
            await api.service.check_health()
        except TillerError as e:
            return JSONResponse(error_body(503, e.message), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: takes new requests (not while draining)."""
        if api.service.status().draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        e = NotFound(f"no route {request.method} {request.url.path}")
        return JSONResponse(tiller_error_body(e)[1], status_code=404)

    @app.exception_handler(405)
    async def bad_method(request: Request, exc: Exception) -> Response:
        body = error_body(405, f"{request.method} is not allowed on {request.url.path}")
        return JSONResponse(body, status_code=405)

    return app


def _count_tokens(api: Api, n: int) -> None:
    if api.metrics is not None:
        api.metrics.tokens.inc(n)
