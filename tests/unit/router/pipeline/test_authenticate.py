"""Authenticator (services/router/pipeline/authenticate.py): known keys never wait on PostgreSQL (issue 24).

The lookup here is a fake PostgreSQL that can hang (an ``asyncio.Event`` that is never set)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from libs.chat import Principal
from libs.errors import Unauthenticated, Unavailable
from services.router.control.keys import KeyRecord, hash_key, new_key
from services.router.pipeline.authenticate import Authenticator


def _record(key_id: str, *, revoked: bool = False, expires_at: datetime | None = None) -> KeyRecord:
    return KeyRecord(key_id, Principal("o", "t", key_id), "member", (), expires_at, revoked)


class HangingLookup:
    """PostgreSQL that answers from ``rows`` while ``open`` is set, and otherwise hangs until it is."""

    def __init__(self) -> None:
        self.rows: dict[bytes, KeyRecord] = {}
        self.open = asyncio.Event()
        self.open.set()
        self.down = False
        self.calls = 0
        self.waiting = 0

    def hang(self) -> None:
        self.open.clear()

    async def find_by_hash(self, key_hash: bytes) -> KeyRecord | None:
        self.calls += 1
        self.waiting += 1
        try:
            await self.open.wait()
        finally:
            self.waiting -= 1
        if self.down:
            raise Unavailable("db down")
        return self.rows.get(key_hash)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _setup(**kw: float) -> tuple[HangingLookup, Clock, Authenticator, str]:
    lookup, clock = HangingLookup(), Clock()
    key = new_key()
    lookup.rows[hash_key(key)] = _record("k1")
    return lookup, clock, Authenticator(lookup, cache_ttl_s=0.5, stale_ttl_s=300, clock=clock, **kw), key


async def test_a_known_key_is_answered_from_memory_while_postgresql_hangs() -> None:
    lookup, clock, auth, key = _setup()
    await auth.authenticate(f"Bearer {key}")
    lookup.hang()
    clock.now += 1  # past the fresh period
    t0 = time.monotonic()
    for _ in range(100):
        assert (await auth.authenticate(f"Bearer {key}")).key_id == "k1"
    assert time.monotonic() - t0 < 0.05  # no request awaited the lookup
    await asyncio.sleep(0)
    assert lookup.calls == 2 and lookup.waiting == 1 and auth.refreshing == 1  # one flight for the key
    lookup.open.set()
    await auth.settle()
    assert auth.refreshing == 0
    await auth.authenticate(f"Bearer {key}")  # fresh again: no new refresh
    await asyncio.sleep(0)
    assert lookup.calls == 2


async def test_one_flight_per_key_but_one_for_each_key() -> None:
    lookup, clock, auth, key = _setup()
    other = new_key()
    lookup.rows[hash_key(other)] = _record("k2")
    await auth.authenticate(f"Bearer {key}")
    await auth.authenticate(f"Bearer {other}")
    lookup.hang()
    clock.now += 1
    await asyncio.gather(*(auth.authenticate(f"Bearer {k}") for k in (key, other) for _ in range(50)))
    await asyncio.sleep(0)
    assert auth.refreshing == 2 and lookup.calls == 4
    lookup.open.set()
    await auth.settle()


@pytest.mark.parametrize("change", ["revoked", "expired", "gone"])
async def test_a_refresh_that_learns_the_key_is_no_longer_valid_refuses_the_next_request(change: str) -> None:
    lookup, clock, auth, key = _setup()
    await auth.authenticate(f"Bearer {key}")
    if change == "gone":
        del lookup.rows[hash_key(key)]
    else:
        past = datetime.now(UTC) - timedelta(seconds=1)
        lookup.rows[hash_key(key)] = (_record("k1", revoked=True) if change == "revoked"
                                      else _record("k1", expires_at=past))
    clock.now += 1
    assert (await auth.authenticate(f"Bearer {key}")).key_id == "k1"  # served stale, refresh started
    await auth.settle()
    with pytest.raises(Unauthenticated):  # bounded by one refresh
        await auth.authenticate(f"Bearer {key}")


async def test_a_failed_refresh_keeps_the_entry_and_logs_no_key(caplog: pytest.LogCaptureFixture) -> None:
    lookup, clock, auth, key = _setup()
    await auth.authenticate(f"Bearer {key}")
    lookup.down = True
    clock.now += 1
    assert (await auth.authenticate(f"Bearer {key}")).key_id == "k1"
    await auth.settle()
    assert (await auth.authenticate(f"Bearer {key}")).key_id == "k1"  # still served, refresh retried
    await auth.settle()
    assert "not re-read" in caplog.text and key not in caplog.text and hash_key(key).hex() not in caplog.text
    clock.now += 301  # past stale_ttl_s since the last successful read: the entry is gone, fail closed
    lookup.hang()
    with pytest.raises(Unavailable):
        await auth.authenticate(f"Bearer {key}")


async def test_a_revocation_is_refused_at_once_whatever_is_cached_or_in_flight() -> None:
    lookup, clock, auth, key = _setup()
    await auth.authenticate(f"Bearer {key}")
    lookup.hang()
    clock.now += 1
    await auth.authenticate(f"Bearer {key}")  # a refresh is now hanging with the old (valid) row
    auth.revoked("k1")
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.authenticate(f"Bearer {key}")
    lookup.open.set()
    await auth.settle()  # the refresh read the old row: it cannot bring the key back
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.authenticate(f"Bearer {key}")


async def test_an_unknown_key_waits_at_most_the_lookup_timeout_then_fails_closed() -> None:
    lookup, _, auth, _ = _setup(lookup_timeout_s=0.05)
    lookup.hang()
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="cannot verify"):
        await auth.authenticate(f"Bearer {new_key()}", "198.51.100.1")
    assert 0.04 < time.monotonic() - t0 < 0.3
    assert lookup.waiting == 0  # the hung lookup was cancelled, not left behind
    assert auth.cached_keys == 0  # nothing cached for the unknown key


async def test_the_default_lookup_timeout_is_half_a_second() -> None:
    lookup, _, auth, _ = _setup()
    lookup.hang()
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        await auth.authenticate(f"Bearer {new_key()}")
    assert 0.45 < time.monotonic() - t0 < 0.8


async def test_expire_all_keeps_keys_served_and_rereads_them_in_the_background() -> None:
    # The revocation channel was resubscribed (Redis restarted) while PostgreSQL hangs: no key is lost.
    lookup, _clock, auth, key = _setup()
    await auth.authenticate(f"Bearer {key}")
    assert lookup.calls == 1
    lookup.hang()
    auth.expire_all()  # within the fresh period, but revocations may have been missed
    assert (await auth.authenticate(f"Bearer {key}")).key_id == "k1"  # served from memory, no wait
    await asyncio.sleep(0)
    assert lookup.calls == 2 and auth.refreshing == 1  # and re-read in the background
    # A revocation missed while unsubscribed takes effect once the re-read answers.
    lookup.rows[hash_key(key)] = _record("k1", revoked=True)
    lookup.open.set()
    await auth.settle()
    with pytest.raises(Unauthenticated):
        await auth.authenticate(f"Bearer {key}")
