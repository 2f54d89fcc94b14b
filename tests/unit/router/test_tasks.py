"""raise_if_cancelling: a cancellation swallowed below a loop still stops the loop."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from services.router.tasks import raise_if_cancelling


async def test_a_swallowed_cancellation_still_ends_the_loop() -> None:
    iterations = 0

    async def loop() -> None:
        nonlocal iterations
        while True:
            raise_if_cancelling()
            iterations += 1
            # What Python 3.11's wait_for can do inside a client library: eat the CancelledError.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert iterations >= 1


async def test_no_effect_outside_a_cancelled_task() -> None:
    raise_if_cancelling()
