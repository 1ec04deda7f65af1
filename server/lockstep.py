"""Merge the sibling engine streams of a feedback-mix request into one verified stream.

Siblings must produce identical tokens (the mixing processor writes identical rows). Output is
released only when every sibling has produced it and all agree; a finish is released only when
every sibling finished at the same length. Any disagreement means lockstep was lost (preemption,
eviction, a sibling behind): every sibling is aborted and ``LockstepLost`` is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Sequence

from .engine import Engine
from .formats.errors import Aborted
from .values import Delta, EngineRequest, Finish


class LockstepLost(Aborted):
    """The siblings of a feedback-mix request diverged; the partial mixture is discarded."""


async def mixed_deltas(
    engine: Engine, siblings: Sequence[EngineRequest]
) -> AsyncIterator[list[Delta]]:
    """Yield lists of verified deltas (completion index 0) for a mixed request."""
    streams = await engine.generate_group(siblings)
    tokens: list[list[int]] = [[] for _ in siblings]
    finish: list[Finish] = [Finish.NONE for _ in siblings]
    pending: deque[Delta] = deque()  # sibling 0's deltas not released yet
    released = 0
    waiting: dict[asyncio.Future[Sequence[Delta]], int] = {}

    def pull(i: int) -> None:
        waiting[asyncio.ensure_future(anext(streams[i]))] = i

    for i in range(len(siblings)):
        pull(i)
    ok = False
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = waiting.pop(fut)
                try:
                    deltas = fut.result()
                except StopAsyncIteration:
                    continue
                for d in deltas:
                    tokens[i].extend(d.token_ids)
                    if d.finish is not Finish.NONE:
                        finish[i] = d.finish
                    if i == 0:
                        pending.append(d)
                pull(i)
            common = min(len(t) for t in tokens)
            head = tokens[0][:common]
            for i, t in enumerate(tokens[1:], start=1):
                if t[:common] != head:
                    raise LockstepLost(
                        f"feedback_mix lost lockstep at token {_first_diff(t, tokens[0])}: "
                        f"condition {i} diverged (a sibling was preempted or evicted); "
                        "nothing wrong was returned — retry, or lower the load"
                    )
            all_done = all(f is not Finish.NONE for f in finish)
            if all_done and (len({len(t) for t in tokens}) != 1 or len(set(finish)) != 1):
                raise LockstepLost(
                    "feedback_mix conditions finished differently; the mixture is discarded"
                )
            out: list[Delta] = []
            while pending and released + len(pending[0].token_ids) <= common:
                if pending[0].finish is not Finish.NONE and not all_done:
                    break
                d = pending.popleft()
                released += len(d.token_ids)
                out.append(d)
            if out:
                yield out
        ok = True
    finally:
        for fut in waiting:
            fut.cancel()
        if not ok:
            for r in siblings:
                with contextlib.suppress(Exception):
                    await engine.abort(r.request_id)
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()  # type: ignore[attr-defined]


def _first_diff(a: list[int], b: list[int]) -> int:
    return next(
        (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
