"""Wire Redis, the limits store, the limiter and its sweeper into a gRPC server.

Health: the service itself ("" and RateLimitService) stays SERVING while Redis is down, because
it still answers (from the local fallback, within its documented bound); the separate health
entry ``ratelimit.redis`` is NOT_SERVING while the fallback is in charge, so probes and
operators can see the degraded state without load balancers taking the service out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from libs.grpc_server import GrpcServer, ServiceBinding, run, serve_until_stopped
from libs.settings import load_settings
from services.ratelimit.fallback import LocalLimiter
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Limits, LimitStore, PostgresLimitStore, StaticLimitStore
from services.ratelimit.periodic import PeriodicTask
from services.ratelimit.servicer import RateLimitServicer
from services.ratelimit.settings import RateLimitSettings

log = logging.getLogger(__name__)

SERVICE_NAME = ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
# Health entry that is SERVING while Redis answers and NOT_SERVING while the fallback limits.
REDIS_HEALTH = "ratelimit.redis"


@dataclass
class RateLimitApp:
    bindings: Sequence[ServiceBinding]
    limiter: Limiter
    settings: RateLimitSettings
    _close: Callable[[], Awaitable[None]]
    _tasks: list[PeriodicTask] = field(default_factory=list)

    async def watch_health(self, servicer: health.aio.HealthServicer) -> None:
        """Keep the ``ratelimit.redis`` health entry in step with the limiter's degraded state."""
        last: list[bool | None] = [None]

        async def update() -> None:
            degraded = self.limiter.degraded
            if degraded != last[0]:
                last[0] = degraded
                await servicer.set(REDIS_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING if degraded
                                   else health_pb2.HealthCheckResponse.SERVING)

        await update()
        # The sweeper talks to Redis every sweep interval, so `degraded` is never staler than that.
        task = PeriodicTask("health", min(self.settings.sweep_interval_s, 1.0), update)
        task.start()
        self._tasks.append(task)

    async def close(self) -> None:
        for task in self._tasks:
            await task.stop()
        await self._close()


async def build(settings: RateLimitSettings) -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
    """Everything the service needs; returns its bindings and an async close (for tests too)."""
    app = await build_app(settings)
    return app.bindings, app.close


async def build_app(settings: RateLimitSettings) -> RateLimitApp:
    """Everything the service needs, with the limiter exposed (health, tests)."""
    redis = aioredis.Redis.from_url(
        settings.redis_url,
        # No socket_timeout: the limiter bounds every call itself (the tighter of redis_timeout_s
        # and the caller's deadline), and a second per-socket timer costs a wait_for per command.
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
        await limiter.aclose()
        await redis.aclose()

    return RateLimitApp([ServiceBinding(SERVICE_NAME, add)], limiter, settings, close)


async def serve(settings: RateLimitSettings) -> None:
    app: RateLimitApp | None = None

    async def _build() -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
        nonlocal app
        app = await build_app(settings)
        return app.bindings, app.close

    async def _started(server: GrpcServer) -> None:
        assert app is not None
        await app.watch_health(server.health)

    await serve_until_stopped(settings, "ratelimit", _build, on_started=_started)


def main() -> None:
    settings = load_settings(RateLimitSettings)
    run(lambda: serve(settings), service="ratelimit", log_level=settings.log_level)
