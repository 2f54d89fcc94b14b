"""The local fallback limiter, alone (fake clock) and behind the Limiter when Redis goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, NotFound, QuotaExceeded, Unavailable
from services.ratelimit.buckets import Bucket, buckets_for
from services.ratelimit.budgets import BudgetLine, budget_lines_for, window_at
from services.ratelimit.fallback import LocalLimiter
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Budgets, Kind, Level, Limits, Period, Scope, StaticLimitStore, Subject
from tests.support.infra import free_port
from tests.unit.ratelimit.conftest import TcpProxy

MakeLimiter = Callable[..., tuple[Limiter, StaticLimitStore]]
SUBJECT = Subject("o1", "t1", "k1")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key_buckets(limits: Limits, team: Limits | None = None) -> list[Bucket]:
    levels = [Level(Scope.KEY, "k1", limits)]
    if team is not None:
        levels.append(Level(Scope.TEAM, "t1", team))
    return buckets_for(levels)


def test_each_replica_enforces_its_share() -> None:
    local = LocalLimiter(replicas=3)
    assert local.capacity(10) == 3
    assert local.capacity(2) == 1  # never zero: a tiny limit still admits something
    clock = FakeClock()
    local = LocalLimiter(replicas=4, clock=clock)
    buckets = key_buckets(Limits(tokens_per_minute=4000))
    local.reserve(buckets, 600, 60)
    with pytest.raises(QuotaExceeded) as info:
        local.reserve(buckets, 600, 60)
    assert info.value.violations[0].subject == "key:k1"
    # Capacity 1000, 400 left, 200 short at 1000/60 per second: 12 s.
    assert info.value.retry_after_s == pytest.approx(12.0, abs=0.01)
    clock.now += 12.0
    local.reserve(buckets, 600, 60)


def test_local_reserve_is_all_or_nothing() -> None:
    local = LocalLimiter(clock=FakeClock())
    buckets = key_buckets(Limits(tokens_per_minute=10_000), team=Limits(tokens_per_minute=1000))
    with pytest.raises(QuotaExceeded) as info:
        local.reserve(buckets, 1500, 60)
    assert [v.subject for v in info.value.violations] == ["team:t1"]
    assert local.usage(buckets)[0].remaining == 10_000


def test_local_commit_release_and_not_found() -> None:
    local = LocalLimiter(clock=FakeClock())
    buckets = key_buckets(Limits(requests_per_minute=1, tokens_per_minute=1000))
    res = local.reserve(buckets, 800, 60)
    assert res.degraded and LocalLimiter.owns(res.reservation_id)
    assert local.commit(res.reservation_id, 1300) == -500
    rows = {r.kind: r for r in local.usage(buckets)}
    assert rows[Kind.TOKENS_PER_MINUTE].used == 1300 and rows[Kind.TOKENS_PER_MINUTE].remaining == 0
    assert rows[Kind.REQUESTS_PER_MINUTE].remaining == 0
    with pytest.raises(NotFound):
        local.commit(res.reservation_id, 1)
    with pytest.raises(NotFound):
        local.release("local-unknown")


def test_local_release_and_sweep() -> None:
    clock = FakeClock()
    local = LocalLimiter(clock=clock)
    buckets = key_buckets(Limits(requests_per_minute=1, tokens_per_minute=1000))
    res = local.reserve(buckets, 1000, 60)
    local.release(res.reservation_id)
    res = local.reserve(buckets, 1000, 5)
    with pytest.raises(QuotaExceeded):
        local.reserve(buckets, 1, 5)
    clock.now += 4
    assert local.sweep() == 0
    clock.now += 1
    assert local.sweep() == 1
    assert local.outstanding == 0
    with pytest.raises(NotFound):
        local.commit(res.reservation_id, 0)
    local.reserve(buckets, 1000, 5)
    # Buckets that are full again are forgotten, so memory follows live traffic only.
    clock.now += 120
    local.sweep()
    assert local.usage(buckets)[1].remaining == 1000


def fast_failing_client(port: int) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=0.2, socket_connect_timeout=0.2,
                          retry=Retry(NoBackoff(), 1))


async def test_redis_down_fails_open_to_local_buckets(make_limiter: MakeLimiter, proxy: TcpProxy) -> None:
    client = fast_failing_client(proxy.port)
    try:
        limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=5)}, client=client,
                                  fallback=LocalLimiter(replicas=2), redis_retry_s=0.05, redis_timeout_s=0.2)
        in_redis = await limiter.reserve(SUBJECT, 10)
        assert not in_redis.degraded and not limiter.degraded

        await proxy.stop()
        first = await limiter.reserve(SUBJECT, 10)
        second = await limiter.reserve(SUBJECT, 10)
        assert first.degraded and second.degraded and limiter.degraded
        with pytest.raises(QuotaExceeded):
            await limiter.reserve(SUBJECT, 10)  # this replica's share: 5 // 2
        usage = await limiter.usage(SUBJECT)
        assert usage.degraded and usage.rows[0].limit == 2 and usage.rows[0].remaining == 0
        # A Redis reservation cannot be settled while Redis is away; it will expire and be refunded.
        with pytest.raises(Unavailable):
            await limiter.commit(in_redis.reservation_id, 5)
        assert await limiter.commit(first.reservation_id, 5) == 5
        assert await limiter.sweep_expired() == 0  # Redis down: the sweep skips it without failing

        await proxy.start()
        await asyncio.sleep(0.06)
        back = await limiter.reserve(SUBJECT, 10)
        assert not back.degraded and not limiter.degraded
        assert await limiter.commit(in_redis.reservation_id, 5) == 5
        await limiter.release(second.reservation_id)  # local reservations stay settleable
    finally:
        await client.aclose()


async def test_without_fallback_redis_down_is_unavailable(make_limiter: MakeLimiter) -> None:
    client = fast_failing_client(free_port())
    try:
        limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=5)}, client=client)
        with pytest.raises(Unavailable) as info:
            await limiter.reserve(SUBJECT, 10)
        assert info.value.reason == "UNAVAILABLE"
        with pytest.raises(Unavailable):
            await limiter.usage(SUBJECT)
        with pytest.raises(NotFound):
            await limiter.release("local-x")  # a local id with no fallback: nothing to find
    finally:
        await client.aclose()


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never answers: a hung Redis."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_hung_redis_times_out_into_the_fallback(make_limiter: MakeLimiter, silent_port: int) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=silent_port, retry=Retry(NoBackoff(), 0))
    try:
        limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=5)}, client=client,
                                  fallback=LocalLimiter(), redis_timeout_s=0.1, redis_retry_s=10)
        loop = asyncio.get_running_loop()
        start = loop.time()
        res = await limiter.reserve(SUBJECT, 1)
        assert res.degraded and loop.time() - start < 0.5
        # Inside the retry window Redis is not tried at all.
        start = loop.time()
        await limiter.reserve(SUBJECT, 1)
        assert loop.time() - start < 0.05
    finally:
        await client.aclose()


async def test_caller_deadline_shorter_than_redis_timeout(make_limiter: MakeLimiter, silent_port: int) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=silent_port, retry=Retry(NoBackoff(), 0))
    try:
        limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=5)}, client=client,
                                  fallback=LocalLimiter(), redis_timeout_s=5)
        with pytest.raises(DeadlineExceeded):
            await limiter.reserve(SUBJECT, 1, deadline=Deadline.after(0.1))
        assert not limiter.degraded  # the caller ran out of time; Redis is not blamed
    finally:
        await client.aclose()


def test_local_charge_after_the_bucket_was_pruned() -> None:
    clock = FakeClock()
    local = LocalLimiter(clock=clock)
    buckets = key_buckets(Limits(tokens_per_minute=1000))
    res = local.reserve(buckets, 100, 600)
    clock.now += 60
    local.sweep()  # full again: forgotten
    assert local.commit(res.reservation_id, 600) == -500
    assert local.usage(buckets)[0].remaining == 500


# -- budgets while Redis is down ---------------------------------------------------------------

DAY_MS = 86_400_000
NOON = 1_741_953_600.0  # 2025-03-14 12:00:00 UTC


def team_budget(daily: int) -> list[BudgetLine]:
    return budget_lines_for([Level(Scope.TEAM, "t1", Limits(), Budgets(daily_nano_usd=daily))])


def test_local_budget_share_starts_from_the_spend_last_seen_in_redis() -> None:
    local = LocalLimiter(replicas=2, clock=FakeClock(), wall_clock=lambda: NOON)
    lines = team_budget(10_000)
    window = window_at(Period.DAILY, int(NOON * 1000))
    local.observe(lines[0], window, 6_000)  # Redis said: 6,000 in use today
    # This replica's share of what is left: (10,000 - 6,000) // 2 = 2,000.
    first = local.reserve([], 1, 60, lines, 1_500)
    assert first.degraded and not first.prefer_cheaper
    with pytest.raises(QuotaExceeded) as info:
        local.reserve([], 1, 60, lines, 501)
    err = info.value
    assert err.reason == "BUDGET_EXHAUSTED" and [v.subject for v in err.violations] == ["team:t1"]
    assert "while the rate limit store is unavailable" in err.violations[0].description
    assert err.retry_after_s == 12 * 3600  # UTC midnight
    # 6,000 + 2 x 2,000 would reach 10,000 >= 95 %: the cheaper tier is advised.
    assert local.reserve([], 1, 60, lines, 500).prefer_cheaper
    local.commit(first.reservation_id, 1, 1_200)
    [row] = local.usage([], lines)
    assert (row.limit, row.used, row.reserved) == (10_000, 6_000 + 1_200 + 500, 500)
    assert local.take_unsynced() == [((Scope.TEAM, "t1", Period.DAILY, window.window_id), 1_200, window.end_ms)]
    assert local.take_unsynced() == []


def test_local_budget_without_a_redis_figure_is_limit_over_replicas() -> None:
    local = LocalLimiter(replicas=4, clock=FakeClock(), wall_clock=lambda: NOON)
    lines = team_budget(10_000)
    local.reserve([], 1, 60, lines, 2_500)
    with pytest.raises(QuotaExceeded):
        local.reserve([], 1, 60, lines, 0)  # at this replica's 100 %


def test_local_idempotent_reserve() -> None:
    local = LocalLimiter(clock=FakeClock())
    buckets = key_buckets(Limits(requests_per_minute=2))
    a = local.reserve(buckets, 1, 60, request_key="k1:r1")
    b = local.reserve(buckets, 1, 60, request_key="k1:r1")
    assert b.reservation_id == a.reservation_id and b.replayed and not a.replayed
    local.reserve(buckets, 1, 60, request_key="k1:r2")  # the second slot: r1 took only one
    local.release(a.reservation_id)


async def test_budget_spend_made_while_redis_was_down_is_written_back(make_limiter: MakeLimiter,
                                                                      proxy: TcpProxy) -> None:
    client = fast_failing_client(proxy.port)
    try:
        limiter, _ = make_limiter(budgets={(Scope.TEAM, "t1"): Budgets(daily_nano_usd=10_000)}, client=client,
                                  fallback=LocalLimiter(replicas=2), redis_retry_s=0.05, redis_timeout_s=0.2)
        r = await limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=4_000)
        await limiter.commit(r.reservation_id, 1, actual_cost_nano_usd=4_000)  # Redis: 4,000 spent

        await proxy.stop()
        local = await limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=3_000)  # share: 6,000 // 2
        assert local.degraded
        with pytest.raises(QuotaExceeded):
            await limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=1)
        await limiter.commit(local.reservation_id, 1, actual_cost_nano_usd=2_500)
        usage = await limiter.usage(SUBJECT)
        assert usage.degraded and usage.rows[0].used == 6_500

        await proxy.start()
        await asyncio.sleep(0.06)
        await limiter.sweep_expired()  # the sweeper's tick writes the local spend back
        usage = await limiter.usage(SUBJECT)
        assert not usage.degraded
        assert (usage.rows[0].used, usage.rows[0].reserved) == (6_500, 0)
        await limiter.sweep_expired()
        assert (await limiter.usage(SUBJECT)).rows[0].used == 6_500  # written once
    finally:
        await client.aclose()
