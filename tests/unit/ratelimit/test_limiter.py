"""The Redis limiter against a real Redis (keys isolated under the test's prefix)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, InvalidArgument, NotFound, QuotaExceeded
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Kind, Limits, Scope, StaticLimitStore, Subject

MakeLimiter = Callable[..., tuple[Limiter, StaticLimitStore]]

SUBJECT = Subject(org_id="o1", team_id="t1", key_id="k1")


def tpm(n: int) -> Limits:
    return Limits(tokens_per_minute=n)


def rpm(n: int) -> Limits:
    return Limits(requests_per_minute=n)


async def remaining(limiter: Limiter, subject: Subject, scope: Scope, kind: Kind) -> int:
    usage = await limiter.usage(subject)
    return next(r.remaining for r in usage.rows if r.scope is scope and r.kind is kind)


async def test_admits_under_limit(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(1000)})
    before = time.time()
    res = await limiter.reserve(SUBJECT, 400)
    assert res.reservation_id and not res.degraded
    # Default TTL; expiry is on Redis's clock, which is this host's here.
    assert before + 119 <= res.expires_at <= time.time() + 121
    assert await remaining(limiter, SUBJECT, Scope.KEY, Kind.TOKENS_PER_MINUTE) in range(600, 602)


async def test_rejects_over_limit_naming_level_and_retry_after(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(1200)})
    await limiter.reserve(SUBJECT, 1000)
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 400)
    err = info.value
    assert [v.subject for v in err.violations] == ["key:k1"]
    assert err.violations[0].description == "tokens_per_minute limit 1200 exceeded"
    # 200 tokens short at 20 tokens/s: about 10 s.
    assert 9.0 < err.retry_after_s <= 10.0


async def test_refills_over_time(make_limiter: MakeLimiter) -> None:
    # 60,000 per minute = 1,000 per second: a 300-token shortfall refills in 0.3 s.
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(60_000)})
    await limiter.reserve(SUBJECT, 60_000)
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 300)
    assert 0.2 < info.value.retry_after_s <= 0.3
    await asyncio.sleep(info.value.retry_after_s + 0.02)
    await limiter.reserve(SUBJECT, 300)


async def test_request_limit_refills(make_limiter: MakeLimiter) -> None:
    # 600 per minute = one request per 0.1 s; reserve until the bucket is empty.
    limiter, _ = make_limiter({(Scope.KEY, "k1"): rpm(600)})
    admitted = 0
    with pytest.raises(QuotaExceeded) as info:
        for _ in range(1000):
            await limiter.reserve(SUBJECT, 1_000_000)
            admitted += 1
    assert admitted >= 600
    assert info.value.violations[0].description == "requests_per_minute limit 600 exceeded"
    assert 0 < info.value.retry_after_s <= 0.1
    await asyncio.sleep(info.value.retry_after_s + 0.02)
    await limiter.reserve(SUBJECT, 1)


async def test_commit_refunds_unused_tokens(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=10, tokens_per_minute=1000)})
    res = await limiter.reserve(SUBJECT, 800)
    assert await limiter.commit(res.reservation_id, 300) == 500
    assert await remaining(limiter, SUBJECT, Scope.KEY, Kind.TOKENS_PER_MINUTE) in range(700, 703)
    # The request slot is spent, not refunded.
    assert await remaining(limiter, SUBJECT, Scope.KEY, Kind.REQUESTS_PER_MINUTE) == 9
    await limiter.reserve(SUBJECT, 650)


async def test_commit_refund_is_capped_at_capacity(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(60_000)})
    res = await limiter.reserve(SUBJECT, 100)
    await asyncio.sleep(0.2)  # 200 tokens refilled: the bucket is full again
    assert await limiter.commit(res.reservation_id, 0) == 100
    usage = await limiter.usage(SUBJECT)
    assert usage.rows[0].remaining == 60_000 and usage.rows[0].used == 0


async def test_commit_charges_extra_and_bucket_goes_negative(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(1200)})
    res = await limiter.reserve(SUBJECT, 500)
    assert await limiter.commit(res.reservation_id, 1700) == -1200
    usage = await limiter.usage(SUBJECT)
    row = usage.rows[0]
    assert row.remaining == 0 and row.used > 1200  # about 1700: overshoot is visible
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 1)
    # About -500 tokens at 20/s: ~25 s until one token is back.
    assert 24 < info.value.retry_after_s <= 25.1


async def test_release_refunds_tokens_and_request(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=1, tokens_per_minute=1000)})
    res = await limiter.reserve(SUBJECT, 900)
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 10)
    assert {v.description for v in info.value.violations} == {"requests_per_minute limit 1 exceeded"}
    await limiter.release(res.reservation_id)
    await limiter.reserve(SUBJECT, 1000)


async def test_unknown_or_settled_reservation_is_not_found(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(1000)})
    with pytest.raises(NotFound):
        await limiter.commit("nope", 1)
    with pytest.raises(NotFound):
        await limiter.release("nope")
    res = await limiter.reserve(SUBJECT, 500)
    assert await limiter.commit(res.reservation_id, 0) == 500
    # Never refunded twice, whichever way the second settle comes.
    with pytest.raises(NotFound):
        await limiter.commit(res.reservation_id, 0)
    with pytest.raises(NotFound):
        await limiter.release(res.reservation_id)
    assert await remaining(limiter, SUBJECT, Scope.KEY, Kind.TOKENS_PER_MINUTE) == 1000


async def test_concurrent_settles_refund_once(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(60_000)})
    await limiter.reserve(SUBJECT, 50_000)
    res = await limiter.reserve(SUBJECT, 10_000)
    results = await asyncio.gather(*(limiter.release(res.reservation_id) for _ in range(10)),
                                   return_exceptions=True)
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, NotFound) for r in results if r is not None)
    # One refund of 10,000 (plus whatever refilled meanwhile), not ten.
    assert await remaining(limiter, SUBJECT, Scope.KEY, Kind.TOKENS_PER_MINUTE) < 12_000


async def test_sweep_refunds_expired_reservations(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): Limits(requests_per_minute=2, tokens_per_minute=1000)})
    res = await limiter.reserve(SUBJECT, 1000, ttl_s=0.2)
    with pytest.raises(QuotaExceeded):
        await limiter.reserve(SUBJECT, 1000)
    assert await limiter.sweep_expired() == 0  # not expired yet
    await asyncio.sleep(0.3)
    assert await limiter.sweep_expired() == 1
    assert await limiter.sweep_expired() == 0
    await limiter.reserve(SUBJECT, 1000)
    with pytest.raises(NotFound):
        await limiter.commit(res.reservation_id, 10)


async def test_sweep_leaves_live_reservations(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(1000)})
    short = await limiter.reserve(SUBJECT, 300, ttl_s=0.1)
    long = await limiter.reserve(SUBJECT, 300, ttl_s=60)
    await asyncio.sleep(0.2)
    assert await limiter.sweep_expired() == 1
    with pytest.raises(NotFound):
        await limiter.release(short.reservation_id)
    assert await limiter.commit(long.reservation_id, 100) == 200


async def test_two_replicas_sweeping_refund_each_reservation_once(make_limiter: MakeLimiter) -> None:
    a, _ = make_limiter({(Scope.KEY, "k1"): tpm(60_000)})
    b, _ = make_limiter({(Scope.KEY, "k1"): tpm(60_000)})
    for _ in range(30):
        await a.reserve(SUBJECT, 100, ttl_s=0.05)
    await asyncio.sleep(0.1)
    counts = await asyncio.gather(*(r.sweep_expired(batch=4) for r in (a, b, a, b)))
    assert sum(counts) == 30


async def test_all_or_nothing_across_levels(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(10_000), (Scope.TEAM, "t1"): tpm(1000)})
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 2000)
    assert [v.subject for v in info.value.violations] == ["team:t1"]
    assert info.value.violations[0].description == "tokens_per_minute limit 1000 is below this request's 2000 tokens"
    # The key had room but was not debited.
    assert await remaining(limiter, SUBJECT, Scope.KEY, Kind.TOKENS_PER_MINUTE) == 10_000
    await limiter.reserve(SUBJECT, 900)
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 500)
    assert [v.subject for v in info.value.violations] == ["team:t1"]
    assert await remaining(limiter, SUBJECT, Scope.KEY, Kind.TOKENS_PER_MINUTE) in range(9100, 9103)


async def test_every_failing_level_is_reported_with_the_longest_wait(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({
        (Scope.KEY, "k1"): rpm(1),
        (Scope.ORG, "o1"): tpm(600),
        (Scope.GLOBAL, "*"): Limits(tokens_per_minute=100_000),
    })
    await limiter.reserve(SUBJECT, 600)
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 300)
    assert sorted(v.subject for v in info.value.violations) == ["key:k1", "org:o1"]
    # key: one request per 60 s; org: 300 tokens at 10/s = 30 s. All must fit: the longer wait.
    assert 59 < info.value.retry_after_s <= 60


async def test_client_ip_and_global_levels(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.CLIENT_IP, "*"): rpm(1), (Scope.GLOBAL, ""): rpm(3)})
    a = Subject("o1", "t1", "k1", client_ip="10.0.0.1")
    b = Subject("o1", "t1", "k1", client_ip="10.0.0.2")
    await limiter.reserve(a, 10)
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(a, 10)
    assert [v.subject for v in info.value.violations] == ["client_ip:10.0.0.1"]
    await limiter.reserve(b, 10)
    await limiter.reserve(SUBJECT, 10)  # no client IP: only the global limit
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 10)
    assert [v.subject for v in info.value.violations] == ["global"]


async def test_key_default_applies_only_without_a_row(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "vip"): Limits()}, key_default=rpm(1))
    await limiter.reserve(SUBJECT, 1)
    with pytest.raises(QuotaExceeded):
        await limiter.reserve(SUBJECT, 1)
    vip = Subject("o1", "t1", "vip")
    for _ in range(5):
        await limiter.reserve(vip, 1)  # an all-zero row means unlimited, not "use the default"


async def test_unlimited_subject_still_gets_a_settleable_reservation(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter()
    res = await limiter.reserve(SUBJECT, 5000)
    assert (await limiter.usage(SUBJECT)).rows == []
    assert await limiter.commit(res.reservation_id, 1000) == 4000
    with pytest.raises(NotFound):
        await limiter.release(res.reservation_id)


async def test_lowered_limit_takes_effect_at_once(make_limiter: MakeLimiter) -> None:
    limiter, store = make_limiter({(Scope.KEY, "k1"): tpm(10_000)})
    await limiter.reserve(SUBJECT, 100)
    store.set_rows({(Scope.KEY, "k1"): tpm(500)})
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 600)
    assert info.value.violations[0].description == "tokens_per_minute limit 500 is below this request's 600 tokens"
    await limiter.reserve(SUBJECT, 500)  # the fuller bucket is capped at the new capacity


async def test_usage_reports_every_limited_level(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({
        (Scope.KEY, "k1"): Limits(requests_per_minute=10, tokens_per_minute=1000),
        (Scope.ORG, "o1"): Limits(tokens_per_day=86_400),
    })
    await limiter.reserve(SUBJECT, 200)
    usage = await limiter.usage(SUBJECT)
    assert not usage.degraded
    got = {(r.scope, r.scope_id, r.kind): (r.limit, r.used, r.remaining) for r in usage.rows}
    assert set(got) == {(Scope.KEY, "k1", Kind.REQUESTS_PER_MINUTE), (Scope.KEY, "k1", Kind.TOKENS_PER_MINUTE),
                        (Scope.ORG, "o1", Kind.TOKENS_PER_DAY)}
    assert got[(Scope.KEY, "k1", Kind.REQUESTS_PER_MINUTE)] == (10, 1, 9)
    limit, used, left = got[(Scope.KEY, "k1", Kind.TOKENS_PER_MINUTE)]
    assert limit == 1000 and used + left == 1000 and 198 <= used <= 200
    limit, used, left = got[(Scope.ORG, "o1", Kind.TOKENS_PER_DAY)]
    assert (limit, used, left) == (86_400, 200, 86_200)


async def test_concurrent_reserves_never_exceed_the_limit(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(10_000)})
    results = await asyncio.gather(*(limiter.reserve(SUBJECT, 500) for _ in range(64)), return_exceptions=True)
    admitted = [r for r in results if not isinstance(r, BaseException)]
    rejected = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, QuotaExceeded) for r in rejected)
    # 20 x 500 = 10,000; refill during the test is a few tokens, far from another 500.
    assert len(admitted) == 20
    assert len({r.reservation_id for r in admitted}) == 20


async def test_concurrent_reserves_from_two_replicas(make_limiter: MakeLimiter, redis_url: str) -> None:
    other = aioredis.Redis.from_url(redis_url)
    try:
        a, _ = make_limiter({(Scope.TEAM, "t1"): tpm(10_000)})
        b, _ = make_limiter({(Scope.TEAM, "t1"): tpm(10_000)}, client=other)
        calls = [(a if i % 2 else b).reserve(Subject("o1", "t1", f"k{i}"), 300) for i in range(64)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert sum(not isinstance(r, BaseException) for r in results) == 33  # floor(10,000 / 300)
    finally:
        await other.aclose()


async def test_keys_live_under_the_prefix_and_expire(make_limiter: MakeLimiter, redis_client: aioredis.Redis,
                                                      redis_prefix: str) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(1000)})
    res = await limiter.reserve(SUBJECT, 100)
    bucket = f"{redis_prefix}rl:tb:key:k1:tpm"
    assert await redis_client.exists(bucket, f"{redis_prefix}rl:r:{res.reservation_id}", f"{redis_prefix}rl:exp") == 3
    # Idle buckets vanish about when they would be full again (100 tokens at ~16.7/s = 6 s).
    assert 5_000 < await redis_client.pttl(bucket) <= 7_100


async def test_rejects_bad_arguments(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter(max_ttl_s=60)
    with pytest.raises(InvalidArgument):
        await limiter.reserve(SUBJECT, 0)
    with pytest.raises(InvalidArgument):
        await limiter.reserve(SUBJECT, 1, ttl_s=61)
    with pytest.raises(InvalidArgument):
        await limiter.commit("x", -1)


async def test_expired_caller_deadline_is_deadline_exceeded(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(1000)})
    with pytest.raises(DeadlineExceeded):
        await limiter.reserve(SUBJECT, 1, deadline=Deadline.after(0.001))
    res = await limiter.reserve(SUBJECT, 1, deadline=Deadline.after(2.0))
    assert await limiter.commit(res.reservation_id, 1, deadline=Deadline.after(2.0)) == 0


async def test_scripts_are_loaded_when_redis_does_not_know_them(make_limiter: MakeLimiter,
                                                               redis_client: aioredis.Redis,
                                                               redis_prefix: str) -> None:
    # A script text no Redis has seen (its clock key is this test's): the first reserve meets
    # NOSCRIPT, loads it and goes on.
    import hashlib

    from services.ratelimit import lua

    scripts = lua.build(lua.key_clock(f"{redis_prefix}clock"))
    await redis_client.set(f"{redis_prefix}clock", 1_700_000_000_000)
    sha = hashlib.sha1(scripts.reserve.encode()).hexdigest()
    assert await redis_client.script_exists(sha) == [False]
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(1000)}, scripts=scripts)
    res = await limiter.reserve(SUBJECT, 100)
    assert res.expires_at == 1_700_000_000 + 120
    assert await redis_client.script_exists(sha) == [True]


async def test_concurrent_calls_share_a_bounded_set_of_connections(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter({(Scope.KEY, "k1"): tpm(1_000_000)})
    results = await asyncio.gather(*(limiter.reserve(SUBJECT, 10) for _ in range(200)))
    assert len({r.reservation_id for r in results}) == 200
    # Callers beyond the cap waited for a free connection instead of opening more.
    assert limiter._connections._made <= 32  # private, but the cap is the point of this test
    await asyncio.gather(*(limiter.commit(r.reservation_id, 5) for r in results))
    assert await remaining(limiter, SUBJECT, Scope.KEY, Kind.TOKENS_PER_MINUTE) >= 1_000_000 - 1_000


async def test_draw_script_never_refuses_stops_at_zero_and_gives_back(redis_client: aioredis.Redis,
                                                                      redis_prefix: str) -> None:
    # The write-back of the fallback's admissions (Limiter._write_back_draws), on a clock the test sets.
    from services.ratelimit import lua

    clock = f"{redis_prefix}clock"
    await redis_client.set(clock, 1_700_000_000_000)
    draw = redis_client.register_script(lua.build(lua.key_clock(clock)).draw)
    fresh, low, negative, full = (f"{redis_prefix}rl:tb:key:{k}:rpm" for k in ("fresh", "low", "negative", "full"))
    await redis_client.set(low, "3 1700000000000 10 60000")
    await redis_client.set(negative, "-5 1700000000000 10 60000")

    async def level(key: str) -> float | None:
        raw = await redis_client.get(key)
        return None if raw is None else float(raw.split()[0])

    # A missing bucket is full (capacity 10): 4 drawn leaves 6; 7 from 3 stops at 0; a level commits
    # took below zero stays; a refund to a missing (full) bucket is a no-op.
    assert await draw(keys=[fresh, low, negative, full], args=[10, 60_000, 4, 10, 60_000, 7, 10, 60_000, 2,
                                                               10, 60_000, -3]) == 4
    assert [await level(k) for k in (fresh, low, negative, full)] == [6, 0, -5, None]
    assert 0 < await redis_client.pttl(low) <= 60_000 + 1000  # expires once full again
    # 30 s later: refilled by 5; a refund is capped at the capacity, the stored one (20) winning.
    await redis_client.set(clock, 1_700_000_030_000)
    await redis_client.set(full, "0 1700000030000 20 60000")
    await draw(keys=[low, full], args=[10, 60_000, -100, 10, 60_000, -7])
    assert [await level(low), await level(full)] == [10, 7]
