"""The exact tier: a response stored under the hash of its normalized request.

Redis key layout (``P`` = the mesh's key prefix, ``T`` = the percent-encoded tenant id)::

    P cache:{T}:x:<key hash>     entry: a compact JSON record; Redis TTL = ttl + stale window
    P cache:{T}:ns:<ns id>       zset per (model_class, prompt_version): key hashes, score = retained-until (ms)
    P cache:{T}:nsreg            zset of the tenant's namespaces: JSON [model_class, prompt_version]
    P cache:{T}:claims           set of index zsets taken by an invalidation still being applied
    P cache:{T}:stats            hash of counters (exact_hits, misses, stores, ...)
    P cache:{T}:nss:<ns id>      the same counters for one namespace (all four fields)
    P cache:{T}:nssreg           hash: namespace id -> JSON [model_class, system_prompt_hash, prompt_version]
    P cache:stats                the same counters summed over tenants

Invalidation walks the index instead of SCANning: SCAN cost grows with the whole
keyspace (shared with the rest of the mesh), the index only with the tenant's live
entries. Each index is trimmed of dead members on every store and expires with its
longest-lived entry, so it stays bounded without a sweeper. The ``{T}`` hash tag keeps
a tenant's keys in one Redis Cluster slot, so the Lua scripts below stay legal there.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import quote

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from libs.chat import TokenUsage, stable_hash
from services.cache.domain import (
    CacheHit,
    CacheKey,
    InvalidationScope,
    LookupOptions,
    Namespace,
    NewEntry,
    TierHealth,
    TierKind,
    staleness,
)
from services.cache.keys import exact_entry_id, exact_key

log = logging.getLogger(__name__)

# Errors that mean "Redis cannot be reached" (fail over), as opposed to a command error.
BACKEND_DOWN: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,  # includes the builtin ConnectionError and TimeoutError
)

_RECORD_VERSION = 1


@dataclass(frozen=True)
class ExactRecord:
    """What an exact entry holds. Wall-clock seconds since the epoch."""

    content: str
    usage: TokenUsage
    model: str
    stored_at: float
    expires_at: float

    def encode(self) -> bytes:
        u = self.usage
        return json.dumps(
            [_RECORD_VERSION, self.content, u.input_tokens, u.output_tokens, u.cached_input_tokens,
             self.model, round(self.stored_at, 3), round(self.expires_at, 3)],
            ensure_ascii=False, separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> ExactRecord:
        """Raises ValueError for anything this version did not write."""
        try:
            version, content, inp, out, cached, model, stored_at, expires_at = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError("malformed cache record") from exc
        if version != _RECORD_VERSION:
            raise ValueError(f"unknown cache record version {version!r}")
        return cls(str(content), TokenUsage(int(inp), int(out), int(cached)), str(model),
                   float(stored_at), float(expires_at))


class ExactStore(Protocol):
    """Backend of the exact tier. ``tenant_id`` "" in read_stats means all tenants."""

    async def get(self, tenant_id: str, key_hash: str) -> ExactRecord | None:
        """The retained record under the key, fresh or not."""
        ...

    async def put(self, namespace: Namespace, key_hash: str, record: ExactRecord, retain_s: float) -> None:
        """Store, retained for ``retain_s`` from ``record.stored_at`` (TTL plus stale window)."""
        ...

    async def invalidate(self, scope: InvalidationScope) -> int:
        """Remove the scope's entries; returns how many existed."""
        ...

    async def incr_stats(self, tenant_id: str, counts: Mapping[str, int], namespace: Namespace | None = None) -> None:
        """Add to the tenant's (and the all-tenant) counters, and to the namespace's when given."""
        ...

    async def read_stats(self, tenant_id: str) -> dict[str, int]: ...

    async def read_namespace_stats(self, tenant_id: str) -> list[tuple[Namespace, dict[str, int]]]: ...

    async def ping(self) -> None:
        """Raise one of BACKEND_DOWN when the backend cannot be reached."""
        ...

    def health(self) -> TierHealth: ...


def _text(value: object) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise ValueError(f"unexpected redis reply type {type(value).__name__}")


def namespace_stats_id(ns: Namespace) -> str:
    return stable_hash("nsstats", ns.model_class, ns.system_prompt_hash, ns.prompt_version)[:16]


def _ns_member(model_class: str, prompt_version: str) -> str:
    return json.dumps([model_class, prompt_version], ensure_ascii=False, separators=(",", ":"))


# KEYS: entry, namespace index, namespace registry
# ARGV: record, retain ms, retained-until ms, now ms, key hash, namespace member
_STORE_LUA = """
local retain = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', retain)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
redis.call('ZADD', KEYS[3], 'GT', ARGV[3], ARGV[6])
for i = 2, 3 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. ARGV[4])
  if redis.call('PTTL', KEYS[i]) < retain then redis.call('PEXPIRE', KEYS[i], retain) end
end
return 1
"""

# Atomically take a namespace's index away from concurrent stores: entries stored before
# this are in the claimed set and get removed; entries stored after start a fresh index.
# KEYS: namespace index, namespace registry, claim, the tenant's open claims; ARGV: namespace member, claim TTL ms
_CLAIM_LUA = """
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], KEYS[3])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
return 1
"""

# A claim left behind by a crash mid-invalidation is finished by the tenant's next
# invalidation; it must not live forever if there is none.
_CLAIM_TTL_MS = 3_600_000
_UNLINK_BATCH = 500


class RedisExactStore:
    """Exact entries, their namespace index and per-tenant counters in Redis."""

    def __init__(self, client: Redis, prefix: str):
        self._r = client
        self._prefix = prefix
        self._store_script = client.register_script(_STORE_LUA)
        self._claim_script = client.register_script(_CLAIM_LUA)

    # --- key layout ---
    def _tenant_base(self, tenant_id: str) -> str:
        # Percent-encoding keeps ':', '{', '}' and glob characters out of the layout, injectively.
        return f"{self._prefix}cache:{{{quote(tenant_id, safe='')}}}"

    def entry_key(self, tenant_id: str, key_hash: str) -> str:
        return f"{self._tenant_base(tenant_id)}:x:{key_hash}"

    def _ns_key(self, tenant_id: str, model_class: str, prompt_version: str) -> str:
        return f"{self._tenant_base(tenant_id)}:ns:{stable_hash(model_class, prompt_version)[:16]}"

    def _registry_key(self, tenant_id: str) -> str:
        return f"{self._tenant_base(tenant_id)}:nsreg"

    def _claims_key(self, tenant_id: str) -> str:
        return f"{self._tenant_base(tenant_id)}:claims"

    def _stats_key(self, tenant_id: str) -> str:
        return f"{self._tenant_base(tenant_id)}:stats" if tenant_id else f"{self._prefix}cache:stats"

    def _ns_stats_key(self, tenant_id: str, ns_id: str) -> str:
        return f"{self._tenant_base(tenant_id)}:nss:{ns_id}"

    def _ns_stats_registry(self, tenant_id: str) -> str:
        return f"{self._tenant_base(tenant_id)}:nssreg"

    # --- ExactStore ---
    async def get(self, tenant_id: str, key_hash: str) -> ExactRecord | None:
        raw = await self._r.get(self.entry_key(tenant_id, key_hash))
        if raw is None:
            return None
        try:
            return ExactRecord.decode(raw)
        except ValueError:
            # Written by an incompatible version (or corrupted): a miss, and the slot gets overwritten.
            log.warning("unreadable exact cache record; treating as a miss")
            return None

    async def put(self, namespace: Namespace, key_hash: str, record: ExactRecord, retain_s: float) -> None:
        t = namespace.tenant_id
        retain_ms = max(1, math.ceil(retain_s * 1000))
        now_ms = int(record.stored_at * 1000)
        await self._store_script(
            keys=[self.entry_key(t, key_hash), self._ns_key(t, namespace.model_class, namespace.prompt_version),
                  self._registry_key(t)],
            args=[record.encode(), retain_ms, now_ms + retain_ms, now_ms, key_hash,
                  _ns_member(namespace.model_class, namespace.prompt_version)],
        )

    async def invalidate(self, scope: InvalidationScope) -> int:
        t = scope.tenant_id
        registry = self._registry_key(t)
        for member in await self._r.zrange(registry, 0, -1):
            raw = _text(member)
            try:
                model_class, prompt_version = json.loads(raw)
            except (TypeError, ValueError):
                continue
            if scope.matches(model_class, prompt_version):
                claim = f"{self._tenant_base(t)}:claim:{uuid.uuid4().hex}"
                await self._claim_script(
                    keys=[self._ns_key(t, model_class, prompt_version), registry, claim, self._claims_key(t)],
                    args=[raw, _CLAIM_TTL_MS])
        # Claims left by an earlier call that failed half-way are finished here too.
        removed = 0
        for open_claim in await self._r.smembers(self._claims_key(t)):
            name = _text(open_claim)
            # Members leave the claim only after their entries are gone, so after a failure the next
            # call resumes where this one stopped (UNLINK counts existing keys only: no double counting).
            while batch := cast(list[bytes], await self._r.zrange(name, 0, _UNLINK_BATCH - 1)):
                removed += int(await self._r.unlink(*(self.entry_key(t, _text(m)) for m in batch)))
                await self._r.zrem(name, *batch)
            await self._r.srem(self._claims_key(t), name)
        return removed

    async def incr_stats(self, tenant_id: str, counts: Mapping[str, int], namespace: Namespace | None = None) -> None:
        if not counts:
            return
        pipe = self._r.pipeline(transaction=False)
        keys = [self._stats_key(tenant_id), self._stats_key("")]
        if namespace is not None:
            ns_id = namespace_stats_id(namespace)
            keys.append(self._ns_stats_key(tenant_id, ns_id))
            pipe.hsetnx(self._ns_stats_registry(tenant_id), ns_id, json.dumps(
                [namespace.model_class, namespace.system_prompt_hash, namespace.prompt_version],
                ensure_ascii=False, separators=(",", ":")))
        for key in keys:
            for name, n in counts.items():
                pipe.hincrby(key, name, n)
        await pipe.execute()

    async def read_namespace_stats(self, tenant_id: str) -> list[tuple[Namespace, dict[str, int]]]:
        registry = await self._r.hgetall(self._ns_stats_registry(tenant_id))
        out = []
        for ns_id, raw in sorted(registry.items()):
            try:
                model_class, sp_hash, prompt_version = json.loads(_text(raw))
            except (TypeError, ValueError):
                continue
            counts = await self._r.hgetall(self._ns_stats_key(tenant_id, _text(ns_id)))
            out.append((Namespace(tenant_id, str(model_class), str(sp_hash), str(prompt_version)),
                        {_text(k): int(v) for k, v in counts.items()}))
        return out

    async def read_stats(self, tenant_id: str) -> dict[str, int]:
        raw = await self._r.hgetall(self._stats_key(tenant_id))
        return {_text(k): int(v) for k, v in raw.items()}

    async def ping(self) -> None:
        await self._r.ping()

    def health(self) -> TierHealth:
        return TierHealth()


class ExactTier:
    """The exact tier over any :class:`ExactStore` (Redis, the local LRU, or the failover of both)."""

    kind = TierKind.EXACT

    def __init__(self, store: ExactStore, *, stale_window_s: float):
        self._store = store
        self._stale_window_s = stale_window_s

    async def lookup(self, key: CacheKey, options: LookupOptions, now: float) -> CacheHit | None:
        key_hash = exact_key(key)
        record = await self._store.get(key.namespace.tenant_id, key_hash)
        if record is None:
            return None
        stale = staleness(record.stored_at, record.expires_at, now, options)
        if stale is None:
            return None
        return CacheHit(tier=TierKind.EXACT, entry_id=exact_entry_id(key_hash), content=record.content,
                        usage=record.usage, model=record.model, stored_at=record.stored_at,
                        expires_at=record.expires_at, stale=stale, similarity=1.0)

    async def store(self, key: CacheKey, entry: NewEntry, now: float) -> str:
        key_hash = exact_key(key)
        record = ExactRecord(content=entry.content, usage=entry.usage, model=key.model,
                             stored_at=now, expires_at=now + entry.ttl_s)
        await self._store.put(key.namespace, key_hash, record, entry.ttl_s + self._stale_window_s)
        return exact_entry_id(key_hash)

    async def invalidate(self, scope: InvalidationScope) -> int:
        return await self._store.invalidate(scope)

    def health(self) -> TierHealth:
        return self._store.health()
