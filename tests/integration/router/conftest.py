from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as redis

from services.router.control.bootstrap import apply_migrations
from services.router.db import create_pool


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's own database, migrated to the current schema."""
    await apply_migrations(database_url)
    p = await create_pool(database_url)
    yield p
    await p.close()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
    yield c
    await c.aclose()
