"""The server's cap on one request's duration, shared by the gRPC and HTTP edges."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from .formats.errors import DeadlineExceeded

T = TypeVar("T")


class Watchdog:
    """The cap on one request's duration, with one timer per request.

    At the deadline, if the request is waiting on the service (``wait``), its task is cancelled
    there, so the service's cleanup runs (the engine request is aborted) and ``wait`` raises
    ``DeadlineExceeded``; if it is elsewhere (the transport writing), the next ``wait`` raises.
    """

    def __init__(self, method: str, cap: float | None) -> None:
        self.method = method
        self.cap = cap
        self.expired = self.fired = self.waiting = False
        self.handle: asyncio.TimerHandle | None = None
        if cap is not None:
            self.task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            self.handle = loop.call_at(loop.time() + cap, self._fire)

    def _fire(self) -> None:
        self.expired = True
        if self.waiting and self.task is not None:
            self.fired = True
            self.task.cancel()

    def _error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"{self.method} ran past the server's request time cap of {self.cap}s"
        )

    async def wait(self, awaitable: Awaitable[T]) -> T:
        self.resume()
        try:
            return await awaitable
        except asyncio.CancelledError:
            self.cancelled()
            raise
        finally:
            self.pause()

    def pause(self) -> None:
        """The task leaves the service (to write, to finish): the deadline no longer cancels
        it, and the next ``resume`` raises instead."""
        self.waiting = False

    def resume(self) -> None:
        """The task waits on the service again (the deadline may cancel it there); raises
        ``DeadlineExceeded`` if the cap has passed meanwhile."""
        if self.expired:
            raise self._error()
        self.waiting = True

    def cancelled(self) -> None:
        """Call on a ``CancelledError`` raised while waiting: ``DeadlineExceeded`` if the
        cancel was the deadline's own (nothing else cancelled the task)."""
        if self.fired and self.task is not None and self.task.uncancel() == 0:
            raise self._error() from None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
