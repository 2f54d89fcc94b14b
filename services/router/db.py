"""PostgreSQL access helpers: one pool, and connection failures surfaced as Unavailable."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from libs.errors import Unavailable

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    # The server is shutting down or restarting (admin/crash shutdown): it will be back, like a lost connection.
    asyncpg.exceptions.OperatorInterventionError,
)


@contextlib.asynccontextmanager
async def acquire(pool: asyncpg.Pool, timeout_s: float = 2.0) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; an unreachable database becomes ``Unavailable`` (never a hang)."""
    try:
        async with pool.acquire(timeout=timeout_s) as conn:
            yield conn
    except CONNECTION_ERRORS as exc:
        raise Unavailable(f"control-plane database unavailable ({type(exc).__name__})") from None


async def create_pool(url: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=8, command_timeout=10, timeout=5)
    assert pool is not None
    return pool
