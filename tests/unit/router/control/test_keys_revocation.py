"""Authenticator.revoked(): what a revocation broadcast does inside one router."""

from __future__ import annotations

import asyncio

import pytest

from libs.chat import Principal
from libs.errors import Unauthenticated, Unavailable
from services.router.control.keys import HASH_ALGORITHM, HASH_RATIONALE, KeyRecord, hash_key, new_key
from services.router.pipeline.authenticate import Authenticator


def _record(key_id: str, revoked: bool = False) -> KeyRecord:
    return KeyRecord(key_id, Principal("o", "t", key_id), "member", (), None, revoked)


class Lookup:
    def __init__(self) -> None:
        self.rows: dict[bytes, KeyRecord] = {}
        self.down = False
        self.gate: asyncio.Event | None = None
        self.calls = 0

    async def find_by_hash(self, key_hash: bytes) -> KeyRecord | None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise Unavailable("db down")
        return self.rows.get(key_hash)


async def test_broadcast_revokes_only_that_key_in_a_long_lived_cache() -> None:
    lookup = Lookup()
    a, b = new_key(), new_key()
    lookup.rows[hash_key(a)] = _record("ka")
    lookup.rows[hash_key(b)] = _record("kb")
    auth = Authenticator(lookup, cache_ttl_s=3600)
    await auth.authenticate(f"Bearer {a}")
    await auth.authenticate(f"Bearer {b}")
    assert lookup.calls == 2
    auth.revoked("ka")
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.authenticate(f"Bearer {a}")
    assert (await auth.authenticate(f"Bearer {b}")).key_id == "kb"
    assert lookup.calls == 2  # both answered from the cache, ka as revoked


async def test_a_lookup_that_raced_the_revocation_cannot_bring_the_key_back() -> None:
    # The lookup read the row before the revoking transaction committed, and returns after the broadcast.
    lookup = Lookup()
    key = new_key()
    lookup.rows[hash_key(key)] = _record("k")
    lookup.gate = asyncio.Event()
    auth = Authenticator(lookup, cache_ttl_s=3600)
    racing = asyncio.create_task(auth.authenticate(f"Bearer {key}"))
    await asyncio.sleep(0.01)
    auth.revoked("k")
    lookup.gate.set()
    with pytest.raises(Unauthenticated, match="revoked"):
        await racing
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.authenticate(f"Bearer {key}")


async def test_revocation_holds_while_the_database_is_down() -> None:
    # Without PostgreSQL the stale cache would keep serving the key for minutes; the broadcast overrides it.
    lookup = Lookup()
    key = new_key()
    lookup.rows[hash_key(key)] = _record("k")
    auth = Authenticator(lookup, cache_ttl_s=0, stale_ttl_s=600)
    await auth.authenticate(f"Bearer {key}")
    lookup.down = True
    assert (await auth.authenticate(f"Bearer {key}")).key_id == "k"  # stale fallback works...
    auth.revoked("k")
    with pytest.raises(Unauthenticated, match="revoked"):  # ...but not for a revoked key
        await auth.authenticate(f"Bearer {key}")


async def test_errors_never_echo_the_key() -> None:
    lookup = Lookup()
    key = new_key()
    auth = Authenticator(lookup, cache_ttl_s=1)
    for header in (f"Bearer {key}", f"Basic {key}", key):
        with pytest.raises(Unauthenticated) as err:
            await auth.authenticate(header)
        assert key not in str(err.value) and key[3:] not in str(err.value)


def test_the_hash_is_named_and_explained() -> None:
    assert HASH_ALGORITHM == "sha256"
    assert "SHA-256" in HASH_RATIONALE and "256 bits" in HASH_RATIONALE and "brute force" in HASH_RATIONALE
