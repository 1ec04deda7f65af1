"""``Client`` (blocking) and ``AsyncClient`` (asyncio) for the Tiller gRPC API.

Both retry UNAVAILABLE (only) with exponential backoff, attach an optional bearer token, apply a
per-call timeout, and close their channel when used as context managers. Errors raise
``TillerClientError`` carrying the gRPC status code and the server's message.

Example (needs a running server)::

    from tiller.client import Client
    with Client("127.0.0.1:50051", timeout=30) as c:
        g = c.generate("Write a haiku", feedback="Harmless and very helpful", max_tokens=32)
        print(g.text, g.adapter, g.seed)
        for piece in c.stream("Count to five", max_tokens=16):
            print(piece.text, end="")
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

from . import convert
from .blocking_session import BlockingSession
from .errors import wrap as _wrap
from .results import AdapterInfo, FeedbackReceipt, Generation, ServerStatus, StreamChunk
from .session import Session

_EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # end of a stream's reads (not in the stubs)

T = TypeVar("T")
Prompt = str | Sequence[Mapping[str, str]]

# The server address when none is given (tiller serve's default port on this host).
DEFAULT_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True)
class ClientTls:
    """TLS for the channel. ``ca``: PEM roots to trust (None: the system's); ``cert`` + ``key``:
    a client certificate for servers that require one (mTLS); ``server_name``: the name to
    check in the server's certificate when it differs from the target's host."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
    ) -> ClientTls:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return cls(read(ca), read(cert), read(key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


@dataclass(frozen=True)
class RetryPolicy:
    """Retry UNAVAILABLE up to ``attempts`` times, sleeping base * 2^k (+ jitter), capped."""

    attempts: int = 4
    base_s: float = 0.2
    max_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.base_s * (2**attempt)) * (0.5 + random.random() / 2)


def _feedback_request(
    generation_id: str,
    *,
    score: float | None,
    tag: str,
    critique: str,
    refinement: str,
    preferred_over: str | None,
    idempotency_key: str,
    source: str,
) -> pb.SubmitFeedbackRequest:
    req = pb.SubmitFeedbackRequest(
        generation_id=generation_id,
        tag=tag,
        critique=critique,
        refinement=refinement,
        idempotency_key=idempotency_key,
        source=source,
    )
    if score is not None:
        req.score = score
    if preferred_over:
        req.preference.chosen_generation_id = generation_id
        req.preference.rejected_generation_id = preferred_over
    return req


class _Base:
    def __init__(
        self, target: str, *, timeout: float | None, token: str | None, retry: RetryPolicy | None
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )

    def _limit(self, timeout: float | None) -> float | None:
        """A call's own timeout, else the client's."""
        return timeout if timeout is not None else self.timeout

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self._limit(timeout), "metadata": self._metadata}


class Client(_Base):
    """Blocking client. Thread-safe (one channel shared by all calls).

    ``multiplex=True``: ``stream`` calls, from any thread, share one GenerateSession RPC
    instead of one GenerateStream RPC each (see ``AsyncClient``).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls: ClientTls | None = None,
        multiplex: bool = False,
    ) -> None:
        super().__init__(target, timeout=timeout, token=token, retry=retry)
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=list(options))
        else:
            opts = [*options, *tls.options()]
            self._channel = grpc.secure_channel(target, tls.credentials(), options=opts)
        self._stub = pb_grpc.TillerStub(self._channel)
        self.multiplex = multiplex
        self._session: BlockingSession | None = None
        self._session_lock = threading.Lock()

    @property
    def session(self) -> BlockingSession | None:
        """The GenerateSession that ``stream`` uses now (``multiplex``), if one is open."""
        return self._session

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._session_lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()
        self._channel.close()

    def _call(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.retry.attempts + 1):
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retry.attempts:
                    raise _wrap(e) from None
                time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    def generate(self, prompt: Prompt, *, timeout: float | None = None, **kw: Any) -> Generation:
        """Generate for ``prompt`` (text or chat messages). Keyword arguments as in
        ``convert.build_request``: feedback, feedback_mix, attributes, adapter, max_tokens, ..."""
        req = convert.build_request(prompt, **kw)
        return convert.generation(self._call(lambda: self._stub.Generate(req, **self._kw(timeout))))

    def stream(
        self, prompt: Prompt, *, timeout: float | None = None, **kw: Any
    ) -> Iterator[StreamChunk]:
        """Yield chunks as tokens are produced. Closing the iterator cancels the request."""
        req = convert.build_request(prompt, **kw)
        if self.multiplex:
            return self._stream_session(req, self._limit(timeout))
        return self._stream_rpc(req, timeout)

    def _stream_session(
        self, req: pb.GenerateRequest, timeout: float | None
    ) -> Iterator[StreamChunk]:
        """Picks the session at the first ``next``, as the RPC path starts its call then."""
        with self._session_lock:
            if self._session is None or self._session.error is not None:
                self._session = BlockingSession(self._stub, self._metadata)
            session = self._session
        yield from session.stream(req, timeout)

    def _stream_rpc(self, req: pb.GenerateRequest, timeout: float | None) -> Iterator[StreamChunk]:
        call = self._call(lambda: self._stub.GenerateStream(req, **self._kw(timeout)))
        try:
            for c in call:
                yield convert.chunk(c)
        except grpc.RpcError as e:
            raise _wrap(e) from None
        finally:
            call.cancel()

    def submit_feedback(
        self,
        generation_id: str,
        *,
        score: float | None = None,
        tag: str = "",
        critique: str = "",
        refinement: str = "",
        preferred_over: str | None = None,
        idempotency_key: str = "",
        source: str = "",
        timeout: float | None = None,
    ) -> FeedbackReceipt:
        """Record feedback on a generation (or a preference between two); durable on return."""
        req = _feedback_request(
            generation_id,
            score=score,
            tag=tag,
            critique=critique,
            refinement=refinement,
            preferred_over=preferred_over,
            idempotency_key=idempotency_key,
            source=source,
        )
        resp = self._call(lambda: self._stub.SubmitFeedback(req, **self._kw(timeout)))
        return FeedbackReceipt(resp.feedback_id, resp.duplicate)

    def adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        resp = self._call(
            lambda: self._stub.ListAdapters(pb.ListAdaptersRequest(), **self._kw(timeout))
        )
        return convert.adapters(resp)

    def status(self, *, timeout: float | None = None) -> ServerStatus:
        resp = self._call(
            lambda: self._stub.GetServerStatus(pb.GetServerStatusRequest(), **self._kw(timeout))
        )
        return convert.status(resp)


class AsyncClient(_Base):
    """asyncio client; create and use it inside one event loop.

    ``multiplex=True``: ``stream`` calls share one GenerateSession RPC instead of one
    GenerateStream RPC each, for clients with many streams open at once (less CPU per token on
    both sides). Each stream keeps its own timeout, cancellation and errors.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls: ClientTls | None = None,
        multiplex: bool = False,
    ) -> None:
        super().__init__(target, timeout=timeout, token=token, retry=retry)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=list(options))
        else:
            opts = [*options, *tls.options()]
            self._channel = grpc.aio.secure_channel(target, tls.credentials(), options=opts)
        self._stub = pb_grpc.TillerStub(self._channel)
        self.multiplex = multiplex
        self._session: Session | None = None

    @property
    def session(self) -> Session | None:
        """The GenerateSession that ``stream`` uses now (``multiplex``), if one is open."""
        return self._session

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._channel.close(grace=None)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        for attempt in range(self.retry.attempts + 1):
            try:
                return await fn()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retry.attempts:
                    raise _wrap(e) from None
                await asyncio.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    async def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **kw: Any
    ) -> Generation:
        req = convert.build_request(prompt, **kw)
        resp = await self._call(lambda: self._stub.Generate(req, **self._kw(timeout)))
        return convert.generation(resp)

    def stream(
        self, prompt: Prompt, *, timeout: float | None = None, **kw: Any
    ) -> AsyncIterator[StreamChunk]:
        """Async-iterate chunks; leaving the loop early cancels the request on the server.

        With ``multiplex``, every stream of this client shares one GenerateSession RPC: the
        chunks that several streams have ready at once travel in one message.
        """
        req = convert.build_request(prompt, **kw)
        limit = self._limit(timeout)
        if not self.multiplex:
            return self._stream_rpc(req, limit)
        if self._session is None or self._session.error is not None:
            self._session = Session(self._stub, self._metadata)
        return self._session.stream(req, limit)

    async def _stream_rpc(
        self, req: pb.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[StreamChunk]:
        call = self._stub.GenerateStream(req, timeout=timeout, metadata=self._metadata)
        try:
            # read() directly: ``async for`` over the call adds grpc's own generator per message
            while (c := await call.read()) is not _EOF:
                yield convert.chunk(c)
        except grpc.RpcError as e:
            raise _wrap(e) from None
        finally:
            call.cancel()

    async def submit_feedback(
        self,
        generation_id: str,
        *,
        score: float | None = None,
        tag: str = "",
        critique: str = "",
        refinement: str = "",
        preferred_over: str | None = None,
        idempotency_key: str = "",
        source: str = "",
        timeout: float | None = None,
    ) -> FeedbackReceipt:
        req = _feedback_request(
            generation_id,
            score=score,
            tag=tag,
            critique=critique,
            refinement=refinement,
            preferred_over=preferred_over,
            idempotency_key=idempotency_key,
            source=source,
        )
        resp = await self._call(lambda: self._stub.SubmitFeedback(req, **self._kw(timeout)))
        return FeedbackReceipt(resp.feedback_id, resp.duplicate)

    async def adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        resp = await self._call(
            lambda: self._stub.ListAdapters(pb.ListAdaptersRequest(), **self._kw(timeout))
        )
        return convert.adapters(resp)

    async def status(self, *, timeout: float | None = None) -> ServerStatus:
        resp = await self._call(
            lambda: self._stub.GetServerStatus(pb.GetServerStatusRequest(), **self._kw(timeout))
        )
        return convert.status(resp)

    async def load_adapter(
        self,
        name: str,
        path: str | None = None,
        *,
        registry_version: int | None = None,
        registry_name: str | None = None,
        timeout: float | None = None,
    ) -> list[AdapterInfo]:
        """Admin: load a version as adapter ``name``; it becomes routable as
        ``name@v<manifest version>``. Returns the adapter listing.

        Give exactly one source: ``registry_version`` (version ``registry_version`` of
        ``registry_name``, default ``name``, in the server's own ``--registry``; every file is
        checked against the manifest's sha256), or ``path``, a version directory on the server
        that lies inside one of its ``--adapter-root`` directories. ``ValueError`` for neither
        or both.
        """
        if (path is None) == (registry_version is None):
            raise ValueError("load_adapter needs exactly one of path and registry_version")
        if registry_name is not None and registry_version is None:
            raise ValueError("load_adapter: registry_name needs registry_version")
        admin = pb_grpc.TillerAdminStub(self._channel)
        if registry_version is not None:
            ref = pb.RegistryRef(name=registry_name or name, version=registry_version)
            req = pb.LoadAdapterRequest(name=name, registry=ref)
        else:
            req = pb.LoadAdapterRequest(name=name, path=path)
        await self._call(lambda: admin.LoadAdapter(req, **self._kw(timeout)))
        return await self.adapters(timeout=timeout)

    async def activate_adapter(
        self, name: str, version: int, *, timeout: float | None = None
    ) -> list[AdapterInfo]:
        """Admin: route new requests for ``name`` to the loaded ``version``; versions beyond
        the active and the previous one are removed once drained."""
        admin = pb_grpc.TillerAdminStub(self._channel)
        req = pb.ActivateAdapterRequest(name=name, version=version)
        await self._call(lambda: admin.ActivateAdapter(req, **self._kw(timeout)))
        return await self.adapters(timeout=timeout)
