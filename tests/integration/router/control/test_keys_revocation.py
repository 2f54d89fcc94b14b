"""Revocation latency across routers: two Authenticators (as in two router processes) sharing
PostgreSQL and Redis. One revokes; how long until the other rejects the key?"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
import redis.asyncio as redis

from libs.errors import Unauthenticated
from services.router.control.bootstrap import apply_migrations
from services.router.control.keys import RevocationBus
from services.router.control.plane import ControlPlane
from services.router.db import create_pool
from services.router.pipeline.authenticate import Authenticator

# The bound; measured latencies are printed (pytest -s) and asserted well under it.
BOUND_S = 1.0


@dataclass
class Router:
    """What one router process holds: its own pool, Redis client, key cache and listener."""

    control: ControlPlane
    auth: Authenticator
    bus: RevocationBus
    task: asyncio.Task[None]


@pytest.fixture
async def migrated(database_url: str) -> str:
    await apply_migrations(database_url)
    return database_url


@contextlib.asynccontextmanager
async def _router(database_url: str, redis_url: str, prefix: str, *, cache_ttl_s: float,
                  listen: bool = True, name: str | None = None) -> AsyncIterator[Router]:
    pool = await create_pool(database_url)
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2, client_name=name)
    bus = RevocationBus(client, prefix)
    control = ControlPlane(pool, bus)
    auth = Authenticator(control, cache_ttl_s=cache_ttl_s)
    task = asyncio.create_task(bus.listen_forever(auth) if listen else asyncio.sleep(3600))
    if listen:
        await asyncio.wait_for(bus.subscribed.wait(), 5)
    try:
        yield Router(control, auth, bus, task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()
        await pool.close()


async def _new_key(control: ControlPlane) -> tuple[str, str]:
    org = await control.create_org("t", f"org-{time.monotonic_ns()}")
    team = await control.create_team("t", org, "team")
    created = await control.create_key("t", org_id=org, team_id=team, name="k", role="member", allowed_models=[],
                                       expires_at=None)
    return created.key_id, f"Bearer {created.secret}"


async def _rejected_after(auth: Authenticator, header: str, started: float, timeout_s: float = 5.0) -> float:
    while True:
        try:
            await auth.authenticate(header)
        except Unauthenticated:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"key still accepted {timeout_s}s after revocation")
        await asyncio.sleep(0.001)


async def test_broadcast_revokes_on_every_router_at_once(migrated: str, redis_url: str, redis_prefix: str) -> None:
    # An hour-long cache: only the broadcast can explain a fast rejection.
    async with _router(migrated, redis_url, redis_prefix, cache_ttl_s=3600) as a, \
            _router(migrated, redis_url, redis_prefix, cache_ttl_s=3600) as b:
        latencies = []
        for _ in range(5):
            key_id, header = await _new_key(a.control)
            for r in (a, b):
                await r.auth.authenticate(header)  # cached on both routers
            started = time.monotonic()
            await a.control.revoke_key("admin", key_id)
            latencies.append(max(await asyncio.gather(_rejected_after(a.auth, header, started),
                                                      _rejected_after(b.auth, header, started))))
        median_ms, max_ms = statistics.median(latencies) * 1000, max(latencies) * 1000
        print(f"\nrevocation latency via broadcast (cache TTL 1 h): median {median_ms:.1f} ms, "
              f"max {max_ms:.1f} ms over {len(latencies)} revocations")
        assert max(latencies) < BOUND_S / 2


async def test_without_a_broadcast_the_cache_ttl_bounds_it(migrated: str, redis_url: str,
                                                            redis_prefix: str) -> None:
    # Router b hears nothing (no listener; say, Redis was briefly away): its 1 s cache TTL still bounds it.
    async with _router(migrated, redis_url, redis_prefix, cache_ttl_s=1.0) as a, \
            _router(migrated, redis_url, redis_prefix, cache_ttl_s=1.0, listen=False) as b:
        key_id, header = await _new_key(a.control)
        await b.auth.authenticate(header)
        started = time.monotonic()
        await a.control.revoke_key("admin", key_id)
        latency = await _rejected_after(b.auth, header, started)
        print(f"\nrevocation latency via cache TTL only: {latency * 1000:.0f} ms")
        assert latency <= BOUND_S + 0.3  # the TTL plus one lookup, with margin for a loaded machine


async def test_listener_survives_a_redis_disconnect(migrated: str, redis_url: str, redis_prefix: str) -> None:
    name = f"tgtest-revocation-{time.monotonic_ns()}"
    async with _router(migrated, redis_url, redis_prefix, cache_ttl_s=3600) as a, \
            _router(migrated, redis_url, redis_prefix, cache_ttl_s=3600, name=name) as b:
        # Kill b's pub/sub connection from the server side, as a Redis restart would (only ours: the
        # Redis server is shared with other test runs).
        admin = redis.Redis.from_url(redis_url)
        try:
            mine = [c for c in await admin.client_list(_type="pubsub") if c.get("name") == name]
            assert len(mine) == 1
            await admin.client_kill_filter(_id=mine[0]["id"])
        finally:
            await admin.aclose()
        # It reconnects (and drops its cache, since it may have missed messages), then hears the next one.
        for _ in range(200):
            if b.bus.subscriptions >= 2:
                break
            await asyncio.sleep(0.05)
        assert b.bus.subscriptions == 2 and b.bus.subscribed.is_set() and a.bus.subscriptions == 1
        key_id, header = await _new_key(a.control)
        await b.auth.authenticate(header)
        started = time.monotonic()
        await a.control.revoke_key("admin", key_id)
        assert await _rejected_after(b.auth, header, started) < BOUND_S / 2


async def test_revocation_is_committed_before_it_is_announced(migrated: str, redis_url: str,
                                                                redis_prefix: str) -> None:
    # A router that hears the broadcast and re-reads the key must find it revoked in PostgreSQL.
    async with _router(migrated, redis_url, redis_prefix, cache_ttl_s=0) as a:
        key_id, header = await _new_key(a.control)
        listener = redis.Redis.from_url(redis_url)
        pubsub = listener.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(a.bus.channel)
        pool = await asyncpg.create_pool(migrated, min_size=1, max_size=1)
        try:
            await a.control.revoke_key("admin", key_id)
            message = None
            for _ in range(50):
                message = await pubsub.get_message(timeout=0.1)
                if message:
                    break
            assert message is not None and message["data"] == key_id.encode()
            assert await pool.fetchval("SELECT revoked_at IS NOT NULL FROM api_keys WHERE key_id = $1", key_id)
        finally:
            await pubsub.aclose()
            await listener.aclose()
            await pool.close()
        with pytest.raises(Unauthenticated):
            await a.auth.authenticate(header)
