"""Backpressure: at most ``max_concurrency`` generations run, at most ``max_waiting`` queue behind them.

A request that finds the queue full is refused at once with
:class:`~libs.errors.Overloaded` (RESOURCE_EXHAUSTED + RetryInfo), so callers
fail over to another instance instead of piling up here. Queued requests are
served first come, first served, and wait no longer than their deadline.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, Overloaded


class AdmissionGate:
    def __init__(self, max_concurrency: int, max_waiting: int, *, retry_after_s: float = 1.0):
        if max_concurrency < 1 or max_waiting < 0:
            raise ValueError("max_concurrency must be >= 1 and max_waiting >= 0")
        self.max_concurrency = max_concurrency
        self.max_waiting = max_waiting
        self._retry_after_s = retry_after_s
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)  # only pending waiters are ever queued

    async def acquire(self, deadline: Deadline) -> None:
        """Take a slot, queueing until one frees up or the deadline passes."""
        if self._running < self.max_concurrency and not self.waiting:
            self._running += 1
            return
        if self.waiting >= self.max_waiting:
            raise Overloaded(f"overloaded: {self._running} generations running and {self.waiting} queued",
                             retry_after_s=self._retry_after_s)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(0.0, deadline.remaining())):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # A slot was handed over just as we gave up: pass it on.
                self.release()
            else:
                waiter.cancel()
                self._discard(waiter)
            if isinstance(exc, TimeoutError):
                if deadline.from_caller:
                    raise DeadlineExceeded("deadline exceeded waiting for a generation slot") from None
                raise Overloaded("timed out waiting for a generation slot", retry_after_s=self._retry_after_s) from None
            raise

    def release(self) -> None:
        """Give the slot to the longest-waiting request, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves over; running stays the same
                return
        self._running -= 1

    @asynccontextmanager
    async def slot(self, deadline: Deadline) -> AsyncIterator[None]:
        await self.acquire(deadline)
        try:
            yield
        finally:
            self.release()

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with suppress(ValueError):
            self._waiters.remove(waiter)
