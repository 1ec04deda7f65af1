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


async def test_background_shrinks_to_its_under_load_seats_while_users_run() -> None:
    seats = Seats(8, under_load=1, linger_s=0.2)
    users_done, bg_done = asyncio.Event(), asyncio.Event()
    admitted: list[str] = []

    async def user() -> None:
        async with seats.interactive(2):
            await users_done.wait()

    async def background(name: str) -> None:
        async with seats.take(1):
            admitted.append(name)
            await bg_done.wait()

    u = asyncio.create_task(user())
    await asyncio.sleep(0)
    assert seats.capacity == 1
    tasks = [asyncio.create_task(background(n)) for n in "abc"]
    await asyncio.sleep(0.05)
    assert admitted == ["a"]  # one seat while the user runs
    users_done.set()
    await u
    await asyncio.sleep(0.05)
    assert admitted == ["a"]  # the load lingers past the user's last sequence
    await asyncio.wait_for(_until(lambda: len(admitted) == 3), 5)
    assert seats.held == 3 and seats.capacity == 8
    bg_done.set()
    await asyncio.gather(*tasks)


async def test_zero_seats_under_load_waits_for_a_pause() -> None:
    seats = Seats(4, under_load=0, linger_s=0.1)
    users_done = asyncio.Event()
    admitted = asyncio.Event()

    async def user() -> None:
        async with seats.interactive(1):
            await users_done.wait()

    async def background() -> None:
        async with seats.take(5):  # more than the pool: alone, once the users pause
            admitted.set()

    u = asyncio.create_task(user())
    await asyncio.sleep(0)
    b = asyncio.create_task(background())
    await asyncio.sleep(0.2)
    assert not admitted.is_set()
    users_done.set()
    await asyncio.wait_for(asyncio.gather(u, b), 5)
    assert admitted.is_set() and seats.held == 0
