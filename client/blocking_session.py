"""Many streamed generations over one GenerateSession RPC, for the blocking ``Client``
(``Client(multiplex=True)``): the same protocol as ``session``, with threads for tasks.

gRPC consumes the request iterator in a thread of its own; one reader thread per session hands
each item to its generation's queue. Any thread may open and read streams.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeAlias

import grpc

from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

from .errors import TillerClientError, wrap
from .results import StreamChunk
from .session import Received, open_item, past_deadline, request, rpc_ended

_Item: TypeAlias = pb.SessionItem | TillerClientError


class BlockingSession:
    """One GenerateSession RPC and the generations open on it.

    Each generation yields the chunks GenerateStream would. Leaving a stream early cancels
    that generation only. When the RPC breaks, every open generation raises its error and the
    session is done (``error`` is set); the client opens a new one for the next stream.
    """

    def __init__(self, stub: pb_grpc.TillerStub, metadata: Any) -> None:
        self._outgoing: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()
        self._open: dict[int, queue.SimpleQueue[_Item]] = {}
        self._lock = threading.Lock()  # ``error`` and ``_open`` change together
        self._tags = itertools.count(1)
        self.error: TillerClientError | None = None
        self.received = Received()
        self._call = stub.GenerateSession(iter(self._outgoing.get, None), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="tiller-session", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for batch in self._call:
                self.received.deliver(batch, self._open)
            self._fail(rpc_ended())
        except grpc.RpcError as e:
            self._fail(wrap(e))
        except BaseException as e:  # no open stream may wait for an item that cannot come
            self._fail(TillerClientError(grpc.StatusCode.UNKNOWN, f"the session failed: {e!r}"))
            raise

    def _fail(self, error: TillerClientError) -> None:
        with self._lock:
            self.error = error
            inboxes = list(self._open.values())
        for inbox in inboxes:
            inbox.put(error)
        self._outgoing.put(None)  # ends gRPC's request thread, which may wait on the queue

    def stream(self, req: pb.GenerateRequest, timeout: float | None) -> Iterator[StreamChunk]:
        """``timeout``: seconds for this generation, kept by the server and here alike."""
        tag = next(self._tags)
        inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        with self._lock:
            if self.error is not None:
                raise self.error
            self._open[tag] = inbox
        deadline = None if timeout is None else time.monotonic() + timeout
        self._outgoing.put(request(tag, req, timeout))
        ended = False
        try:
            while not ended:
                item = self._next(inbox, deadline)  # interrupted here: still open, cancelled
                ended = True  # until the item turns out to be a chunk that is not the last
                chunk = open_item(item)
                ended = chunk.final
                yield chunk
        finally:
            with self._lock:
                del self._open[tag]
                broken = self.error is not None
            if not ended and not broken:
                self._outgoing.put(pb.SessionRequest(tag=tag, cancel=True))

    @staticmethod
    def _next(inbox: queue.SimpleQueue[_Item], deadline: float | None) -> _Item:
        try:
            if deadline is None:
                return inbox.get()
            wait = min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX)
            return inbox.get(timeout=wait)
        except queue.Empty:
            return past_deadline()

    def close(self) -> None:
        self._outgoing.put(None)  # half-close: the server ends the RPC ...
        self._call.cancel()  # ... or is made to, with generations still open
        self._reader.join()
