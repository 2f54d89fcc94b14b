"""gRPC CacheService: validate, translate protobuf <-> domain, call the ResponseCache."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2
from tollgate.cache.v1 import cache_pb2, cache_pb2_grpc
from tollgate.common.v1 import common_pb2

from libs.chat import (
    MAX_PRICE_NANO_USD_PER_MTOK,
    messages_from_proto,
    params_from_proto,
    usage_from_proto,
    usage_to_proto,
    validate_messages,
    validate_params,
)
from libs.deadlines import Deadline
from libs.errors import Violations
from libs.validation import check_finite, check_name, check_no_nul
from services.cache.cache import ResponseCache
from services.cache.domain import (
    CacheHit,
    CacheKey,
    InvalidationScope,
    LookupOptions,
    Namespace,
    NamespaceStats,
    TierKind,
    TokenPrice,
)
from services.cache.settings import CacheSettings

# Hard caps on what a request may carry (entries over max_entry_bytes are accepted but not stored).
MAX_CONTENT_CHARS = 1_048_576
# Token counts of one generation (the limiter's max_estimated_tokens); with prices capped at
# MAX_PRICE_NANO_USD_PER_MTOK, saved_nano_usd = price x tokens / 1e6 stays inside Redis's 64-bit counters.
MAX_USAGE_TOKENS = 10_000_000

_TIER_TO_PROTO = {TierKind.EXACT: common_pb2.CACHE_TIER_EXACT, TierKind.SEMANTIC: common_pb2.CACHE_TIER_SEMANTIC}


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: ResponseCache, settings: CacheSettings):
        self._cache = cache
        self._settings = settings

    async def Lookup(self, request: cache_pb2.LookupRequest,
                     context: grpc.aio.ServicerContext) -> cache_pb2.LookupResponse:
        v = Violations()
        self._check_key(request.key, v)
        check_finite(v, request.semantic_threshold, "semantic_threshold")
        v.check(0.0 <= request.semantic_threshold < 1.0, "semantic_threshold", "must be in [0, 1) (0: the default)")
        pr = request.price
        for name in ("input_nano_usd_per_mtok", "output_nano_usd_per_mtok", "cached_input_nano_usd_per_mtok"):
            v.check(0 <= getattr(pr, name) <= MAX_PRICE_NANO_USD_PER_MTOK, f"price.{name}",
                    f"must be between 0 and {MAX_PRICE_NANO_USD_PER_MTOK}")
        v.raise_if_any()
        price = TokenPrice(pr.input_nano_usd_per_mtok, pr.output_nano_usd_per_mtok,
                           pr.cached_input_nano_usd_per_mtok) if request.HasField("price") else None
        options = LookupOptions(exact_only=request.exact_only, max_age_s=float(request.max_age_seconds),
                                allow_stale=request.allow_stale, semantic_threshold=request.semantic_threshold or None,
                                price=price)
        hit = await self._cache.lookup(_key_from_proto(request.key), options, self._deadline(context))
        if hit is None:
            return cache_pb2.LookupResponse(tier=common_pb2.CACHE_TIER_MISS)
        return _hit_to_proto(hit)

    async def Store(self, request: cache_pb2.StoreRequest,
                    context: grpc.aio.ServicerContext) -> cache_pb2.StoreResponse:
        v = Violations()
        self._check_key(request.key, v)
        v.check(bool(request.content.strip()), "content", "must not be empty")
        v.check(len(request.content) <= MAX_CONTENT_CHARS, "content", f"at most {MAX_CONTENT_CHARS} characters")
        check_no_nul(v, request.content, "content")
        for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
            v.check(getattr(request.usage, name) <= MAX_USAGE_TOKENS, f"usage.{name}",
                    f"must be at most {MAX_USAGE_TOKENS}")
        v.check(request.ttl_seconds <= self._settings.max_ttl_s, "ttl_seconds",
                f"must be at most {self._settings.max_ttl_s} (0 means the default)")
        v.raise_if_any()
        entry_id = await self._cache.store(_key_from_proto(request.key), request.content,
                                           usage_from_proto(request.usage), request.ttl_seconds,
                                           self._deadline(context))
        # An empty entry_id tells the caller the response was not worth storing (too large).
        return cache_pb2.StoreResponse(entry_id=entry_id or "")

    async def Invalidate(self, request: cache_pb2.InvalidateRequest,
                         context: grpc.aio.ServicerContext) -> cache_pb2.InvalidateResponse:
        v = Violations()
        # Required: an empty tenant must not read as "every tenant".
        self._check_id(request.tenant_id, "tenant_id", v, required=True, strict=True)
        self._check_id(request.model_class, "model_class", v)
        self._check_id(request.prompt_version, "prompt_version", v)
        v.raise_if_any()
        scope = InvalidationScope(request.tenant_id, request.model_class or None, request.prompt_version or None)
        removed = await self._cache.invalidate(scope, self._deadline(context, self._settings.invalidate_timeout_s))
        return cache_pb2.InvalidateResponse(removed_entries=removed)

    async def GetStats(self, request: cache_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> cache_pb2.GetStatsResponse:
        v = Violations()
        # Empty tenant_id: the counters summed over every tenant.
        self._check_id(request.tenant_id, "tenant_id", v, strict=True)
        v.check(not request.per_namespace or bool(request.tenant_id), "per_namespace", "needs tenant_id")
        v.raise_if_any()
        s = await self._cache.stats(request.tenant_id, self._deadline(context), per_namespace=request.per_namespace)
        return cache_pb2.GetStatsResponse(
            exact_hits=s.exact_hits, semantic_hits=s.semantic_hits, misses=s.misses, stores=s.stores,
            degraded=s.degraded, degraded_detail=s.degraded_detail, exact_misses=s.exact_misses,
            semantic_misses=s.semantic_misses, semantic_rejections=s.semantic_rejections,
            saved_nano_usd=s.saved_nano_usd,
            namespaces=[_namespace_stats_to_proto(n) for n in s.namespaces])

    # --- helpers ---
    def _deadline(self, context: grpc.aio.ServicerContext, timeout_s: float | None = None) -> Deadline:
        timeout = timeout_s or self._settings.request_timeout_s
        return Deadline.from_remaining(context.time_remaining(), default_s=timeout, max_s=timeout)

    def _check_id(self, value: str, field: str, v: Violations, *, required: bool = False,
                  strict: bool = False) -> None:
        """Bounded length; ``strict`` ids (tenant, model) must also be printable and trimmed, so that
        two spellings of one tenant cannot split (or a stray space silently empty) its cache."""
        limit = self._settings.max_id_chars
        if not value:
            v.check(not required, field, "is required")
        elif len(value) > limit:
            v.add(field, f"must be at most {limit} characters")
        elif strict and (not value.isprintable() or value != value.strip()):
            v.add(field, "must be printable, without leading or trailing whitespace")
        else:
            check_name(v, value, field, max_chars=limit)  # no control characters in any id

    def _check_key(self, key: cache_pb2.CacheKeyInput, v: Violations) -> None:
        ns = key.namespace
        self._check_id(ns.tenant_id, "key.namespace.tenant_id", v, required=True, strict=True)
        self._check_id(ns.model_class, "key.namespace.model_class", v)
        self._check_id(ns.system_prompt_hash, "key.namespace.system_prompt_hash", v)
        self._check_id(ns.prompt_version, "key.namespace.prompt_version", v)
        self._check_id(key.model, "key.model", v, required=True, strict=True)
        validate_messages(key.messages, v, field_prefix="key.messages")
        validate_params(key.params, v, field_prefix="key.params")


def _key_from_proto(key: cache_pb2.CacheKeyInput) -> CacheKey:
    ns = key.namespace
    return CacheKey(
        namespace=Namespace(ns.tenant_id, ns.model_class, ns.system_prompt_hash, ns.prompt_version),
        model=key.model,
        messages=tuple(messages_from_proto(key.messages)),
        params=params_from_proto(key.params),
    )


def _namespace_stats_to_proto(n: NamespaceStats) -> cache_pb2.NamespaceStats:
    ns, c = n.namespace, n.counts
    return cache_pb2.NamespaceStats(
        namespace=cache_pb2.CacheNamespace(tenant_id=ns.tenant_id, model_class=ns.model_class,
                                           system_prompt_hash=ns.system_prompt_hash, prompt_version=ns.prompt_version),
        **{f: c.get(f, 0) for f in _NS_COUNTERS})


_NS_COUNTERS = tuple(f.name for f in cache_pb2.NamespaceStats.DESCRIPTOR.fields if f.name != "namespace")


def _hit_to_proto(hit: CacheHit) -> cache_pb2.LookupResponse:
    stored_at = timestamp_pb2.Timestamp()
    stored_at.FromNanoseconds(int(hit.stored_at * 1e9))
    return cache_pb2.LookupResponse(tier=_TIER_TO_PROTO[hit.tier], content=hit.content, usage=usage_to_proto(hit.usage),
                                    model=hit.model, entry_id=hit.entry_id, similarity=hit.similarity,
                                    stale=hit.stale, stored_at=stored_at)
