"""Keep answering while Redis is down: an in-process LRU and the failover between the two.

While degraded the cache is per-process and small, which is fine for a cache: a
miss costs a generation, never a wrong answer. What must not be lost is an
invalidation issued during the outage, so those are replayed on Redis before it
is used again (entries stored in Redis before the outage would otherwise come back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from redis.exceptions import RedisError

from libs.errors import Unavailable
from services.cache.domain import InvalidationScope, Namespace, TierHealth
from services.cache.exact import BACKEND_DOWN, ExactRecord, ExactStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# Past this many narrowed invalidations per tenant, replay one tenant-wide invalidation
# instead: over-invalidating a cache is safe, an unbounded backlog is not.
_MAX_PENDING_SCOPES_PER_TENANT = 64


# Rough per-entry overhead (dict slot, record, key strings) added to the content's size.
_ENTRY_OVERHEAD_BYTES = 256


@dataclass
class _LocalEntry:
    record: ExactRecord
    retain_until: float
    model_class: str
    prompt_version: str
    size: int


class LocalLruStore:
    """An :class:`ExactStore` in process memory (least recently used go first).

    Bounded by entry count and by approximate bytes: entries may be large, and this
    runs inside the service's own memory budget.
    """

    def __init__(self, max_entries: int, *, max_bytes: int = 64 * 1024 * 1024,
                 clock: Callable[[], float] = time.time):
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _LocalEntry] = OrderedDict()
        self._stats: defaultdict[str, dict[str, int]] = defaultdict(dict)
        self._ns_stats: defaultdict[Namespace, dict[str, int]] = defaultdict(dict)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, tenant_id: str, key_hash: str) -> ExactRecord | None:
        k = (tenant_id, key_hash)
        entry = self._entries.get(k)
        if entry is None:
            return None
        if self._clock() >= entry.retain_until:
            self._drop(k)
            return None
        self._entries.move_to_end(k)
        return entry.record

    async def put(self, namespace: Namespace, key_hash: str, record: ExactRecord, retain_s: float) -> None:
        k = (namespace.tenant_id, key_hash)
        self._drop(k)
        size = len(record.content.encode()) + len(key_hash) + _ENTRY_OVERHEAD_BYTES
        self._entries[k] = _LocalEntry(record, record.stored_at + retain_s, namespace.model_class,
                                       namespace.prompt_version, size)
        self._bytes += size
        while self._entries and (len(self._entries) > self._max or self._bytes > self._max_bytes):
            self._drop(next(iter(self._entries)))

    async def invalidate(self, scope: InvalidationScope) -> int:
        now = self._clock()
        doomed = [k for k, e in self._entries.items()
                  if k[0] == scope.tenant_id and scope.matches(e.model_class, e.prompt_version)]
        removed = 0
        for k in doomed:
            entry = self._drop(k)
            if entry is not None and entry.retain_until > now:
                removed += 1
        return removed

    async def incr_stats(self, tenant_id: str, counts: Mapping[str, int], namespace: Namespace | None = None) -> None:
        self.add_stats(tenant_id, counts)
        if namespace is not None:
            _add(self._ns_stats[namespace], counts)

    def add_stats(self, tenant_id: str, counts: Mapping[str, int]) -> None:
        for scope in (tenant_id, ""):
            _add(self._stats[scope], counts)

    async def read_stats(self, tenant_id: str) -> dict[str, int]:
        return dict(self._stats.get(tenant_id, {}))

    async def read_namespace_stats(self, tenant_id: str) -> list[tuple[Namespace, dict[str, int]]]:
        return [(ns, dict(c)) for ns, c in self._ns_stats.items() if ns.tenant_id == tenant_id]

    async def ping(self) -> None:
        return None

    def health(self) -> TierHealth:
        return TierHealth()

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, k: tuple[str, str]) -> _LocalEntry | None:
        entry = self._entries.pop(k, None)
        if entry is not None:
            self._bytes -= entry.size
        return entry

    def drain_stats(self) -> dict[str, dict[str, int]]:
        """Per-tenant counters gathered so far (not the all-tenant sums), and reset them."""
        drained = {t: c for t, c in self._stats.items() if t and c}
        self._stats.clear()
        return drained

    def drain_namespace_stats(self) -> dict[Namespace, dict[str, int]]:
        drained = {ns: c for ns, c in self._ns_stats.items() if c}
        self._ns_stats.clear()
        return drained


def _add(bucket: dict[str, int], counts: Mapping[str, int]) -> None:
    for name, n in counts.items():
        bucket[name] = bucket.get(name, 0) + n


class FallbackStore:
    """Redis while it answers, the local LRU while it does not; never raises for an unreachable Redis.

    The first connection or timeout error switches to the LRU. From then on requests
    never wait on Redis: at most every ``recheck_s`` a background probe pings it,
    replays what the outage left pending, and switches back.
    """

    def __init__(self, primary: ExactStore, fallback: LocalLruStore, *, recheck_s: float,
                 monotonic: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self._primary = primary
        self._fallback = fallback
        self._recheck_s = recheck_s
        self._monotonic = monotonic
        self._wall = wall
        self._down_since: float | None = None  # wall clock, for the detail
        self._last_error = ""
        self._next_probe = 0.0
        self._probe_task: asyncio.Task[bool] | None = None
        # tenant -> (model_class, prompt_version) scopes to replay; (None, None) is the whole tenant.
        self._pending: dict[str, set[tuple[str | None, str | None]]] = {}

    @property
    def degraded(self) -> bool:
        return self._down_since is not None

    async def start(self) -> None:
        """Find out whether Redis answers before the first request does."""
        try:
            await self._primary.ping()
        except BACKEND_DOWN as exc:
            self._enter_degraded(exc)

    async def aclose(self) -> None:
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def check_now(self) -> bool:
        """Probe Redis now (tests, operators); True when it is in use again."""
        if not self.degraded:
            return True
        return await asyncio.shield(self._probe_task or self._start_probe())

    # --- ExactStore ---
    async def get(self, tenant_id: str, key_hash: str) -> ExactRecord | None:
        return await self._run(lambda s: s.get(tenant_id, key_hash))

    async def put(self, namespace: Namespace, key_hash: str, record: ExactRecord, retain_s: float) -> None:
        await self._run(lambda s: s.put(namespace, key_hash, record, retain_s))

    async def invalidate(self, scope: InvalidationScope) -> int:
        if not self.degraded:
            try:
                return await self._primary.invalidate(scope)
            except BACKEND_DOWN as exc:
                self._enter_degraded(exc)
            except RedisError as exc:
                raise _backend_error(exc) from exc
        self._remember(scope)
        self._maybe_probe()
        return await self._fallback.invalidate(scope)

    async def incr_stats(self, tenant_id: str, counts: Mapping[str, int], namespace: Namespace | None = None) -> None:
        await self._run(lambda s: s.incr_stats(tenant_id, counts, namespace))

    async def read_stats(self, tenant_id: str) -> dict[str, int]:
        return await self._run(lambda s: s.read_stats(tenant_id))

    async def read_namespace_stats(self, tenant_id: str) -> list[tuple[Namespace, dict[str, int]]]:
        return await self._run(lambda s: s.read_namespace_stats(tenant_id))

    async def ping(self) -> None:
        return None

    def health(self) -> TierHealth:
        if self._down_since is None:
            return TierHealth()
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._down_since))
        return TierHealth(True, f"redis unreachable since {since} ({self._last_error}); "
                                f"exact tier served from the in-process LRU ({len(self._fallback)} entries)")

    # --- failover ---
    async def _run(self, op: Callable[[ExactStore], Awaitable[T]]) -> T:
        if not self.degraded:
            try:
                return await op(self._primary)
            except BACKEND_DOWN as exc:
                self._enter_degraded(exc)
            except RedisError as exc:
                # Redis answered with an error (OOM, READONLY, ...): not an outage, but not the caller's fault.
                raise _backend_error(exc) from exc
        self._maybe_probe()
        return await op(self._fallback)

    def _enter_degraded(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"[:200]
        if self._down_since is None:
            self._down_since = self._wall()
            self._next_probe = self._monotonic() + self._recheck_s
            log.warning("redis unreachable (%s); exact tier falls back to the in-process LRU", type(exc).__name__)

    def _maybe_probe(self) -> None:
        if self._probe_task is None and self._monotonic() >= self._next_probe:
            self._start_probe()

    def _start_probe(self) -> asyncio.Task[bool]:
        # One probe at a time, off the request path: the request that triggers it is served by the LRU.
        task = asyncio.create_task(self._probe(), name="cache-redis-probe")
        task.add_done_callback(self._probe_done)
        self._probe_task = task
        return task

    def _probe_done(self, task: asyncio.Task[bool]) -> None:
        if self._probe_task is task:
            self._probe_task = None

    async def _probe(self) -> bool:
        try:
            await self._primary.ping()
            await self._replay()
        except BACKEND_DOWN as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"[:200]
            self._next_probe = self._monotonic() + self._recheck_s
            return False
        except Exception:
            # Never let a probe crash the service; try again later.
            log.exception("redis recovery check failed")
            self._next_probe = self._monotonic() + self._recheck_s
            return False
        # No await between the last replay and the switch, so nothing pending slips through.
        down_for = self._wall() - (self._down_since or self._wall())
        self._fallback.clear()
        self._down_since = None
        log.info("redis reachable again after %.1fs; exact tier back on redis", down_for)
        return True

    def _remember(self, scope: InvalidationScope) -> None:
        scopes = self._pending.setdefault(scope.tenant_id, set())
        if (None, None) in scopes:
            return
        if scope.model_class is None and scope.prompt_version is None:
            scopes.clear()
        scopes.add((scope.model_class, scope.prompt_version))
        if len(scopes) > _MAX_PENDING_SCOPES_PER_TENANT:
            scopes.clear()
            scopes.add((None, None))

    async def _replay(self) -> None:
        """Apply what the outage left pending to Redis; a failure keeps the rest for the next probe.

        Loops until nothing is left, since requests keep arriving (on the LRU) while it awaits.
        """
        while True:
            if self._pending:
                tenant_id, scopes = self._pending.popitem()
                try:
                    while scopes:
                        model_class, prompt_version = next(iter(scopes))
                        await self._primary.invalidate(InvalidationScope(tenant_id, model_class, prompt_version))
                        scopes.discard((model_class, prompt_version))
                finally:
                    for model_class, prompt_version in scopes:
                        self._remember(InvalidationScope(tenant_id, model_class, prompt_version))
                continue
            # The outage's per-namespace breakdown is dropped (its tenant totals are replayed below):
            # replaying both would count the tenant totals twice.
            self._fallback.drain_namespace_stats()
            drained = self._fallback.drain_stats()
            if not drained:
                return
            try:
                while drained:
                    tenant_id, counts = next(iter(drained.items()))
                    await self._primary.incr_stats(tenant_id, counts)
                    del drained[tenant_id]
            finally:
                for tenant_id, counts in drained.items():
                    self._fallback.add_stats(tenant_id, counts)


def _backend_error(exc: RedisError) -> Unavailable:
    return Unavailable(f"cache backend error: {type(exc).__name__}", reason="BACKEND_ERROR")
