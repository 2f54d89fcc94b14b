"""Limiter.charge (usage admitted without the service, e.g. by the router's local limiter) against a real Redis,
and the fallback taking charges while Redis is away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from libs.errors import InvalidArgument, QuotaExceeded
from services.ratelimit.budgets import Window, budget_lines_for, window_at
from services.ratelimit.fallback import LocalLimiter, UnsyncedDraw
from services.ratelimit.limiter import Charged, Limiter
from services.ratelimit.limits import Budgets, Kind, Level, Limits, Period, Scope, StaticLimitStore, Subject
from tests.unit.ratelimit.conftest import TcpProxy
from tests.unit.ratelimit.test_fallback import FakeClock, fast_failing_client, key_buckets, redis_level

MakeLimiter = Callable[..., tuple[Limiter, StaticLimitStore]]
SUBJECT = Subject("o1", "t1", "k1")


async def remaining(limiter: Limiter, kind: Kind | Period, scope: Scope = Scope.KEY) -> int:
    usage = await limiter.usage(SUBJECT)
    return next(r.remaining for r in usage.rows if r.scope is scope and r.kind is kind)


async def used(limiter: Limiter, kind: Period, scope: Scope) -> int:
    usage = await limiter.usage(SUBJECT)
    return next(r.used for r in usage.rows if r.scope is scope and r.kind is kind)


async def test_a_charge_draws_every_bucket_without_refusing_and_stops_at_zero(make_limiter: MakeLimiter,
                                                                            redis_client: aioredis.Redis,
                                                                            redis_prefix: str) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=6, tokens_per_minute=6_000),
                               (Scope.TEAM, "t1"): Limits(requests_per_minute=100)})
    await limiter.reserve(SUBJECT, 1_000)
    assert await limiter.charge(SUBJECT, "r1", requests=2, tokens=1_500) == Charged()
    assert await remaining(limiter, Kind.REQUESTS_PER_MINUTE) == 3
    assert 3_500 <= await remaining(limiter, Kind.TOKENS_PER_MINUTE) <= 3_501
    assert await remaining(limiter, Kind.REQUESTS_PER_MINUTE, Scope.TEAM) == 97  # every level is drawn
    # More than is left: never refused, and the bucket stops at zero instead of going into debt.
    assert await limiter.charge(SUBJECT, "r2", requests=50, tokens=0) == Charged()
    assert await redis_level(redis_client, f"{redis_prefix}rl:tb:key:k1:rpm") == 0
    with pytest.raises(QuotaExceeded) as err:
        await limiter.reserve(SUBJECT, 1)
    assert err.value.retry_after_s <= 10.0  # one request at 6/min: at most 10 s, not 50 requests' worth


async def test_a_charge_is_idempotent_per_key_and_charge_id(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "*"): Limits(requests_per_minute=10)})
    assert not (await limiter.charge(SUBJECT, "req-1", requests=3, tokens=0)).replayed
    assert (await limiter.charge(SUBJECT, "req-1", requests=3, tokens=0)).replayed
    assert await remaining(limiter, Kind.REQUESTS_PER_MINUTE) == 7
    # The id is scoped to the key, like Reserve's request ids.
    other = Subject("o1", "t1", "k2")
    assert not (await limiter.charge(other, "req-1", requests=1, tokens=0)).replayed
    assert next(r.remaining for r in (await limiter.usage(other)).rows) == 9


async def test_the_cost_is_committed_to_every_budget_with_alerts(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter(budgets={(Scope.TEAM, "t1"): Budgets(daily_nano_usd=10_000),
                                       (Scope.KEY, "k1"): Budgets(monthly_nano_usd=100_000)})
    await limiter.reserve(SUBJECT, 10, estimated_cost_nano_usd=1_000)  # held, not committed
    await limiter.charge(SUBJECT, "r1", requests=1, tokens=10, cost_nano_usd=8_500)
    assert await used(limiter, Period.DAILY, Scope.TEAM) == 9_500
    assert await used(limiter, Period.MONTHLY, Scope.KEY) == 9_500
    entries = await limiter._redis.xrange(limiter.alerts_stream)
    assert [fields[b"threshold_pct"] for _, fields in entries] == [b"80"]  # 8,500 committed of 10,000
    # Never refused, even past the budget; the next reserve is.
    await limiter.charge(SUBJECT, "r2", requests=0, tokens=0, cost_nano_usd=5_000)
    with pytest.raises(QuotaExceeded):
        await limiter.reserve(SUBJECT, 10)


async def test_old_usage_skips_refilled_buckets_and_lands_in_its_budget_window(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=10, tokens_per_day=100_000)},
                              budgets={(Scope.KEY, "k1"): Budgets(daily_nano_usd=1_000_000)})
    two_minutes_ago = time.time() - 120
    await limiter.charge(SUBJECT, "old", requests=1, tokens=5_000, cost_nano_usd=700, used_at_s=two_minutes_ago)
    assert await remaining(limiter, Kind.REQUESTS_PER_MINUTE) == 10  # a minute bucket is full again by now
    assert await remaining(limiter, Kind.TOKENS_PER_DAY) in range(95_000, 95_005)  # a day bucket is not
    window = window_at(Period.DAILY, int(two_minutes_ago * 1000))
    spent = await limiter._redis.hget(f"{limiter._prefix}rl:$:key:k1:d:{window.window_id}", "s")
    assert spent == b"700"
    # A time in the future counts as now.
    await limiter.charge(SUBJECT, "future", requests=1, tokens=0, used_at_s=time.time() + 3_600)
    assert await remaining(limiter, Kind.REQUESTS_PER_MINUTE) == 9


async def test_invalid_charges(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=10)})
    for kwargs, field in (({"charge_id": ""}, "charge_id"), ({"requests": -1}, "requests"),
                          ({"tokens": -1}, "tokens"), ({"cost_nano_usd": 2**53}, "cost_nano_usd")):
        args = {"charge_id": "r", "requests": 1, "tokens": 1, **kwargs}
        with pytest.raises(InvalidArgument) as err:
            await limiter.charge(SUBJECT, str(args.pop("charge_id")), **args)  # type: ignore[arg-type]
        assert [v.field for v in err.value.violations] == [field]


# --- the fallback --------------------------------------------------------------------------------

def test_the_fallback_takes_a_charge_without_refusing_owes_it_to_redis_and_remembers_its_id() -> None:
    clock = FakeClock()
    local = LocalLimiter(clock=clock)
    buckets = key_buckets(Limits(requests_per_minute=4, tokens_per_minute=1_000))
    rpm_id, tpm_id = (b.identity for b in buckets)
    local.reserve(buckets, 100, 60)
    assert not local.charge(buckets, 9, 300, request_key="k1:r1")  # more requests than are left: stops at zero
    assert local.charge(buckets, 9, 300, request_key="k1:r1")  # replayed: nothing drawn
    assert [r.remaining for r in local.usage(buckets)] == [0, 600]
    with pytest.raises(QuotaExceeded):
        local.reserve(buckets, 1, 60)
    # Owed to Redis: the reservation's draw and the charge's, capped by what the local bucket is short of full.
    assert local.take_unsynced_draws() == [UnsyncedDraw(rpm_id, 4, 4, 60_000), UnsyncedDraw(tpm_id, 400, 1_000, 60_000)]
    # Usage older than a bucket's period is not drawn from it.
    clock.now += 120
    local.sweep()
    assert not local.charge(buckets, 1, 10, used_at_s=local._wall_clock() - 90, request_key="k1:r2")
    assert [r.remaining for r in local.usage(buckets)] == [4, 1_000]


def test_the_fallback_commits_a_charges_cost_locally_and_forgets_ids_after_a_day() -> None:
    clock = FakeClock()
    local = LocalLimiter(clock=clock, wall_clock=lambda: 1_742_000_000.0)
    lines = budget_lines_for([Level(Scope.TEAM, "t1", Limits(), Budgets(daily_nano_usd=10_000))])
    local.charge([], 0, 0, lines, 3_000, request_key="k1:r1")
    assert local.usage([], lines)[0].used == 3_000
    window: Window = window_at(Period.DAILY, 1_742_000_000_000)
    assert local.take_unsynced() == [((Scope.TEAM, "t1", Period.DAILY, window.window_id), 3_000, window.end_ms)]
    clock.now += 86_401
    local.sweep()
    assert not local.charge([], 0, 0, lines, 1, request_key="k1:r1")  # a day later the id is forgotten


async def test_redis_down_the_fallback_takes_the_charge_and_writes_it_back(make_limiter: MakeLimiter,
                                                                          proxy: TcpProxy,
                                                                          redis_client: aioredis.Redis,
                                                                          redis_prefix: str) -> None:
    client = fast_failing_client(proxy.port)
    try:
        limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=10)}, client=client,
                                  budgets={(Scope.KEY, "k1"): Budgets(daily_nano_usd=10_000)},
                                  fallback=LocalLimiter(), redis_retry_s=0.05, redis_timeout_s=0.2)
        await limiter.reserve(SUBJECT, 1)
        await proxy.stop()
        assert await limiter.charge(SUBJECT, "r1", requests=6, tokens=0, cost_nano_usd=2_500) == Charged(degraded=True)
        assert (await limiter.charge(SUBJECT, "r1", requests=6, tokens=0)).replayed
        local = [await limiter.reserve(SUBJECT, 1) for _ in range(3)]  # 10 - 1 - 6
        assert all(r.degraded for r in local)
        with pytest.raises(QuotaExceeded):
            await limiter.reserve(SUBJECT, 1)

        await proxy.start()
        await asyncio.sleep(0.06)
        await limiter.sweep_expired()
        assert not limiter.degraded
        assert await redis_level(redis_client, f"{redis_prefix}rl:tb:key:k1:rpm") < 0.2  # 1 + 6 + 3 drawn
        assert await used(limiter, Period.DAILY, Scope.KEY) == 2_500
    finally:
        await client.aclose()


async def test_a_charge_redis_took_is_mirrored_into_the_fallback(make_limiter: MakeLimiter, proxy: TcpProxy) -> None:
    client = fast_failing_client(proxy.port)
    try:
        limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=10)}, client=client,
                                  fallback=LocalLimiter(), redis_retry_s=0.05, redis_timeout_s=0.2)
        assert not (await limiter.charge(SUBJECT, "r1", requests=8, tokens=0)).degraded
        await proxy.stop()
        local = [await limiter.reserve(SUBJECT, 1) for _ in range(2)]
        assert all(r.degraded for r in local)
        with pytest.raises(QuotaExceeded):
            await limiter.reserve(SUBJECT, 1)  # the fallback went on from what the charge took
    finally:
        await client.aclose()
