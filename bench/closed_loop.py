"""Closed-loop Generate streams in a thread of their own: the serving load the alignment
benchmarks run beside their work (``align_vs_trl``, ``chaos``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any, Self


class ClosedLoop:
    """``streams`` closed-loop Generate calls against ``target`` (prompt ``i`` with seed ``i``,
    plus ``generate_kw``) until ``stop()``. ``done`` holds (finish time, completion tokens) and
    ``requests`` (start, finish, completion tokens) per finished call, wall clock; ``failures``
    the error of each failed one (after which a stream waits 1 s: a server going away at the
    end is counted, not fatal)."""

    def __init__(
        self, target: str, prompts: Sequence[str], streams: int, **generate_kw: Any
    ) -> None:
        self.target = target
        self.prompts = list(prompts)
        self.streams = streams
        self.generate_kw = generate_kw
        self.done: list[tuple[float, int]] = []
        self.requests: list[tuple[float, float, int]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=300)

    async def _run(self) -> None:
        from tiller.client import AsyncClient

        async with AsyncClient(self.target, timeout=300) as client:

            async def stream(k: int) -> None:
                i = k
                while not self._stop.is_set():
                    prompt = self.prompts[i % len(self.prompts)]
                    began = time.time()
                    try:
                        g = await client.generate(prompt, seed=i, **self.generate_kw)
                        ended = time.time()
                        self.done.append((ended, g.completion_tokens))
                        self.requests.append((began, ended, g.completion_tokens))
                    except Exception as e:
                        self.failures.append(f"{type(e).__name__}: {e}")
                        await asyncio.sleep(1.0)
                    i += self.streams

            await asyncio.gather(*(stream(k) for k in range(self.streams)))
