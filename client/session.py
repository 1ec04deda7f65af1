"""Many streamed generations over one GenerateSession RPC (``AsyncClient(multiplex=True)``).

``request`` and ``open_item`` are the session protocol's two halves, shared with the blocking
client's session (``blocking_session``)."""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, Protocol

import grpc

from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

from . import convert
from .errors import CODES, TillerClientError, wrap
from .results import StreamChunk

_EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # end of a stream's reads (not in the stubs)


def request(tag: int, req: pb.GenerateRequest, timeout: float | None) -> pb.SessionRequest:
    """The message that opens generation ``tag``; the server keeps ``timeout`` too."""
    msg = pb.SessionRequest(tag=tag, generate=req)
    if timeout is not None:
        msg.timeout_s = timeout
    return msg


def rpc_ended() -> TillerClientError:
    """What the open generations raise when the server ends the session's RPC without error."""
    return TillerClientError(grpc.StatusCode.UNAVAILABLE, "the session ended")


def past_deadline() -> TillerClientError:
    """What a generation raises at its deadline on the client. The server ends the generation
    at the same deadline, so this needs no word from it."""
    return TillerClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


def open_item(item: pb.SessionItem | TillerClientError) -> StreamChunk:
    """A generation's next item as GenerateStream would give it: its chunk, or its end's
    error raised."""
    if isinstance(item, TillerClientError):
        raise item
    if item.HasField("error"):
        code = CODES.get(item.error.code, grpc.StatusCode.UNKNOWN)
        raise TillerClientError(code, item.error.message)
    return convert.chunk(item.chunk)


class _Putter(Protocol):
    """A generation's queue, in either session."""

    def put(self, item: pb.SessionItem, /) -> None: ...


class Received:
    """A session's count of received messages and items."""

    def __init__(self) -> None:
        self.messages = self.items = 0

    def deliver(self, batch: pb.SessionBatch, inboxes: Mapping[int, _Putter]) -> None:
        """Hand each item of ``batch`` to its generation's inbox."""
        self.messages += 1
        self.items += len(batch.items)
        for item in batch.items:
            inbox = inboxes.get(item.tag)
            if inbox is not None:  # else: a generation the client already left
                inbox.put(item)


class _Inbox:
    """One generation's items, in order; one reader. Lighter than ``asyncio.Queue``: a
    deque and, while the reader waits, one future."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[pb.SessionItem | TillerClientError] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: pb.SessionItem | TillerClientError) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> pb.SessionItem | TillerClientError:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class Session:
    """One GenerateSession RPC and the generations open on it.

    Each generation yields the chunks GenerateStream would; chunks that several generations
    have ready at once share one message. Leaving a stream early cancels that generation only.
    When the RPC breaks, every open generation raises its error and the session is done
    (``error`` is set); the client opens a new one for the next stream.
    """

    def __init__(self, stub: pb_grpc.TillerStub, metadata: Any) -> None:
        self._outgoing: asyncio.Queue[pb.SessionRequest | None] = asyncio.Queue()
        self._open: dict[int, _Inbox] = {}
        self._tags = itertools.count(1)
        self.error: TillerClientError | None = None
        self.received = Received()
        self._call = stub.GenerateSession(self._requests(), metadata=metadata)
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[pb.SessionRequest]:
        while (r := await self._outgoing.get()) is not None:
            yield r

    async def _read(self) -> None:
        try:
            while (batch := await self._call.read()) is not _EOF:
                self.received.deliver(batch, self._open)
            self._fail(rpc_ended())
        except grpc.RpcError as e:
            self._fail(wrap(e))
        except asyncio.CancelledError:
            self._fail(TillerClientError(grpc.StatusCode.CANCELLED, "the client closed"))
            raise

    def _fail(self, error: TillerClientError) -> None:
        self.error = error
        for inbox in self._open.values():
            inbox.put(error)

    async def stream(
        self, req: pb.GenerateRequest, timeout: float | None
    ) -> AsyncGenerator[StreamChunk, None]:
        """``timeout``: seconds for this generation, kept by the server and here alike."""
        if self.error is not None:
            raise self.error
        tag = next(self._tags)
        inbox = _Inbox()
        self._open[tag] = inbox
        timer = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(timeout, inbox.put, past_deadline())
        self._outgoing.put_nowait(request(tag, req, timeout))
        ended = False
        try:
            while not ended:
                item = await inbox.get()
                ended = True  # until the item turns out to be a chunk that is not the last
                chunk = open_item(item)
                ended = chunk.final
                yield chunk
        finally:
            if timer is not None:
                timer.cancel()
            del self._open[tag]
            if not ended and self.error is None:
                self._outgoing.put_nowait(pb.SessionRequest(tag=tag, cancel=True))

    async def close(self) -> None:
        self._outgoing.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
