"""Issue 14: a flood of bad bearer tokens neither grows the key cache nor reaches PostgreSQL unbounded.

The key caches are LRU + TTL (cachetools.TTLCache), and a source (client IP) that caused
``failures_per_window`` failed lookups gets RESOURCE_EXHAUSTED (QuotaExceeded, reason
TOO_MANY_AUTH_FAILURES, with a retry-after) for tokens this router has not verified lately, before
any database query.
"""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from libs.chat import Principal
from libs.errors import QuotaExceeded, Unauthenticated, Unavailable
from services.router.control.keys import KeyRecord, hash_key, new_key
from services.router.pipeline.authenticate import Authenticator, AuthLimits, TooManyAuthFailures

# The numbers the docs quote (services/router/README.md): N failed lookups per source per window.
N_FAILURES = 20
CACHE_BOUND = 1_000
FLOOD = 100_000


class CountingLookup:
    def __init__(self) -> None:
        self.rows: dict[bytes, KeyRecord] = {}
        self.calls = 0
        self.down = False

    async def find_by_hash(self, key_hash: bytes) -> KeyRecord | None:
        self.calls += 1
        if self.down:
            raise Unavailable("db down")
        return self.rows.get(key_hash)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(key_id: str) -> KeyRecord:
    return KeyRecord(key_id, Principal("o", "t", key_id), "member", (), None, False)


def _auth(lookup: CountingLookup, clock: Clock, *, ttl: float = 60.0, **limits: object) -> Authenticator:
    base: dict[str, object] = dict(cache_max_keys=CACHE_BOUND, negative_cache_max_keys=CACHE_BOUND,
                                   failures_per_window=N_FAILURES, failure_window_s=60.0,
                                   failure_max_sources=CACHE_BOUND)
    base.update(limits)
    # These tests count lookups, not time: a generous lookup timeout, so a loop busy with 5,000 concurrent
    # requests under tracemalloc does not time the slow lookups out (the bound is tested in test_authenticate).
    return Authenticator(lookup, cache_ttl_s=ttl, stale_ttl_s=300, limits=AuthLimits(**base),  # type: ignore[arg-type]
                         clock=clock, lookup_timeout_s=30.0)


async def test_100k_distinct_bad_keys_from_one_source_cost_at_most_n_lookups_and_a_bounded_cache() -> None:
    lookup, clock = CountingLookup(), Clock()
    auth = _auth(lookup, clock)
    codes: dict[str, int] = {}
    for i in range(FLOOD):
        try:
            await auth.authenticate(f"Bearer tg-bad-{i}", "203.0.113.7")
        except TooManyAuthFailures as exc:
            assert exc.retry_after_s > 0 and exc.violations[0].subject == "client_ip"
            codes["refused"] = codes.get("refused", 0) + 1
        except Unauthenticated:
            codes["unknown"] = codes.get("unknown", 0) + 1
        assert auth.cached_keys <= 2 * CACHE_BOUND
    assert lookup.calls <= N_FAILURES
    assert codes == {"unknown": N_FAILURES, "refused": FLOOD - N_FAILURES}
    assert auth.cached_keys <= 2 * CACHE_BOUND


async def test_100k_bad_keys_from_100k_sources_keep_every_structure_bounded() -> None:
    # The per-source limit cannot help against many addresses; memory must stay bounded all the same.
    lookup, clock = CountingLookup(), Clock()
    auth = _auth(lookup, clock)
    for i in range(FLOOD):
        with pytest.raises(Unauthenticated):
            await auth.authenticate(f"Bearer tg-bad-{i}", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert lookup.calls == FLOOD
    assert auth.cached_keys <= 2 * CACHE_BOUND
    assert auth.tracked_sources <= CACHE_BOUND


async def test_the_window_ends_and_other_sources_and_verified_keys_are_not_affected() -> None:
    lookup, clock = CountingLookup(), Clock()
    good = new_key()
    lookup.rows[hash_key(good)] = _record("k_good")
    auth = _auth(lookup, clock, ttl=0.5)
    await auth.authenticate(f"Bearer {good}", "203.0.113.7")  # verified before the attack
    for i in range(N_FAILURES):
        with pytest.raises(Unauthenticated):
            await auth.authenticate(f"Bearer tg-bad-{i}", "203.0.113.7")
    with pytest.raises(QuotaExceeded) as err:
        await auth.authenticate("Bearer tg-bad-next", "203.0.113.7")
    assert err.value.reason == "TOO_MANY_AUTH_FAILURES" and 59 < err.value.retry_after_s <= 60
    calls = lookup.calls
    # A key this router verified lately still works from that address (behind the same NAT), even once its
    # fresh period has ended and it is re-read (in the background: issue 24)...
    clock.now += 1
    assert (await auth.authenticate(f"Bearer {good}", "203.0.113.7")).key_id == "k_good"
    await auth.settle()
    assert lookup.calls == calls + 1
    # ...another address is not limited...
    with pytest.raises(Unauthenticated):
        await auth.authenticate("Bearer tg-bad-elsewhere", "198.51.100.1")
    # ...and after the window the source may try again.
    clock.now += 60
    with pytest.raises(Unauthenticated):
        await auth.authenticate("Bearer tg-bad-later", "203.0.113.7")


async def test_a_repeated_bad_key_is_answered_from_the_negative_cache() -> None:
    lookup, clock = CountingLookup(), Clock()
    auth = _auth(lookup, clock, ttl=0.5)
    for _ in range(100):
        with pytest.raises(Unauthenticated):
            await auth.authenticate("Bearer tg-same-bad-key", "203.0.113.7")
    assert lookup.calls == 1
    clock.now += 1  # past the negative TTL: a key created meanwhile is found
    key = "tg-same-bad-key"
    lookup.rows[hash_key(key)] = _record("k_new")
    assert (await auth.authenticate(f"Bearer {key}", "203.0.113.7")).key_id == "k_new"


async def test_the_positive_cache_is_bounded_and_the_stale_fallback_still_works() -> None:
    lookup, clock = CountingLookup(), Clock()
    keys = [new_key() for _ in range(CACHE_BOUND * 2)]
    for i, k in enumerate(keys):
        lookup.rows[hash_key(k)] = _record(f"k{i}")
    auth = _auth(lookup, clock, ttl=0.5)
    for k in keys:
        await auth.authenticate(f"Bearer {k}")
    assert auth.cached_keys <= CACHE_BOUND
    clock.now += 10
    lookup.down = True
    # The most recent keys are still served from the stale cache while PostgreSQL is down.
    assert (await auth.authenticate(f"Bearer {keys[-1]}")).key_id == f"k{len(keys) - 1}"
    with pytest.raises(Unavailable):  # evicted (least recently used): fail closed
        await auth.authenticate(f"Bearer {keys[0]}")


class SlowLookup(CountingLookup):
    """A lookup that takes a while, so many guesses are in flight at once (as against a busy PostgreSQL)."""

    async def find_by_hash(self, key_hash: bytes) -> KeyRecord | None:
        await asyncio.sleep(0.01)
        return await super().find_by_hash(key_hash)


async def test_concurrent_guesses_cannot_all_pass_the_check_while_their_lookups_are_in_flight() -> None:
    # Regression: the failure was counted only after the query returned, so 5,000 concurrent distinct bad
    # keys from one address all passed the check and made 5,000 queries.
    lookup, clock = SlowLookup(), Clock()
    auth = _auth(lookup, clock)
    tracemalloc.start()
    results = await asyncio.gather(*(auth.authenticate(f"Bearer {new_key()}", "198.51.100.9")
                                     for _ in range(5_000)), return_exceptions=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert lookup.calls == N_FAILURES
    assert sum(isinstance(r, TooManyAuthFailures) for r in results) == 5_000 - N_FAILURES
    assert sum(isinstance(r, Unauthenticated) for r in results) == N_FAILURES
    assert auth.cached_keys <= N_FAILURES
    assert peak < 64 * 1024 * 1024, f"peak {peak} bytes"


async def test_a_valid_key_gets_its_charge_back() -> None:
    lookup, clock = CountingLookup(), Clock()
    auth = _auth(lookup, clock, ttl=0.0)
    key = new_key()
    lookup.rows[hash_key(key)] = _record("k1")
    # Many valid verifications (the cache TTL is 0, so each is a query) never add up to a failure.
    for _ in range(N_FAILURES * 3):
        clock.now += 1.0
        auth.forget()
        assert (await auth.authenticate(f"Bearer {key}", "198.51.100.10")).key_id == "k1"
    for _ in range(N_FAILURES - 1):
        with pytest.raises(Unauthenticated):
            await auth.authenticate(f"Bearer {new_key()}", "198.51.100.10")
    auth.forget()
    assert (await auth.authenticate(f"Bearer {key}", "198.51.100.10")).key_id == "k1"
