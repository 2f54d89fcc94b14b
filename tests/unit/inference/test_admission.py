from __future__ import annotations

import asyncio

import pytest

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, Overloaded
from services.inference.admission import AdmissionGate


async def test_runs_up_to_the_limit_then_queues_then_refuses() -> None:
    gate = AdmissionGate(max_concurrency=2, max_waiting=1, retry_after_s=0.5)
    await gate.acquire(Deadline.after(5))
    await gate.acquire(Deadline.after(5))
    assert (gate.running, gate.waiting) == (2, 0)

    queued = asyncio.create_task(gate.acquire(Deadline.after(5)))
    await asyncio.sleep(0)
    assert (gate.running, gate.waiting) == (2, 1)

    with pytest.raises(Overloaded) as exc_info:
        await gate.acquire(Deadline.after(5))
    assert exc_info.value.retry_after_s == 0.5

    gate.release()  # the slot moves to the queued request
    await asyncio.wait_for(queued, 1)
    assert (gate.running, gate.waiting) == (2, 0)
    gate.release()
    gate.release()
    assert (gate.running, gate.waiting) == (0, 0)


async def test_queue_is_first_come_first_served() -> None:
    gate = AdmissionGate(max_concurrency=1, max_waiting=10)
    await gate.acquire(Deadline.after(5))
    order: list[int] = []

    async def waiter(i: int) -> None:
        async with gate.slot(Deadline.after(5)):
            order.append(i)
            await asyncio.sleep(0)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0)
    gate.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert (gate.running, gate.waiting) == (0, 0)


async def test_waiting_is_bounded_by_the_callers_deadline() -> None:
    gate = AdmissionGate(max_concurrency=1, max_waiting=1)
    await gate.acquire(Deadline.after(5))
    with pytest.raises(DeadlineExceeded):
        await gate.acquire(Deadline.after(0.05))
    assert (gate.running, gate.waiting) == (1, 0)


async def test_waiting_past_the_services_cap_is_overloaded() -> None:
    gate = AdmissionGate(max_concurrency=1, max_waiting=1)
    await gate.acquire(Deadline.after(5))
    with pytest.raises(Overloaded):
        await gate.acquire(Deadline.from_remaining(None, default_s=0.05, max_s=1))


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    gate = AdmissionGate(max_concurrency=1, max_waiting=1)
    await gate.acquire(Deadline.after(5))
    task = asyncio.create_task(gate.acquire(Deadline.after(5)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (gate.running, gate.waiting) == (1, 0)
    gate.release()
    assert gate.running == 0


async def test_a_slot_handed_to_a_waiter_that_just_gave_up_is_passed_on() -> None:
    gate = AdmissionGate(max_concurrency=1, max_waiting=2)
    await gate.acquire(Deadline.after(5))
    first = asyncio.create_task(gate.acquire(Deadline.after(5)))
    second = asyncio.create_task(gate.acquire(Deadline.after(5)))
    await asyncio.sleep(0)
    gate.release()  # hands the slot to `first` ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # the slot went on to `second`
    assert (gate.running, gate.waiting) == (1, 0)


def test_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        AdmissionGate(max_concurrency=0, max_waiting=1)
