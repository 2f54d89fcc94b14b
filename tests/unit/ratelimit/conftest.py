from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.ratelimit.fallback import LocalLimiter
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Budgets, Limits, Scope, StaticLimitStore
from tests.support.infra import free_port

Rows = Mapping[tuple[Scope, str], Limits]
BudgetRows = Mapping[tuple[Scope, str], Budgets]


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def make_limiter(redis_client: aioredis.Redis,
                       redis_prefix: str) -> AsyncIterator[Callable[..., tuple[Limiter, StaticLimitStore]]]:
    """A limiter on the test's Redis prefix with the given rows; returns it and its (mutable) store."""
    made: list[Limiter] = []

    def make(rows: Rows | None = None, *, key_default: Limits = Limits(), fallback: LocalLimiter | None = None,
             client: aioredis.Redis | None = None, budgets: BudgetRows | None = None,
             **kwargs: Any) -> tuple[Limiter, StaticLimitStore]:
        store = StaticLimitStore(rows, key_default=key_default, budgets=budgets)
        # Generous by default: other test runs share this machine's two cores, and a slow Lua
        # call must not be mistaken for Redis being down (tests of that pass their own).
        kwargs.setdefault("redis_timeout_s", 2.0)
        limiter = Limiter(client or redis_client, store, prefix=redis_prefix, fallback=fallback, **kwargs)
        made.append(limiter)
        return limiter, store

    yield make
    for limiter in made:
        await limiter.aclose()


class TcpProxy:
    """A loopback TCP proxy to Redis that a test can cut and restore, to make Redis 'go away'."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    p = TcpProxy(port)
    await p.start()
    yield p
    await p.stop()
