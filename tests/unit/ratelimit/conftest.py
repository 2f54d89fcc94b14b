from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.ratelimit.fallback import LocalLimiter
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Limits, Scope, StaticLimitStore

Rows = Mapping[tuple[Scope, str], Limits]


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def make_limiter(redis_client: aioredis.Redis, redis_prefix: str) -> Callable[..., tuple[Limiter, StaticLimitStore]]:
    """A limiter on the test's Redis prefix with the given rows; returns it and its (mutable) store."""

    def make(rows: Rows | None = None, *, key_default: Limits = Limits(), fallback: LocalLimiter | None = None,
             client: aioredis.Redis | None = None, **kwargs: Any) -> tuple[Limiter, StaticLimitStore]:
        store = StaticLimitStore(rows, key_default=key_default)
        limiter = Limiter(client or redis_client, store, prefix=redis_prefix, fallback=fallback, **kwargs)
        return limiter, store

    return make
