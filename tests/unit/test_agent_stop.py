"""How a stopping agent ends its tasks (edge_agent/agent.py, ``cancelled``): a task that
lets a cancellation pass, as Python 3.11's wait_for does when it meets the result of
the send it wraps, is cancelled again, and one that never ends cannot hold a stop up."""

import asyncio

from edge_agent.agent import CANCEL_ROUNDS, cancelled


async def test_a_task_that_lets_one_cancellation_pass_is_cancelled_again():
    passed = 0

    async def beats() -> None:
        nonlocal passed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if passed:
                    raise
                passed += 1  # (the race: the cancellation lost, the loop goes on)

    task = asyncio.create_task(beats())
    await asyncio.sleep(0)
    assert await cancelled([task], 0.2) == set()
    assert task.cancelled() and passed == 1


async def test_a_task_that_never_ends_is_given_back_after_the_rounds():
    cancels = 0
    done = asyncio.Event()

    async def stubborn() -> None:
        nonlocal cancels
        while not done.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancelled([task], 0.05) == {task}
    assert cancels == CANCEL_ROUNDS
    done.set()
    task.cancel()
    await task


async def test_tasks_that_ended_are_left_as_they_were():
    async def fails() -> None:
        raise ValueError("x")

    async def ends() -> int:
        return 1

    failed, ended = asyncio.create_task(fails()), asyncio.create_task(ends())
    await asyncio.sleep(0)
    assert await cancelled([failed, ended], 1.0) == set()
    assert isinstance(failed.exception(), ValueError) and ended.result() == 1
