"""Drive providers over the generation log: batch, annotate, commit with the cursor, repeat.

A provider that raises ``ProviderUnavailable`` keeps its cursor: its backlog waits and is
retried after ``retry_delay_s``, doubled after each failure in a row up to 16 times that and
at most ``max_retry_delay_s`` (unless ``retry_delay_s`` is longer); other providers carry on.
Any other exception out of a provider or the commit (a bug, a locked database) is logged with
its traceback and handled the same way: no exception leaves ``step``, so one provider cannot
stop the annotator.
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
    in_a_row: int = 0  # failures since the last successful batch: sets the backoff
    blocked_until: float = 0.0
    last_error: str = ""


@dataclass
class Annotator:
    db: sqlite_utils.Database
    providers: Sequence[Provider]
    batch_size: int = 32
    retry_delay_s: float = 5.0
    max_retry_delay_s: float = 60.0
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
        try:
            batch = next_batch(self.db, read_cursor(self.db, p.name), self.batch_size)
            if not batch:
                return 0
            notes = await p.annotate(batch)
            inserted = commit(self.db, p.name, batch, notes)
        except ProviderUnavailable as e:
            self._wait(state, str(e))
            return 0
        except Exception as e:  # never out of the annotator: the batch waits, nothing is lost
            log.exception("provider %s failed on a batch", p.name)
            self._wait(state, f"{type(e).__name__}: {e}")
            return 0
        state.in_a_row = 0
        state.inserted += inserted
        state.processed += len(batch)
        return len(batch)

    def _wait(self, state: ProviderState, error: str) -> None:
        """Keep ``state``'s batch for later: block the provider with exponential backoff."""
        state.failures += 1
        state.in_a_row += 1
        state.last_error = error
        base = self.retry_delay_s
        cap = max(base, min(16 * base, self.max_retry_delay_s))
        delay = min(base * 2 ** min(state.in_a_row - 1, 16), cap)
        state.blocked_until = time.monotonic() + max(delay, 0.0)
        try:
            waiting: object = backlog(self.db, state.provider.name)
        except Exception:  # the log itself may be what failed
            waiting = "?"
        log.warning(
            "provider %s unavailable (%s); %s generations wait, retry in %.1fs",
            state.provider.name,
            error[:300],
            waiting,
            delay,
        )

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
