"""`proxy.deadline.Deadline` against what `asyncio.timeout()` promises."""

from __future__ import annotations

import asyncio

import pytest

from proxy.deadline import Deadline


async def test_a_result_in_time_is_returned_and_the_timer_is_gone() -> None:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    loop.call_soon(future.set_result, 7)
    with Deadline(0.05) as deadline:
        assert await future == 7
    # Past the deadline: nothing cancels this task any more.
    await asyncio.sleep(0.1)
    assert not deadline.expired
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_an_await_past_the_deadline_is_a_timeout_error() -> None:
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError), Deadline(0.01) as deadline:
        await never
    assert deadline.expired
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    # The task goes on as usual afterwards.
    await asyncio.sleep(0)


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    started = asyncio.Event()

    async def waits() -> None:
        with Deadline(10.0):
            started.set()
            await asyncio.get_running_loop().create_future()

    task = asyncio.create_task(waits())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_at_the_same_time_as_the_timer_stays_a_cancellation() -> None:
    loop = asyncio.get_running_loop()
    seen: list[BaseException] = []

    async def waits() -> None:
        me = asyncio.current_task()
        assert me is not None
        awaited = loop.create_future()
        # When the timer cancels the await, this callback runs before the task wakes: a
        # cancellation from elsewhere lands at the same time as the deadline's.
        awaited.add_done_callback(lambda _: me.cancel())
        try:
            with Deadline(0.01) as deadline:
                await awaited
        except BaseException as exc:
            seen.append(exc)
            assert deadline.expired
            raise

    task = asyncio.create_task(waits())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert type(seen[0]) is asyncio.CancelledError


async def test_outside_a_task_it_says_so() -> None:
    def outside() -> None:
        with Deadline(1.0):
            pass

    handle_error: list[BaseException] = []
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def call() -> None:
        try:
            outside()
        except RuntimeError as exc:
            handle_error.append(exc)
        done.set_result(None)

    loop.call_soon(call)
    await done
    assert "inside a task" in str(handle_error[0])
