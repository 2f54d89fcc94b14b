"""Wire Redis, the limits store, the limiter and its sweeper into a gRPC server."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import grpc
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from libs.grpc_server import ServiceBinding, run, serve_until_stopped
from libs.settings import load_settings
from services.ratelimit.fallback import LocalLimiter
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Limits, LimitStore, PostgresLimitStore, StaticLimitStore
from services.ratelimit.periodic import PeriodicTask
from services.ratelimit.servicer import RateLimitServicer
from services.ratelimit.settings import RateLimitSettings

log = logging.getLogger(__name__)

SERVICE_NAME = ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name


async def build(settings: RateLimitSettings) -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
    """Everything the service needs; returns its bindings and an async close (for tests too)."""
    redis = aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        # One immediate retry rides over a pooled connection that died with a Redis restart;
        # anything longer is the local fallback's job, not a sleeping request's.
        retry=Retry(NoBackoff(), 1),
    )
    key_default = Limits(settings.default_key_rpm, settings.default_key_tpm, settings.default_key_tpd)
    pool: asyncpg.Pool | None = None
    store: LimitStore
    if settings.database_enabled:
        # min_size=0: no connection at start, so a database that is down does not stop the service.
        pool = await asyncpg.create_pool(settings.database_url, min_size=0, max_size=2, timeout=5.0,
                                         command_timeout=5.0)
        store = PostgresLimitStore(pool, key_default=key_default, refresh_s=settings.limits_refresh_s)
    else:
        log.info("no database: only the default key limits apply")
        store = StaticLimitStore(key_default=key_default)
    await store.start()
    limiter = Limiter(redis, store, prefix=settings.redis_prefix, fallback=LocalLimiter(replicas=settings.replicas),
                      default_ttl_s=settings.reservation_ttl_s, max_ttl_s=settings.max_reservation_ttl_s,
                      redis_timeout_s=settings.redis_timeout_s, redis_retry_s=settings.redis_retry_s)
    sweeper = PeriodicTask("reservation-sweep", settings.sweep_interval_s, limiter.sweep_expired)
    sweeper.start()
    servicer = RateLimitServicer(limiter, max_estimated_tokens=settings.max_estimated_tokens,
                                 max_ttl_s=settings.max_reservation_ttl_s,
                                 default_timeout_s=settings.default_timeout_s, max_timeout_s=settings.max_timeout_s)

    def add(server: grpc.aio.Server) -> None:
        ratelimit_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)

    async def close() -> None:
        await sweeper.stop()
        await store.close()
        if pool is not None:
            await pool.close()
        await redis.aclose()

    return [ServiceBinding(SERVICE_NAME, add)], close


async def serve(settings: RateLimitSettings) -> None:
    async def _build() -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
        return await build(settings)

    await serve_until_stopped(settings, "ratelimit", _build)


def main() -> None:
    settings = load_settings(RateLimitSettings)
    run(lambda: serve(settings), service="ratelimit", log_level=settings.log_level)
