"""Helpers for the router's background loops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def raise_if_cancelling() -> None:
    """Stop a forever-loop whose task was cancelled even if the CancelledError got lost on the way.

    On Python 3.11 ``asyncio.wait_for`` (which redis-py wraps around every socket write) can swallow
    a cancellation that arrives as the inner call completes; the task then stays "cancelling" but
    its loop would run on forever, and shutdown would hang waiting for it. Called once per
    iteration, this turns the pending cancellation back into a CancelledError.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def reload_forever(load: Callable[[], Awaitable[None]], every_s: float, what: str) -> None:
    """Call ``load`` every ``every_s`` seconds; a failure keeps the last loaded view (PostgreSQL may be away)."""
    while True:
        raise_if_cancelling()
        await asyncio.sleep(every_s)
        try:
            await load()
        except Exception as exc:
            log.warning("%s refresh failed: %s", what, type(exc).__name__)
