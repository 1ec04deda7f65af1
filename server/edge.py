"""The RPC edge: one grpc.aio interceptor in front of every Tiller RPC.

In order, per RPC: authenticate the bearer token and check the method's role (``auth``), parse
the request bytes (a message that does not parse is INVALID_ARGUMENT, not UNKNOWN), take one of
the token's concurrency permits (RESOURCE_EXHAUSTED when none is left), run the servicer under
the server's cap on request duration (DEADLINE_EXCEEDED past it), and record the outcome in the
metrics. A GenerateSession is authenticated once; each of its generations then passes the
GenerateStream path above (``session``). Failures are ``TillerError``s mapped by
``errors.grpc_status``, like the servicer's. Health checks and reflection pass through
untouched. Used from the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .auth import Authenticator, bearer
from .config import TokenGrant
from .deadline import Watchdog
from .errors import (
    InvalidArgument,
    PermissionDenied,
    TillerError,
    Unauthenticated,
    grpc_status,
)
from .metrics import Metrics, completion_tokens, steering_kind
from .session import OpenStream, Session

log = logging.getLogger("tiller.edge")
_GUARDED_PREFIX = "/tiller.v1."
_GENERATE_STREAM = "/tiller.v1.Tiller/GenerateStream"
_GENERATE = ("/tiller.v1.Tiller/Generate", _GENERATE_STREAM)
_SESSION = "/tiller.v1.Tiller/GenerateSession"
PRIORITY_BACKGROUND = 2  # tiller.v1.Priority.PRIORITY_BACKGROUND (a test keeps them equal)

Decode = Callable[[bytes], Any]


class _Rpc:
    """One RPC passing the edge: its admission, its permit and its outcome."""

    def __init__(self, edge: Edge, method: str, context: grpc.aio.ServicerContext) -> None:
        self.edge = edge
        self.method = method
        self.context = context
        self.start = time.perf_counter()
        self.grant: TokenGrant | None = None
        self.code = "OK"
        self._observed = False

    def admit(self, token: str | None, raw: bytes, decode: Decode) -> Any:
        """Authorize, parse, take a permit. Raises ``TillerError``."""
        auth = self.edge.auth
        if auth is not None:
            grant = auth.authorize(self.method, token)
        try:
            request = decode(raw)
        except Exception:  # DecodeError, or bad UTF-8 in a string field
            name = self.method.rsplit("/", 1)[-1]
            raise InvalidArgument(
                f"the request bytes are not a valid message for {name}", field="request"
            ) from None
        if auth is not None:
            if self.method in _GENERATE and getattr(request, "priority", 0) == PRIORITY_BACKGROUND:
                auth.require(grant, "admin", "priority BACKGROUND")
            auth.acquire(grant)
            self.grant = grant
        if self.edge.metrics is not None and self.method in _GENERATE:
            self.edge.metrics.steering.labels(steering_kind(request)).inc()
        return request

    def deadline(self) -> float | None:
        cap = self.edge.max_request_s
        return None if cap is None else asyncio.get_running_loop().time() + cap

    async def fail(self, error: TillerError) -> None:
        code = grpc_status(error)
        self.code = code.name
        if isinstance(error, (Unauthenticated, PermissionDenied)):
            # The message names the token's name at most, never its value.
            log.info(
                "%s refused for %s: %s",
                self.method,
                self.context.peer(),
                error.message,
                extra={"method": self.method, "code": code.name},
            )
        # grpc sends the status inside abort(), before it raises: count the RPC first, so a
        # client that has its error also finds it in the metrics.
        self._observe()
        await self.context.abort(code, error.message)

    def failed(self, error: BaseException) -> None:
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            self.code = "CANCELLED"
        else:
            code = self.context.code()
            self.code = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"

    @contextlib.asynccontextmanager
    async def outcome(self) -> AsyncIterator[None]:
        """Around the RPC's work: a ``TillerError`` becomes its status; any other exception
        (a cancel included) is recorded; the permit and the metrics are settled at the end."""
        try:
            try:
                yield
            except TillerError as e:
                await self.fail(e)
        except BaseException as e:
            if self.code == "OK":
                self.failed(e)
            raise
        finally:
            self.finish()

    def _observe(self) -> float:
        """Record the RPC's code and duration in the metrics, once; returns the duration."""
        seconds = time.perf_counter() - self.start
        if not self._observed and self.edge.metrics is not None:
            self.edge.metrics.observe(self.method, self.code, seconds)
        self._observed = True
        return seconds

    def finish(self) -> None:
        if self.grant is not None and self.edge.auth is not None:
            self.edge.auth.release(self.grant)
        seconds = self._observe()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s in %.3fs",
                self.method,
                self.code,
                seconds,
                extra={
                    "method": self.method,
                    "code": self.code,
                    "seconds": round(seconds, 6),
                    "token_name": self.grant.name if self.grant else None,
                },
            )


class Edge(grpc.aio.ServerInterceptor):
    """Interceptor for ``grpc.aio.server(interceptors=[...])``.

    ``auth=None``: no authentication (every caller may call every served RPC).
    ``max_request_s=None``: no server-side cap (the client's deadline still applies).
    """

    def __init__(
        self,
        auth: Authenticator | None,
        max_request_s: float | None,
        metrics: Metrics | None,
    ) -> None:
        self.auth = auth
        self.max_request_s = max_request_s
        self.metrics = metrics
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # wrapped once per method
        self._open_stream: OpenStream | None = None

    def serve_sessions(self, generate_stream: Callable[..., Any]) -> None:
        """Serve GenerateSession: each generation runs ``generate_stream`` (the servicer's
        GenerateStream) through this edge's GenerateStream path."""
        self._open_stream = self._stream(_GENERATE_STREAM, _parsed, generate_stream)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        if handler is None or not method.startswith(_GUARDED_PREFIX):
            return handler
        if method == _SESSION:
            if self._open_stream is None:
                return handler  # no sessions here: UNIMPLEMENTED
            wrapped = grpc.stream_stream_rpc_method_handler(
                self._session(method, self._open_stream),
                response_serializer=handler.response_serializer,
            )
            self._handlers[method] = wrapped
            return wrapped
        decode = handler.request_deserializer or (lambda raw: raw)
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._unary(method, decode, handler.unary_unary),
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._stream(method, decode, handler.unary_stream),
                response_serializer=handler.response_serializer,
            )
        else:
            return handler  # client-streaming RPCs: none in the Tiller API
        self._handlers[method] = wrapped
        return wrapped

    def _unary(
        self, method: str, decode: Decode, inner: Callable[..., Any]
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def behavior(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            rpc = _Rpc(self, method, context)
            watchdog = Watchdog(method, self.max_request_s)
            try:
                async with rpc.outcome():  # a failure raises here
                    request = rpc.admit(_token(context), raw, decode)
                    response = await watchdog.wait(inner(request, context))
                    if self.metrics is not None:
                        self.metrics.tokens.inc(completion_tokens(response))
            finally:
                watchdog.close()
            return response

        return behavior

    def _stream(
        self, method: str, decode: Decode, inner: Callable[..., Any]
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncGenerator[Any, None]]:
        async def behavior(
            raw: Any, context: grpc.aio.ServicerContext
        ) -> AsyncGenerator[Any, None]:
            rpc = _Rpc(self, method, context)
            watchdog = Watchdog(method, self.max_request_s)
            metrics = self.metrics
            tokens = 0
            try:
                async with rpc.outcome():
                    request = rpc.admit(_token(context), raw, decode)
                    chunks = inner(request, context)
                    # The watchdog may cancel the task only while it waits on ``chunks``, not
                    # while the transport writes a yielded chunk.
                    try:
                        watchdog.resume()
                        async for chunk in chunks:
                            watchdog.pause()
                            if metrics is not None:
                                n = completion_tokens(chunk)
                                if n and not tokens:
                                    metrics.first_chunk.observe(time.perf_counter() - rpc.start)
                                tokens += n
                            yield chunk
                            watchdog.resume()
                    except asyncio.CancelledError:
                        watchdog.cancelled()
                        raise
                    finally:
                        watchdog.pause()
                        await chunks.aclose()
            finally:
                watchdog.close()
                if metrics is not None and tokens:
                    metrics.tokens.inc(tokens)

        return behavior

    def _session(
        self, method: str, open_stream: OpenStream
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[Any]]:
        """The session is authorized as a whole; permits, limits and metrics are per generation."""

        async def behavior(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            rpc = _Rpc(self, method, context)
            async with rpc.outcome():
                if self.auth is not None:
                    try:
                        self.auth.authorize(method, _token(context))
                    except TillerError:
                        await _first_request(requests)
                        raise
                session = Session(open_stream, context).run(requests)
                async with contextlib.aclosing(session) as batches:
                    async for batch in batches:
                        yield batch

        return behavior


async def _first_request(requests: AsyncIterator[bytes], wait_s: float = 1.0) -> None:
    """Wait (briefly) for a refused session's first request before ending it: a gRPC client
    still writing when a bidirectional call ends can read INTERNAL ("Internal error from
    Core") instead of the call's status."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(wait_s):
            await anext(requests, None)


def _parsed(request: Any) -> Any:
    return request  # a session's generations arrive parsed inside their SessionRequest


def _token(context: grpc.aio.ServicerContext) -> str | None:
    return bearer(context.invocation_metadata())
