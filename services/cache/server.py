"""Cache service process: Redis-backed exact tier with an in-process fallback, served over gRPC."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from tollgate.cache.v1 import cache_pb2, cache_pb2_grpc

from libs.grpc_server import ServiceBinding, run, serve_until_stopped
from libs.settings import load_settings
from services.cache.cache import ResponseCache
from services.cache.exact import ExactTier, RedisExactStore
from services.cache.fallback import FallbackStore, LocalLruStore
from services.cache.servicer import CacheServicer
from services.cache.settings import CacheSettings

log = logging.getLogger(__name__)

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


def redis_client(settings: CacheSettings) -> Redis:
    # Short timeouts, and one immediate retry on connection errors only (a pooled connection that
    # Redis closed gets replaced) but none on timeouts: an outage must become a failover quickly,
    # not a pile of waiting requests.
    return Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                          socket_connect_timeout=settings.redis_timeout_s,
                          retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))


async def build(settings: CacheSettings) -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
    """Wire backends, domain and servicer; returns the bindings and an async close."""
    client = redis_client(settings)
    local = LocalLruStore(settings.local_lru_entries, max_bytes=settings.local_lru_max_bytes)
    store = FallbackStore(RedisExactStore(client, settings.redis_prefix), local, recheck_s=settings.redis_recheck_s)
    # Redis being down at start is not fatal: the service starts degraded and recovers on its own.
    await store.start()
    cache = ResponseCache([ExactTier(store, stale_window_s=settings.stale_window_s)], stats=store,
                          default_ttl_s=settings.default_ttl_s, max_ttl_s=settings.max_ttl_s,
                          max_entry_bytes=settings.max_entry_bytes)
    servicer = CacheServicer(cache, settings)

    async def close() -> None:
        await store.aclose()
        await client.aclose()

    binding = ServiceBinding(SERVICE_NAME, lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(
        servicer, server))
    return [binding], close


async def serve(settings: CacheSettings) -> None:
    await serve_until_stopped(settings, "cache", lambda: build(settings))


def main() -> None:
    settings = load_settings(CacheSettings)
    run(lambda: serve(settings), service="cache", log_level=settings.log_level)
