"""Drive providers over the generation log: batch, annotate, commit with the cursor, repeat.

A provider that raises ``ProviderUnavailable`` keeps its cursor: its backlog waits and is
retried after ``retry_delay_s``; other providers carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlite_utils

from .base import Provider, ProviderUnavailable
from .follow import backlog, commit, next_batch, read_cursor

log = logging.getLogger("tiller.annotate")


@dataclass
class ProviderState:
    provider: Provider
    processed: int = 0
    inserted: int = 0
    failures: int = 0
    blocked_until: float = 0.0
    last_error: str = ""


@dataclass
class Annotator:
    db: sqlite_utils.Database
    providers: Sequence[Provider]
    batch_size: int = 32
    retry_delay_s: float = 5.0
    states: dict[str, ProviderState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"provider names must be unique, got {names}")
        self.states = {p.name: ProviderState(p) for p in self.providers}

    def backlogs(self) -> dict[str, int]:
        return {name: backlog(self.db, name) for name in self.states}

    async def step(self, state: ProviderState) -> int:
        """One batch for one provider; returns how many generations it covered (0 = idle)."""
        if time.monotonic() < state.blocked_until:
            return 0
        p = state.provider
        batch = next_batch(self.db, read_cursor(self.db, p.name), self.batch_size)
        if not batch:
            return 0
        try:
            notes = await p.annotate(batch)
        except ProviderUnavailable as e:
            state.failures += 1
            state.last_error = str(e)
            state.blocked_until = time.monotonic() + self.retry_delay_s
            log.warning(
                "provider %s unavailable (%s); %d generations wait",
                p.name,
                e,
                backlog(self.db, p.name),
            )
            return 0
        state.inserted += commit(self.db, p.name, batch, notes)
        state.processed += len(batch)
        return len(batch)

    async def drain(self, *, until_idle: bool = True) -> None:
        """Process batches round-robin until no provider has work it can do now."""
        while True:
            done = await asyncio.gather(*(self.step(s) for s in self.states.values()))
            if not any(done) and until_idle:
                return

    async def run(
        self, stop: asyncio.Event, poll_interval_s: float = 1.0, on_progress: object = None
    ) -> None:
        """Follow the log until ``stop`` is set."""
        while not stop.is_set():
            await self.drain()
            if callable(on_progress):
                on_progress(self)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_interval_s)
