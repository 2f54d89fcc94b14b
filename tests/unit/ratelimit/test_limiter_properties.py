"""Property-based tests (hypothesis) of the limiter's arithmetic, against the real Lua in Redis.

- The calendar windows computed in Lua equal Python's (``datetime``) for any instant.
- The integer threshold computed in Lua equals ``ceil(limit * pct / 100)`` for any budget.
- A pure-Python model of the token buckets and budgets, written from the documented rules,
  agrees exactly with the scripts over random sequences of reserve / commit / release /
  time advance / sweep (time is a Redis key the scripts read, so runs are deterministic);
  along the way the invariants are checked directly: no bucket ever holds more than its
  capacity, refunds never create tokens, holds equal the outstanding estimates, committed
  spend equals the sum of committed costs, alerts fire once per threshold and window.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.errors import NotFound, QuotaExceeded
from services.ratelimit import lua
from services.ratelimit.buckets import _ceil_ms
from services.ratelimit.budgets import ALERT_THRESHOLDS_PCT, PREFER_CHEAPER_PCT, WINDOW_KEEP_MS, threshold, window_at
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Budgets, Limits, Period, Scope, StaticLimitStore, Subject
from tests.support.infra import delete_redis_prefix

MIN_MS = 0
MAX_MS = int(datetime(2200, 1, 1, tzinfo=UTC).timestamp() * 1000)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def sync_redis(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


_WINDOW_PROBE = lua.PRELUDE + """
local id, s, e = window(ARGV[1], tonumber(ARGV[2]))
return {id, s, e}
"""
_THRESHOLD_PROBE = lua.PRELUDE + "return fmt(threshold(tonumber(ARGV[1]), tonumber(ARGV[2])))"


@PROPERTY_SETTINGS
@given(unix_ms=st.integers(MIN_MS, MAX_MS), period=st.sampled_from(list(Period)))
def test_lua_calendar_window_equals_python(sync_redis: redis.Redis, unix_ms: int, period: Period) -> None:
    window_id, start, end = sync_redis.eval(_WINDOW_PROBE, 0, period.short, unix_ms)
    expected = window_at(period, unix_ms)
    assert (window_id.decode(), start, end) == (expected.window_id, expected.start_ms, expected.end_ms)
    assert start <= unix_ms < end


@PROPERTY_SETTINGS
@given(limit=st.integers(1, 2**53 - 1), pct=st.integers(1, 100))
def test_lua_threshold_is_exact_integer_ceiling(sync_redis: redis.Redis, limit: int, pct: int) -> None:
    got = int(sync_redis.eval(_THRESHOLD_PROBE, 0, limit, pct))
    assert got == threshold(limit, pct) == -(-limit * pct // 100)
    # The defining property: the smallest spend s with s * 100 >= limit * pct.
    assert got * 100 >= limit * pct > (got - 1) * 100


# -- the model ----------------------------------------------------------------------------------

SUBJECT = Subject("o1", "t1", "k1")
ROWS = {(Scope.KEY, "k1"): Limits(requests_per_minute=5, tokens_per_minute=3_000),
        (Scope.TEAM, "t1"): Limits(tokens_per_day=20_000)}
BUDGETS = {(Scope.TEAM, "t1"): Budgets(daily_nano_usd=5_000), (Scope.ORG, "o1"): Budgets(monthly_nano_usd=20_000)}
# (name, capacity, period ms, counts tokens): key rpm, key tpm, team tpd, in the limiter's order.
BUCKETS = [("key:k1 rpm", 5, 60_000, False), ("key:k1 tpm", 3_000, 60_000, True),
           ("team:t1 tpd", 20_000, 86_400_000, True)]
# (name, period, limit), in the limiter's order (key, team, org).
BUDGET_LINES = [("team:t1", Period.DAILY, 5_000), ("org:o1", Period.MONTHLY, 20_000)]


@dataclass
class ModelBucket:
    tokens: float
    ts: int


@dataclass
class ModelCounter:
    spent: int = 0
    held: int = 0
    alerted: int = 0
    alerted_limit: int | None = None


@dataclass
class ModelReservation:
    rid: str
    tokens: int
    cost: int
    debits: list[tuple[int, int]]  # (bucket index, cost)
    holds: list[tuple[tuple[int, str], int]]  # ((budget index, window id), window end ms)
    expires: int
    advice: bool


@dataclass
class Model:
    """The documented rules, in plain Python with the scripts' floating-point operation order."""

    now: int
    buckets: dict[int, ModelBucket] = field(default_factory=dict)
    counters: dict[tuple[int, str], ModelCounter] = field(default_factory=dict)
    open: dict[str, ModelReservation] = field(default_factory=dict)
    by_request: dict[str, tuple[str, int, bool]] = field(default_factory=dict)
    alerts: list[tuple[str, str, str, int, int]] = field(default_factory=list)

    def level(self, i: int) -> float:
        _, cap, per, _ = BUCKETS[i]
        b = self.buckets.get(i)
        if b is None:
            return float(cap)
        return min(float(cap), b.tokens + max(0, self.now - b.ts) * cap / per)

    def reserve(self, tokens: int, cost: int, ttl_ms: int, request_id: str) -> tuple[str, int, bool] | tuple[
            list[str], int]:
        if request_id and request_id in self.by_request:
            return self.by_request[request_id]
        failed: list[str] = []
        wait = 0
        have = []
        for i, (name, cap, per, counts) in enumerate(BUCKETS):
            c = tokens if counts else 1
            level = self.level(i)
            have.append(level)
            if level < c:
                failed.append(name.split()[0])
                need = per if c > cap else math.ceil((c - level) * per / cap)
                wait = max(wait, need)
        used_after = []
        for j, (name, period, limit) in enumerate(BUDGET_LINES):
            w = window_at(period, self.now)
            counter = self.counters.get((j, w.window_id), ModelCounter())
            used = counter.spent + counter.held
            used_after.append(used + cost)
            if used >= limit or used + cost > limit:
                failed.append(name)
                wait = max(wait, w.end_ms - self.now)
        if failed:
            return failed, wait
        debits = []
        for i, (_, _, _, counts) in enumerate(BUCKETS):
            c = tokens if counts else 1
            self.buckets[i] = ModelBucket(have[i] - c, self.now)
            debits.append((i, c))
        holds = []
        advice = False
        for j, (_, period, limit) in enumerate(BUDGET_LINES):
            w = window_at(period, self.now)
            if cost > 0:
                self.counters.setdefault((j, w.window_id), ModelCounter()).held += cost
            holds.append(((j, w.window_id), w.end_ms))
            advice = advice or used_after[j] >= threshold(limit, PREFER_CHEAPER_PCT)
        rid = uuid.uuid4().hex  # the real id is adopted by the caller
        self.open[rid] = ModelReservation(rid, tokens, cost, debits, holds, self.now + ttl_ms, advice)
        return rid, self.now + ttl_ms, advice

    def adjust(self, i: int, delta: int) -> None:
        _, cap, _, _ = BUCKETS[i]
        if i not in self.buckets and delta > 0:
            return
        tokens = min(float(cap), self.level(i) + delta)
        self.buckets[i] = ModelBucket(tokens, self.now)

    def settle(self, r: ModelReservation, commit: bool, actual: int, actual_cost: int) -> int:
        for i, c in r.debits:
            delta = c
            if commit:
                delta = c - actual if BUCKETS[i][3] else 0
            if delta != 0:
                self.adjust(i, delta)
        for key, end_ms in r.holds:
            counter = self.counters.get(key)
            if r.cost and counter is not None:
                counter.held = max(0, counter.held - r.cost)
            if commit and actual_cost and self.now < end_ms + WINDOW_KEEP_MS:
                counter = self.counters.setdefault(key, ModelCounter())
                counter.spent += actual_cost
                self.alert(key, counter, end_ms)
        return r.tokens - actual if commit else r.tokens

    def alert(self, key: tuple[int, str], counter: ModelCounter, end_ms: int) -> None:
        name, period, limit = BUDGET_LINES[key[0]]
        done = counter.alerted if counter.alerted_limit == limit else 0
        for pct in ALERT_THRESHOLDS_PCT:
            if pct > done and counter.spent >= threshold(limit, pct):
                self.alerts.append((name, period.value, key[1], pct, counter.spent))
                done = pct
        counter.alerted, counter.alerted_limit = done, limit

    def sweep(self) -> int:
        expired = [r for r in self.open.values() if r.expires <= self.now]
        for r in expired:
            del self.open[r.rid]
            self.settle(r, False, 0, 0)
        return len(expired)


reserve_op = st.tuples(st.just("reserve"), st.integers(1, 1_600), st.integers(0, 3_000),
                       st.sampled_from([1_000, 30_000, 600_000]), st.sampled_from(["", "", "r1", "r2"]))
commit_op = st.tuples(st.just("commit"), st.integers(0, 40), st.integers(0, 2_000), st.integers(0, 4_000))
release_op = st.tuples(st.just("release"), st.integers(0, 40))
advance_op = st.tuples(st.just("advance"), st.one_of(st.integers(0, 20_000), st.integers(0, 40 * 86_400_000)))
sweep_op = st.tuples(st.just("sweep"))
OPS = st.lists(st.one_of(reserve_op, reserve_op, commit_op, commit_op, release_op, advance_op, sweep_op),
               min_size=1, max_size=30)
START = st.integers(int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000),
                    int(datetime(2027, 1, 1, tzinfo=UTC).timestamp() * 1000))


async def _run(redis_url: str, prefix: str, start_ms: int, ops: list[tuple[object, ...]]) -> None:
    client = aioredis.Redis.from_url(redis_url)
    clock_key = f"{prefix}clock"
    limiter = Limiter(client, StaticLimitStore(ROWS, budgets=BUDGETS), prefix=prefix, redis_timeout_s=5,
                      scripts=lua.build(lua.key_clock(clock_key)))
    model = Model(now=start_ms)
    ids: list[str] = []  # real reservation ids, by creation order
    try:
        await client.set(clock_key, start_ms)
        for op in ops:
            kind = op[0]
            if kind == "advance":
                model.now += int(op[1])  # type: ignore[call-overload]
                await client.set(clock_key, model.now)
            elif kind == "reserve":
                _, tokens, cost, ttl_ms, request_id = op
                replay = bool(request_id) and request_id in model.by_request
                expected = model.reserve(int(tokens), int(cost), int(ttl_ms), str(request_id))  # type: ignore[call-overload]
                try:
                    got = await limiter.reserve(SUBJECT, int(tokens), estimated_cost_nano_usd=int(cost),  # type: ignore[call-overload]
                                                request_id=str(request_id), ttl_s=int(ttl_ms) / 1000)  # type: ignore[call-overload]
                except QuotaExceeded as exc:
                    assert isinstance(expected[0], list), f"model admitted, scripts refused: {exc}"
                    assert [v.subject for v in exc.violations] == expected[0]
                    assert exc.retry_after_s == _ceil_ms(int(expected[1]) / 1000)
                    continue
                assert not isinstance(expected[0], list), f"scripts admitted, model refused {expected[0]}"
                model_rid, expires, advice = expected  # type: ignore[misc]
                assert (got.expires_at, got.prefer_cheaper, got.replayed) == (int(expires) / 1000, advice, replay)
                if replay:
                    assert got.reservation_id == model_rid
                else:
                    r = model.open.pop(str(model_rid))
                    r.rid = got.reservation_id
                    model.open[r.rid] = r
                    ids.append(r.rid)
                    if request_id:
                        model.by_request[str(request_id)] = (r.rid, int(expires), bool(advice))
            elif kind in ("commit", "release"):
                if not ids:
                    continue
                rid = ids[int(op[1]) % len(ids)]  # type: ignore[call-overload]
                r_model = model.open.pop(rid, None)
                try:
                    if kind == "commit":
                        actual, actual_cost = int(op[2]), int(op[3])  # type: ignore[call-overload]
                        refunded = await limiter.commit(rid, actual, actual_cost_nano_usd=actual_cost)
                        assert r_model is not None, "settled twice"
                        assert refunded == model.settle(r_model, True, actual, actual_cost)
                    else:
                        await limiter.release(rid)
                        assert r_model is not None, "settled twice"
                        model.settle(r_model, False, 0, 0)
                except NotFound:
                    assert r_model is None, "an open reservation was not found"
            elif kind == "sweep":
                assert await limiter.sweep_expired() == model.sweep()
            await _check(limiter, model)
        alerts = [(f[b"scope"].decode() + ":" + f[b"scope_id"].decode(), f[b"period"].decode(),
                   f[b"window"].decode(), int(f[b"threshold_pct"]), int(f[b"spent_nano_usd"]))
                  for _, f in await client.xrange(limiter.alerts_stream)]
        assert alerts == model.alerts
    finally:
        await limiter.aclose()
        await client.aclose()


async def _check(limiter: Limiter, model: Model) -> None:
    usage = await limiter.usage(SUBJECT)
    bucket_rows = [r for r in usage.rows if r.window_start is None]
    budget_rows = [r for r in usage.rows if r.window_start is not None]
    for i, row in enumerate(bucket_rows):
        level = model.level(i)
        cap = BUCKETS[i][1]
        assert level <= cap  # invariant: never more than the capacity, refunds included
        assert row.remaining == max(0, math.floor(level)), (BUCKETS[i][0], row, level)
        assert row.used == max(0, cap - math.floor(level))
    for j, row in enumerate(budget_rows):
        _, period, limit = BUDGET_LINES[j]
        w = window_at(period, model.now)
        counter = model.counters.get((j, w.window_id), ModelCounter())
        # Invariants: holds are exactly the open reservations' estimates in this window; spend
        # is exactly what commits charged to it.
        outstanding = sum(r.cost for r in model.open.values() if any(k == (j, w.window_id) for k, _ in r.holds))
        assert counter.held == outstanding
        assert (row.used, row.reserved) == (counter.spent + counter.held, counter.held)
        assert row.remaining == max(0, limit - row.used)
        assert (row.window_start, row.resets_at) == (w.start_ms / 1000, w.end_ms / 1000)


@PROPERTY_SETTINGS
@given(start_ms=START, ops=OPS)
def test_scripts_agree_with_the_model(redis_url: str, start_ms: int, ops: list[tuple[object, ...]]) -> None:
    prefix = f"tgtest:prop:{uuid.uuid4().hex[:12]}:"

    async def scenario() -> None:
        try:
            await _run(redis_url, prefix, start_ms, ops)
        finally:
            await delete_redis_prefix(redis_url, prefix)

    asyncio.run(scenario())
