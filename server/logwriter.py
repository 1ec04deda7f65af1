"""Off-request-path writer for the generation log: a bounded queue drained in batched commits.

``submit(op)`` queues a function of the database and returns a future for its result. The writer
runs queued ops in one transaction per batch on a worker thread, then resolves their futures.
A generation id is durable once its op's future resolved True (the servicer awaits it before
the response completes). When the queue is full, or the disk is full / the DB stays locked, the
op is lost: the future resolves to a ``LogLoss`` error, the ``lost`` counter rises and an error is
logged — serving carries on.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from .config import LogConfig
from .formats.errors import TillerError
from .formats.logstore import connect, transaction

log = logging.getLogger("tiller.log")
Op = Callable[[sqlite_utils.Database], Any]


class LogLoss(Exception):
    """The op was not written (queue full, disk full, DB locked, writer closed)."""


@dataclass
class LogStats:
    written: int = 0
    lost: int = 0
    batches: int = 0


class LogWriter:
    """Use from one event loop. ``start`` opens the DB; ``close`` flushes everything queued."""

    def __init__(self, config: LogConfig) -> None:
        self.config = config
        self.stats = LogStats()
        self._queue: asyncio.Queue[tuple[Op, asyncio.Future[Any]] | None] = asyncio.Queue(
            maxsize=config.max_queue
        )
        self._db: sqlite_utils.Database | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def start(self) -> None:
        self._db = await asyncio.to_thread(
            connect, self.config.path, synchronous=self.config.synchronous
        )
        self._task = asyncio.create_task(self._run(), name="tiller-log-writer")

    def submit(self, op: Op) -> asyncio.Future[Any]:
        """Queue ``op``; never blocks. The future raises ``LogLoss`` if it could not be written."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closed:
            self._lose([fut], "the log writer is closed")
            return fut
        try:
            self._queue.put_nowait((op, fut))
        except asyncio.QueueFull:
            self._lose([fut], f"log queue full ({self.config.max_queue})")
        return fut

    def _lose(self, futs: list[asyncio.Future[Any]], why: str) -> None:
        self.stats.lost += len(futs)
        log.error(
            "generation log LOST %d write(s): %s (lost so far: %d)", len(futs), why, self.stats.lost
        )
        for f in futs:
            if not f.done():
                f.set_exception(LogLoss(why))
                f.exception()  # mark retrieved: a fire-and-forget loss is already logged

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.config.max_batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    await self._flush(batch)
                    return
                batch.append(nxt)
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[Op, asyncio.Future[Any]]]) -> None:
        try:
            results = await asyncio.to_thread(self._write, [op for op, _ in batch])
        except sqlite3.Error as e:
            if len(batch) > 1:  # isolate: one bad op must not lose its neighbours
                for one in batch:
                    await self._flush([one])
                return
            self._lose([f for _, f in batch], f"{type(e).__name__}: {e}")
            return
        self.stats.batches += 1
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                self.stats.written += 1
                fut.set_result(result)

    def _write(self, ops: list[Op]) -> list[Any]:
        db = self._db
        assert db is not None
        results: list[Any] = []
        with transaction(db):
            for op in ops:
                try:
                    results.append(op(db))
                except TillerError as e:  # the request's fault, not the batch's
                    results.append(e)
        return results

    async def close(self) -> None:
        """Write everything queued, then close the DB."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            await self._queue.put(None)
            await self._task
        if self._db is not None:
            self._db.conn.close()
