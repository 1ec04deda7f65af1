"""The request service's pool of background seats."""

from __future__ import annotations

import asyncio

from tiller.server.service import Seats


async def test_takers_wait_for_free_seats_and_cancelled_ones_give_theirs_back() -> None:
    seats = Seats(4)
    held = asyncio.Event()
    order: list[str] = []

    async def hold(name: str, k: int, until: asyncio.Event) -> None:
        async with seats.take(k):
            order.append(name)
            held.set()
            await until.wait()

    first_done = asyncio.Event()
    first = asyncio.create_task(hold("a", 3, first_done))
    await held.wait()
    assert seats.free == 1
    never = asyncio.Event()
    second = asyncio.create_task(hold("b", 2, never))  # needs 2: waits for "a"
    await asyncio.sleep(0.05)
    assert order == ["a"] and seats.free == 1
    first_done.set()
    await first
    await asyncio.wait_for(_until(lambda: order == ["a", "b"]), 5)
    assert seats.free == 2
    second.cancel()  # a cancelled holder's seats come back
    await asyncio.gather(second, return_exceptions=True)
    assert seats.free == 4
    # More than the pool takes the whole pool rather than waiting forever.
    big_done = asyncio.Event()
    big_done.set()
    await asyncio.wait_for(hold("c", 99, big_done), 5)
    assert order[-1] == "c" and seats.free == 4


async def _until(cond: object) -> None:
    while not cond():  # type: ignore[operator]
        await asyncio.sleep(0.01)
