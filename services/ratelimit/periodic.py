"""A background coroutine run every N seconds until stopped (limit reloads, reservation sweeps)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class PeriodicTask:
    """Calls ``fn`` every ``interval_s`` seconds; an exception is logged and the loop goes on."""

    def __init__(self, name: str, interval_s: float, fn: Callable[[], Awaitable[object]]):
        self.name = name
        self._interval_s = interval_s
        self._fn = fn
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self.name)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                # One bad tick must not end the loop for the process's lifetime.
                log.exception("periodic task %s failed", self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
