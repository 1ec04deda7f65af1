"""GenerateSession: many GenerateStream calls multiplexed over one bidirectional RPC.

Each generation runs the edge's own GenerateStream behaviour (auth, permit, priority rule,
server cap, metrics) against a context of its own; this module only multiplexes. Items that
become ready while the previous message is written, or in the same event-loop turn (one engine
step feeds every open generation at once), go out together in one ``SessionBatch``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from tiller.protos.tiller.v1 import tiller_pb2 as pb

from .formats.errors import InvalidArgument

log = logging.getLogger("tiller.session")

# The edge's GenerateStream behaviour: (parsed request, context) -> chunks.
OpenStream = Callable[[pb.GenerateRequest, Any], AsyncGenerator[pb.GenerateChunk, None]]


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GenerationContext:
    """What the edge and the servicer use of a ``ServicerContext``, for one generation.

    ``abort`` ends this generation only (the session goes on), with the status it would have
    ended a GenerateStream RPC with."""

    def __init__(self, session: grpc.aio.ServicerContext, metadata: Any) -> None:
        self._session = session
        self._metadata = metadata  # the session's, read once for all its generations
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return self._session.peer()

    def code(self) -> grpc.StatusCode | None:
        return self._code

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> NoReturn:
        self._code = code
        raise _Aborted(code, details)


def _parse(raw: bytes) -> pb.SessionRequest:
    try:
        return pb.SessionRequest.FromString(raw)
    except Exception:  # DecodeError, or bad UTF-8 in a string field
        raise InvalidArgument(
            "the request bytes are not a valid message for GenerateSession", field="request"
        ) from None


class Session:
    """One GenerateSession RPC: reads requests, runs generations, batches their items."""

    def __init__(self, open_stream: OpenStream, context: grpc.aio.ServicerContext) -> None:
        self._open_stream = open_stream
        self._context = context
        self._metadata = context.invocation_metadata()
        self._outbox = pb.SessionBatch()  # what the next message carries
        self._ready = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._cancelled: set[int] = set()

    def _put(self, tag: int, chunk: pb.GenerateChunk) -> None:
        self._outbox.items.add(tag=tag, chunk=chunk)  # the one copy of the chunk
        self._ready.set()

    def _end(self, tag: int, code: grpc.StatusCode, message: str) -> None:
        error = pb.SessionStatus(code=code.value[0], message=message)
        self._outbox.items.add(tag=tag, error=error)
        self._ready.set()

    async def run(self, requests: AsyncIterator[bytes]) -> AsyncGenerator[pb.SessionBatch, None]:
        """Batches until the client has half-closed and every generation has ended.

        Raises ``InvalidArgument`` for a request that does not parse or reuses an open tag:
        the session ends there (its open generations are cancelled and log what they made)."""
        reader = asyncio.create_task(self._read(requests))
        reader.add_done_callback(lambda _: self._ready.set())
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                if self._outbox.items:
                    batch, self._outbox = self._outbox, pb.SessionBatch()
                    yield batch
                if reader.done() and (reader.exception() is not None or not self._running):
                    if self._outbox.items:
                        continue  # what ended last still goes out
                    reader.result()
                    return
        finally:
            tasks = [reader, *self._running.values()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[bytes]) -> None:
        async for raw in requests:
            req = _parse(raw)
            tag, action = req.tag, req.WhichOneof("action")
            if action == "cancel":
                task = self._running.get(tag)
                if task is not None and tag not in self._cancelled:  # else: ended already
                    self._cancelled.add(tag)
                    task.cancel()
            elif action == "generate":
                if tag in self._running:
                    raise InvalidArgument(f"tag {tag} is already open in this session", field="tag")
                timeout = req.timeout_s if req.HasField("timeout_s") else None
                if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
                    message = f"timeout_s must be a positive number of seconds, got {timeout}"
                    self._end(tag, grpc.StatusCode.INVALID_ARGUMENT, message)
                    continue
                task = asyncio.create_task(self._generate(tag, req.generate, timeout))
                task.add_done_callback(functools.partial(self._finished, tag))
                self._running[tag] = task
            else:
                message = "a session request needs an action: generate or cancel (field action)"
                self._end(tag, grpc.StatusCode.INVALID_ARGUMENT, message)

    async def _generate(self, tag: int, request: pb.GenerateRequest, timeout: float | None) -> None:
        chunks = self._open_stream(request, GenerationContext(self._context, self._metadata))
        try:
            async with asyncio.timeout(timeout):
                async for chunk in chunks:
                    self._put(tag, chunk)
        except _Aborted as e:
            self._end(tag, e.code, e.message)
        except TimeoutError:
            message = f"generation {tag} ran past its timeout_s of {timeout}s"
            self._end(tag, grpc.StatusCode.DEADLINE_EXCEEDED, message)
        except Exception:
            log.exception("generation %d of a session failed", tag)
            self._end(tag, grpc.StatusCode.INTERNAL, f"generation {tag} failed")
        finally:
            await chunks.aclose()

    def _finished(self, tag: int, task: asyncio.Task[None]) -> None:
        """A done callback, so that a generation cancelled before it started ends too."""
        self._running.pop(tag, None)
        if tag in self._cancelled:
            self._cancelled.discard(tag)
            if task.cancelled():
                self._end(tag, grpc.StatusCode.CANCELLED, f"generation {tag} cancelled")
        self._ready.set()
