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
from services.ratelimit.fallback import LocalLimiter, UnsyncedDraw
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
        limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=7)}, client=client,
                                  fallback=LocalLimiter(replicas=2), redis_retry_s=0.05, redis_timeout_s=0.2)
        in_redis = await limiter.reserve(SUBJECT, 10)
        assert not in_redis.degraded and not limiter.degraded

        await proxy.stop()
        first = await limiter.reserve(SUBJECT, 10)
        second = await limiter.reserve(SUBJECT, 10)
        assert first.degraded and second.degraded and limiter.degraded
        with pytest.raises(QuotaExceeded):
            await limiter.reserve(SUBJECT, 10)  # this replica's share, 7 // 2, less the one Redis admitted
        usage = await limiter.usage(SUBJECT)
        assert usage.degraded and usage.rows[0].limit == 3 and usage.rows[0].remaining == 0
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


# -- carry-over between Redis and the fallback -----------------------------------------------------


def test_shadow_draws_carry_what_redis_admitted_into_the_fallback() -> None:
    clock = FakeClock()
    local = LocalLimiter(clock=clock)
    buckets = key_buckets(Limits(requests_per_minute=10))
    for i in range(11):
        local.shadow_reserve(f"r{i}", local.shadow_plan(buckets), 1, 60)  # the 11th: a shadow never refuses
    # The burst was spent through Redis: the fallback does not hand out a fresh one.
    with pytest.raises(QuotaExceeded) as info:
        local.reserve(buckets, 1, 60)
    assert info.value.retry_after_s == pytest.approx(6.0)  # one request refills in 60 / 10 s
    assert local.usage(buckets)[0].remaining == 0
    # The 11th draw stopped at zero instead of pushing the level below it.
    clock.now += 6.0
    local.reserve(buckets, 1, 60)


def test_shadow_settle_mirrors_refunds_charges_and_releases() -> None:
    clock = FakeClock()
    local = LocalLimiter(clock=clock)
    buckets = key_buckets(Limits(requests_per_minute=10, tokens_per_minute=1000))

    def left() -> tuple[int, int]:
        rows = {r.kind: r.remaining for r in local.usage(buckets)}
        return rows[Kind.REQUESTS_PER_MINUTE], rows[Kind.TOKENS_PER_MINUTE]

    local.shadow_reserve("a", local.shadow_plan(buckets), 600, 60)
    assert left() == (9, 400)
    local.shadow_settle("a", commit=True, actual_tokens=100)
    assert left() == (9, 900)  # unused tokens back; the request slot is kept
    local.shadow_reserve("b", local.shadow_plan(buckets), 800, 60)
    local.shadow_settle("b", commit=False)
    assert left() == (9, 900)  # a release gives everything back
    local.shadow_reserve("c", local.shadow_plan(buckets), 500, 60)
    local.shadow_settle("c", commit=True, actual_tokens=700)
    assert left() == (8, 200)  # charged 200 beyond the estimate
    local.shadow_settle("c", commit=True, actual_tokens=0)  # settled already: nothing happens
    local.shadow_settle("unknown", commit=False)
    assert left() == (8, 200)


def test_shadow_commit_after_a_draw_that_stopped_at_zero() -> None:
    local = LocalLimiter(clock=FakeClock())
    buckets = key_buckets(Limits(tokens_per_minute=1000))
    local.shadow_reserve("a", local.shadow_plan(buckets), 1500, 60)  # Redis admitted more than this share holds
    assert local.usage(buckets)[0].remaining == 0
    local.shadow_settle("a", commit=True, actual_tokens=300)
    # As if 300 had been drawn from the 1,000 there were, not 1,000 given back for 1,500 - 300.
    assert local.usage(buckets)[0].remaining == 700


def test_shadow_expiry_refunds_as_redis_sweep_does() -> None:
    clock = FakeClock()
    local = LocalLimiter(clock=clock)
    buckets = key_buckets(Limits(tokens_per_day=86_400))  # refills 1 token a second
    local.shadow_reserve("a", local.shadow_plan(buckets), 50_000, 5)
    clock.now += 4
    local.sweep()
    assert local.usage(buckets)[0].remaining == 86_400 - 50_000 + 4
    clock.now += 1
    assert local.sweep() == 0  # Redis's sweep counts the refund; this one only mirrors it
    assert local.usage(buckets)[0].remaining == 86_400
    local.shadow_settle("a", commit=True, actual_tokens=50_000)  # too late: already refunded
    assert local.usage(buckets)[0].remaining == 86_400


def test_shadow_draws_against_this_replicas_share() -> None:
    local = LocalLimiter(replicas=4, clock=FakeClock())
    buckets = key_buckets(Limits(tokens_per_minute=4000))
    local.shadow_reserve("a", local.shadow_plan(buckets), 600, 60)  # through this replica: its 1,000 less 600
    with pytest.raises(QuotaExceeded):
        local.reserve(buckets, 401, 60)
    local.reserve(buckets, 400, 60)


def test_shadowing_remembers_at_most_max_buckets() -> None:
    local = LocalLimiter(clock=FakeClock(), max_buckets=1)
    first = key_buckets(Limits(requests_per_minute=2))
    other = buckets_for([Level(Scope.KEY, "k2", Limits(requests_per_minute=2))])
    local.shadow_reserve("a", local.shadow_plan(first), 1, 60)
    local.shadow_reserve("b", local.shadow_plan(other), 1, 60)
    assert local.usage(first)[0].remaining == 1
    assert local.usage(other)[0].remaining == 2  # not remembered: full, like a bucket never seen
    local.shadow_settle("b", commit=False)
    assert local.usage(other)[0].remaining == 2
    local.reserve(other, 1, 60)  # the fallback's own buckets are not capped
    assert local.usage(other)[0].remaining == 1


def test_local_admissions_are_taken_once_for_write_back() -> None:
    clock = FakeClock()
    local = LocalLimiter(clock=clock)
    buckets = key_buckets(Limits(requests_per_minute=10, tokens_per_minute=1000))
    local.shadow_reserve("redis", local.shadow_plan(buckets), 100, 60)
    assert not local.unsynced  # what Redis admitted is Redis's already
    res = local.reserve(buckets, 600, 60)
    local.commit(res.reservation_id, 400)
    assert local.unsynced
    rpm_id, tpm_id = (b.identity for b in buckets)
    draws = local.take_unsynced_draws()
    assert draws == [UnsyncedDraw(rpm_id, 1, 10, 60_000), UnsyncedDraw(tpm_id, 400, 1000, 60_000)]
    assert local.take_unsynced_draws() == [] and not local.unsynced
    local.restore_unsynced_draws(draws)  # the write failed: taken again next time, not lost
    assert local.take_unsynced_draws() == draws


def test_write_back_skips_what_refilled_since() -> None:
    clock = FakeClock()
    local = LocalLimiter(clock=clock)
    buckets = key_buckets(Limits(tokens_per_minute=1000))
    [tpm_id] = [b.identity for b in buckets]
    res = local.reserve(buckets, 600, 60)
    local.commit(res.reservation_id, 600)
    clock.now += 30  # 500 refilled: the bucket is 100 short of full
    assert local.take_unsynced_draws() == [UnsyncedDraw(tpm_id, 100, 1000, 60_000)]
    # A reservation written back while open, committed below its estimate afterwards: the
    # difference is owed back to Redis.
    res = local.reserve(buckets, 500, 60)
    assert local.take_unsynced_draws() == [UnsyncedDraw(tpm_id, 500, 1000, 60_000)]
    local.commit(res.reservation_id, 200)
    assert local.take_unsynced_draws() == [UnsyncedDraw(tpm_id, -300, 1000, 60_000)]
    clock.now += 60
    local.sweep()  # full again and forgotten
    res = local.reserve(buckets, 10, 60)
    local.release(res.reservation_id)
    assert local.take_unsynced_draws() == []  # reserved and released: nothing to write


K2 = Subject("o1", "t1", "k2")


async def redis_level(client: aioredis.Redis, key: str) -> float:
    """The tokens a Redis bucket stored at its last update (no refill since)."""
    raw = await client.get(key)
    assert raw is not None, f"no bucket {key}"
    return float(raw.split()[0])


async def test_a_burst_spent_in_redis_is_not_handed_out_again_by_the_fallback(make_limiter: MakeLimiter,
                                                                            proxy: TcpProxy) -> None:
    client = fast_failing_client(proxy.port)
    try:
        limiter, _ = make_limiter({(Scope.KEY, "*"): Limits(requests_per_minute=10)}, client=client,
                                  fallback=LocalLimiter(), redis_retry_s=0.05, redis_timeout_s=0.2)
        for _ in range(10):
            assert not (await limiter.reserve(SUBJECT, 1)).degraded
        await proxy.stop()
        with pytest.raises(QuotaExceeded):
            await limiter.reserve(SUBJECT, 1)
        assert limiter.degraded  # refused by the fallback, which went on from Redis's level

        # k2 spends its burst in the fallback alone; when Redis returns, Redis learns of it.
        for _ in range(10):
            assert (await limiter.reserve(K2, 1)).degraded
        with pytest.raises(QuotaExceeded):
            await limiter.reserve(K2, 1)
        await proxy.start()
        await asyncio.sleep(0.06)
        with pytest.raises(QuotaExceeded):
            await limiter.reserve(K2, 1)
        assert not limiter.degraded  # Redis refused it
        assert (await limiter.usage(K2)).rows[0].remaining == 0
    finally:
        await client.aclose()


async def test_a_failed_write_back_is_kept_and_written_once(make_limiter: MakeLimiter, proxy: TcpProxy,
                                                            redis_client: aioredis.Redis, redis_prefix: str) -> None:
    client = fast_failing_client(proxy.port)
    try:
        limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(tokens_per_day=100_000)}, client=client,
                                  fallback=LocalLimiter(), redis_retry_s=0.05, redis_timeout_s=0.2)
        await proxy.stop()
        res = await limiter.reserve(SUBJECT, 30_000)
        await limiter.commit(res.reservation_id, 20_000)
        await asyncio.sleep(0.06)
        await limiter.sweep_expired()  # tries Redis, which is still away: the draws are kept
        assert limiter.degraded

        await proxy.start()
        await asyncio.sleep(0.06)
        await limiter.sweep_expired()
        assert not limiter.degraded
        key = f"{redis_prefix}rl:tb:key:k1:tpd"
        # Written back once: 100,000 - 20,000 (stored when written; refill adds about 1.2 tokens a second).
        assert 80_000 <= await redis_level(redis_client, key) < 80_010
        await limiter.sweep_expired()
        await limiter.reserve(SUBJECT, 1)
        assert 79_999 <= await redis_level(redis_client, key) < 80_010  # not again
    finally:
        await client.aclose()


async def test_reserves_wait_for_the_write_back_and_settles_are_mirrored(make_limiter: MakeLimiter,
                                                                         proxy: TcpProxy) -> None:
    client = fast_failing_client(proxy.port)
    try:
        limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=10)}, client=client,
                                  fallback=LocalLimiter(), redis_retry_s=0.05, redis_timeout_s=0.2)
        in_redis = [await limiter.reserve(SUBJECT, 1) for _ in range(4)]
        for r in in_redis[:2]:
            await limiter.release(r.reservation_id)  # mirrored: the fallback gets them back too
        await limiter.commit(in_redis[2].reservation_id, 1)
        await proxy.stop()
        local = [await limiter.reserve(SUBJECT, 1) for _ in range(8)]  # 10 - 2 still held in Redis
        assert all(r.degraded for r in local)
        with pytest.raises(QuotaExceeded):
            await limiter.reserve(SUBJECT, 1)

        await proxy.start()
        await asyncio.sleep(0.06)
        # Concurrent reserves right after Redis returns: none gets in before the write-back lands.
        results = await asyncio.gather(*(limiter.reserve(SUBJECT, 1) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, QuotaExceeded) for r in results), results
        assert not limiter.degraded
    finally:
        await client.aclose()


async def test_write_back_in_batches(make_limiter: MakeLimiter, proxy: TcpProxy, redis_client: aioredis.Redis,
                                     redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.ratelimit import limiter as limiter_module

    monkeypatch.setattr(limiter_module, "_WRITE_BACK_BATCH", 2)
    client = fast_failing_client(proxy.port)
    try:
        limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(10, 60_000, 1_000_000)}, client=client,
                                  budgets={(Scope.TEAM, "t1"): Budgets(daily_nano_usd=10_000)},
                                  fallback=LocalLimiter(), redis_retry_s=0.05, redis_timeout_s=0.2)
        await proxy.stop()
        res = await limiter.reserve(SUBJECT, 30_000, estimated_cost_nano_usd=4_000)
        await limiter.commit(res.reservation_id, 30_000, actual_cost_nano_usd=3_000)
        await proxy.start()
        await asyncio.sleep(0.06)
        await limiter.sweep_expired()
        levels = {kind: await redis_level(redis_client, f"{redis_prefix}rl:tb:key:k1:{kind}")
                  for kind in ("rpm", "tpm", "tpd")}
        assert levels["rpm"] < 9.1 and 30_000 <= levels["tpm"] < 31_000 and 970_000 <= levels["tpd"] < 970_010
        assert (await limiter.usage(SUBJECT)).rows[-1].used == 3_000
    finally:
        await client.aclose()


def test_sweep_looks_at_a_batch_of_shadows_and_buckets_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.ratelimit import fallback

    monkeypatch.setattr(fallback, "SWEEP_BATCH", 2)
    clock = FakeClock()
    local = LocalLimiter(clock=clock)
    keys = [buckets_for([Level(Scope.KEY, f"k{i}", Limits(requests_per_minute=2))]) for i in range(5)]
    for i, buckets in enumerate(keys):
        local.shadow_reserve(f"r{i}", local.shadow_plan(buckets), 1, 5)
    clock.now += 5

    def refunded() -> int:
        return sum(local.usage(b)[0].remaining == 2 for b in keys)

    assert refunded() == 0
    local.sweep()
    assert refunded() == 2  # all expired, two looked at
    local.sweep()
    local.sweep()
    assert refunded() == 5

    local = LocalLimiter(clock=clock)
    for buckets in keys:
        local.reserve(buckets, 1, 60)
    clock.now += 60  # all full again: forgotten two a sweep
    remembered = []
    for _ in range(3):
        local.sweep()
        remembered.append(len(local._buckets))  # private, but forgetting in batches is the point here
    assert remembered == [3, 1, 0]
