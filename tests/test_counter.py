"""proxy.counter: many waiters, each woken when the count reaches its own target."""

from __future__ import annotations

import asyncio

from proxy.counter import Counter


async def test_many_waiters_each_wake_at_their_target() -> None:
    counter = Counter()
    woken: list[int] = []

    async def wait(target: int) -> None:
        await counter.reached(target)
        woken.append(target)

    tasks = [asyncio.create_task(wait(t)) for t in (3, 1, 2, 1)]
    await asyncio.sleep(0)
    assert woken == []
    counter.add()
    await asyncio.sleep(0)
    assert sorted(woken) == [1, 1]
    counter.add(2)
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    assert sorted(woken) == [1, 1, 2, 3]


async def test_a_reached_target_returns_at_once_and_counting_down_wakes_nobody() -> None:
    counter = Counter()
    counter.add(2)
    async with asyncio.timeout(5):
        await counter.reached(2)
    counter.add(-1)
    waiter = asyncio.create_task(counter.reached(2))
    await asyncio.sleep(0)
    assert not waiter.done()
    counter.add()
    async with asyncio.timeout(5):
        await waiter


async def test_a_cancelled_waiter_is_forgotten() -> None:
    counter = Counter()
    waiter = asyncio.create_task(counter.reached(5))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert counter._waiters == []
    counter.add(5)
