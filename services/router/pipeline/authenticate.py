"""Stage 1, authenticate: bearer token -> :class:`KeyRecord`, or UNAUTHENTICATED. Fails closed.

The servicer calls it before anything else (admin RPCs too). Known keys never wait on PostgreSQL
(issue 24): a verified key is fresh for ``cache_ttl_s`` (``TOLLGATE_ROUTER_KEY_CACHE_TTL_S``, 0.5 s by
default); after that it is still answered from memory at once (stale-while-revalidate) and one
background re-read per key refreshes it. A refresh that finds the key revoked, expired or gone updates
the cache, so the next request is refused (revocation latency without the broadcast: the TTL plus one
re-read); a refresh that fails is logged and keeps the entry, for at most ``stale_ttl_s`` after the last
successful read. A revocation heard on the broadcast is refused at once, whatever is cached. A key not in
the cache waits for PostgreSQL at most ``lookup_timeout_s`` (``TOLLGATE_ROUTER_KEY_LOOKUP_TIMEOUT_S``,
0.5 s), then UNAVAILABLE: it fails closed.

Unauthenticated callers cannot make a router grow or hammer PostgreSQL (issue 14): both key caches are
bounded LRUs with a TTL, and a source (client IP) that caused ``failures_per_window`` failed lookups is
refused (RESOURCE_EXHAUSTED with a retry-after) for tokens this router has not verified lately, before
any query. Keys it verified keep working from that source, so a tenant behind the same NAT as an
attacker is not locked out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from cachetools import TTLCache

from libs.errors import QuotaExceeded, QuotaViolation, Unauthenticated, Unavailable
from libs.log_throttle import ThrottledLog
from services.router.control.keys import KEY_PREFIX, KeyRecord, hash_key

log = logging.getLogger(__name__)

# A background re-read of a known key gives up after this long (PostgreSQL hung); the entry stays stale.
REFRESH_TIMEOUT_S = 5.0

def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing authorization metadata (expected 'Bearer tg-…')")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(KEY_PREFIX):
        raise Unauthenticated("authorization must be 'Bearer tg-…'")
    return token


class KeyLookup(Protocol):
    async def find_by_hash(self, key_hash: bytes) -> KeyRecord | None: ...


class TooManyAuthFailures(QuotaExceeded):
    """A source (client IP) failed authentication too often: refused before any database query."""

    reason = "TOO_MANY_AUTH_FAILURES"


@dataclass(frozen=True)
class AuthLimits:
    """Bounds on what unauthenticated callers can make a router remember or query.

    Positive entries live ``stale_ttl_s`` (fresh for ``cache_ttl_s``, then only the fallback while
    PostgreSQL is down); negative entries live ``cache_ttl_s``. Both caches are LRU: a flood of random
    tokens evicts the oldest entries instead of growing the process.
    """

    cache_max_keys: int = 10_000
    negative_cache_max_keys: int = 10_000
    # Failed lookups (unknown, revoked or expired key) a source may cause per window before its unknown
    # tokens are refused without a query; the sources tracked are an LRU of ``failure_max_sources``.
    failures_per_window: int = 20
    failure_window_s: float = 60.0
    failure_max_sources: int = 10_000


class Authenticator:
    """Bearer token -> KeyRecord. Fails closed: no valid key, no service."""

    def __init__(self, lookup: KeyLookup, *, cache_ttl_s: float, stale_ttl_s: float = 300.0,
                 lookup_timeout_s: float = 0.5, limits: AuthLimits = AuthLimits(),
                 clock: Callable[[], float] = time.monotonic):
        # Per-request fallbacks: one line per reason per 10 s, with the count held back.
        self._throttled = ThrottledLog(log)
        self._lookup = lookup
        self._ttl = cache_ttl_s
        self._lookup_timeout = lookup_timeout_s
        # key hash -> its background re-read: one flight per key, however many requests found it stale.
        self._refreshing: dict[bytes, asyncio.Task[None]] = {}
        # While PostgreSQL is down, keys seen recently keep working this long (DESIGN: auth from the key cache).
        self._stale_ttl = stale_ttl_s
        self._limits = limits
        self._clock = clock
        # key hash -> (when read, record). Kept for the stale fallback; fresh while younger than cache_ttl_s.
        self._known: TTLCache[bytes, tuple[float, KeyRecord]] = TTLCache(
            limits.cache_max_keys, max(stale_ttl_s, cache_ttl_s), timer=clock)
        # key hash -> when PostgreSQL said "no such key". Never used as a fallback, so it lives cache_ttl_s.
        self._unknown: TTLCache[bytes, float] = TTLCache(limits.negative_cache_max_keys, cache_ttl_s, timer=clock)
        # source -> [window start, failed lookups in the window]; the entry expires with its window.
        self._failures: TTLCache[str, list[float]] = TTLCache(
            limits.failure_max_sources, limits.failure_window_s, timer=clock)
        # key_id -> when the revocation was heard. Checked on every request, so a lookup that raced the
        # revoking transaction (and cached the old row) or the stale fallback cannot bring the key back.
        # After ``keep`` every cached row of the key has been re-read from PostgreSQL (which says revoked).
        keep = stale_ttl_s + cache_ttl_s + 60.0
        self._revoked: TTLCache[str, float] = TTLCache(100_000, keep, timer=clock)

    @property
    def cached_keys(self) -> int:
        """Entries held in the key caches, positive and negative (tests and metrics)."""
        return len(self._known) + len(self._unknown)

    @property
    def tracked_sources(self) -> int:
        return len(self._failures)

    @property
    def refreshing(self) -> int:
        """Background re-reads in flight (tests and metrics)."""
        return len(self._refreshing)

    async def settle(self) -> None:
        """Wait for the background re-reads in flight (tests; shutdown)."""
        while self._refreshing:
            await asyncio.gather(*self._refreshing.values(), return_exceptions=True)

    def forget(self, key_hash: bytes | None = None) -> None:
        if key_hash is None:
            self._known.clear()
            self._unknown.clear()
        else:
            self._known.pop(key_hash, None)
            self._unknown.pop(key_hash, None)

    def expire_all(self) -> None:
        """Revocations may have been missed (the revocation channel was just (re)subscribed): every cached key
        is re-read from PostgreSQL on its next use, in the background as when its fresh period ends. Unlike
        ``forget()`` this keeps the records, so a Redis restart while PostgreSQL is down costs no request its
        key; a revocation missed meanwhile takes effect once the re-read answers (one request later)."""
        self._unknown.clear()
        stale_at = self._clock() - self._ttl
        for key_hash, (cached_at, record) in list(self._known.items()):
            self._known[key_hash] = (min(cached_at, stale_at), record)

    def revoked(self, key_id: str) -> None:
        """A key was revoked (heard on the revocation channel): reject it from now on, whatever is cached."""
        self._revoked[key_id] = self._clock()
        for key_hash, (cached_at, record) in list(self._known.items()):
            if record.key_id == key_id:
                # Kept as a revoked row rather than dropped, so the stale fallback (PostgreSQL down) says so too.
                self._known[key_hash] = (cached_at, dataclasses.replace(record, revoked=True))

    async def authenticate(self, authorization: str | None, source: str = "") -> KeyRecord:
        """``source`` is the caller's address (client IP): failed lookups are limited per source."""
        key_hash = hash_key(_bearer_token(authorization))
        now = self._clock()
        cached = self._known.get(key_hash)
        if cached is not None:
            record = cached[1]
            if now - cached[0] >= self._ttl:
                # Past its fresh period: answered from memory now, re-read in the background.
                self._refresh_later(key_hash, source)
        elif key_hash in self._unknown:
            raise Unauthenticated("unknown key")
        else:
            record = await self._read(key_hash, source, now)
        if record.revoked or record.key_id in self._revoked:
            raise Unauthenticated("key revoked")
        if record.expires_at is not None and record.expires_at <= datetime.now(UTC):
            raise Unauthenticated("key expired")
        return record

    async def _read(self, key_hash: bytes, source: str, now: float) -> KeyRecord:
        """The row of a key this router has not verified lately, waiting at most ``lookup_timeout_s``."""
        # Such a token is a guess until PostgreSQL says otherwise, so it is charged to its source BEFORE the
        # query: concurrent guesses cannot all pass the check while their lookups are in flight. A valid key
        # gets its charge back.
        self._refuse_if_failing(source, now)
        self._failed(source, now)
        try:
            async with asyncio.timeout(self._lookup_timeout):
                found = await self._lookup.find_by_hash(key_hash)
        except (Unavailable, TimeoutError):
            self._refund(source)
            raise Unavailable("cannot verify the key right now (control plane unavailable)") from None
        self._store(key_hash, found, now)
        if found is None:
            raise Unauthenticated("unknown key")
        if self._valid(found):
            self._refund(source)
        return found

    def _store(self, key_hash: bytes, found: KeyRecord | None, now: float) -> None:
        if found is None:
            self._unknown[key_hash] = now
            self._known.pop(key_hash, None)
        else:
            self._known[key_hash] = (now, found)

    def _refresh_later(self, key_hash: bytes, source: str) -> None:
        if key_hash in self._refreshing:
            return  # one flight per key
        task = asyncio.get_running_loop().create_task(self._refresh(key_hash, source), name="key-refresh")
        self._refreshing[key_hash] = task
        task.add_done_callback(lambda _: self._refreshing.pop(key_hash, None))

    async def _refresh(self, key_hash: bytes, source: str) -> None:
        """Re-read a known key. What PostgreSQL says replaces the entry (revoked, expired or gone: the next
        request is refused, and the source that used it is charged a failure, as for any failed lookup).
        A failure keeps the entry, which expires ``stale_ttl_s`` after its last successful read."""
        cached = self._known.get(key_hash)
        key_id = cached[1].key_id if cached is not None else "?"
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT_S):
                found = await self._lookup.find_by_hash(key_hash)
        except (Unavailable, TimeoutError) as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            self._throttled.warning(f"reread:{reason}", "key %s not re-read (%s); serving the cached entry",
                                    key_id, reason)
            return
        except Exception:
            log.exception("key %s not re-read; serving the cached entry", key_id)
            return
        now = self._clock()
        self._store(key_hash, found, now)
        if found is None or not self._valid(found):
            self._failed(source, now)

    def _valid(self, record: KeyRecord) -> bool:
        return not (record.revoked or record.key_id in self._revoked
                    or (record.expires_at is not None and record.expires_at <= datetime.now(UTC)))

    def _failed(self, source: str, now: float) -> None:
        window = self._failures.get(source)
        if window is None:
            self._failures[source] = [now, 1.0]
        else:
            # Mutated in place: re-setting the entry would restart its TTL, so the window would never end.
            window[1] += 1

    def _refund(self, source: str) -> None:
        window = self._failures.get(source)
        if window is not None:
            window[1] = max(0.0, window[1] - 1)

    def _refuse_if_failing(self, source: str, now: float) -> None:
        window = self._failures.get(source)
        if window is None or window[1] < self._limits.failures_per_window:
            return
        retry_after = max(0.001, window[0] + self._limits.failure_window_s - now)
        raise TooManyAuthFailures(
            f"too many failed authentications from this address; retry in {retry_after:.0f}s",
            [QuotaViolation("client_ip", f"more than {self._limits.failures_per_window} failed authentications "
                                         f"in {self._limits.failure_window_s:g}s")],
            retry_after)
