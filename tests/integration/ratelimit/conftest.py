from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from tollgate.ratelimit.v1 import ratelimit_pb2_grpc

from libs.grpc_server import GrpcServer
from libs.pg_migrations import migrate
from services.ratelimit.server import build_app
from services.ratelimit.settings import RateLimitSettings
from tests.integration.ratelimit.ratelimit_support import MIGRATIONS, Running


@pytest.fixture
async def control_plane(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The migrated control-plane database, as a pool for the test to write limits with."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, MIGRATIONS)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=2)
    yield pool
    await pool.close()


@pytest.fixture
async def ratelimit(clean_env: None, control_plane: asyncpg.Pool, database_url: str, redis_url: str,
                    redis_prefix: str) -> AsyncIterator[Running]:
    """The real service (built as serve() builds it, health watch included) on a loopback port."""
    settings = RateLimitSettings(host="127.0.0.1", port=0, redis_url=redis_url, redis_prefix=redis_prefix,
                                 database_url=database_url, limits_refresh_s=0.1, sweep_interval_s=0.1,
                                 grace_period_s=1, redis_timeout_s=2.0)
    app = await build_app(settings)
    server = GrpcServer(settings, app.bindings)
    port = await server.start()
    await app.watch_health(server.health)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(ratelimit_pb2_grpc.RateLimitServiceStub(channel), control_plane, settings, app, server.health,
                      channel)
    finally:
        await channel.close()
        await server.stop(0.5)
        await app.close()
