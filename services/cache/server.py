"""Cache service process: exact tier (Redis, in-process LRU fallback) then the verified semantic tier."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from tollgate.cache.v1 import cache_pb2, cache_pb2_grpc

from libs.grpc_server import ServiceBinding, run, serve_until_stopped
from libs.settings import load_settings
from services.cache.cache import CacheTier, ResponseCache
from services.cache.domain import CacheKey, Namespace
from services.cache.exact import ExactTier, RedisExactStore
from services.cache.fallback import FallbackStore, LocalLruStore
from services.cache.semantic import SemanticPolicy, SemanticTier, UnavailableTier
from services.cache.servicer import CacheServicer
from services.cache.settings import CacheSettings
from services.cache.vectors import EdgeVectorStore, QdrantClientVectorStore, VectorStore

log = logging.getLogger(__name__)

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


def redis_client(settings: CacheSettings) -> Redis:
    # Short timeouts, and one immediate retry on connection errors only (a pooled connection that
    # Redis closed gets replaced) but none on timeouts: an outage must become a failover quickly,
    # not a pile of waiting requests.
    return Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                          socket_connect_timeout=settings.redis_timeout_s,
                          retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))


async def build(settings: CacheSettings) -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
    """Wire backends, domain and servicer; returns the bindings and an async close."""
    client = redis_client(settings)
    local = LocalLruStore(settings.local_lru_entries, max_bytes=settings.local_lru_max_bytes)
    store = FallbackStore(RedisExactStore(client, settings.redis_prefix), local, recheck_s=settings.redis_recheck_s)
    # Redis being down at start is not fatal: the service starts degraded and recovers on its own.
    await store.start()
    tiers: list[CacheTier] = [ExactTier(store, stale_window_s=settings.stale_window_s)]
    cache_ref: list[ResponseCache] = []
    semantic, vectors = build_semantic(settings, lambda k, r: cache_ref[0].count_rejection(k, r))
    if semantic is not None:
        tiers.append(semantic)

    def ttl_for(ns: Namespace) -> int | None:
        return settings.policy_for(ns.tenant_id, ns.model_class).ttl_s

    cache = ResponseCache(tiers, stats=store, default_ttl_s=settings.default_ttl_s, max_ttl_s=settings.max_ttl_s,
                          max_entry_bytes=settings.max_entry_bytes, ttl_for=ttl_for)
    cache_ref.append(cache)
    servicer = CacheServicer(cache, settings)
    sweeper = (asyncio.create_task(_sweep_forever(semantic, settings.vector_sweep_s), name="cache-vector-sweep")
               if isinstance(semantic, SemanticTier) else None)

    async def close() -> None:
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        await cache.aclose()
        if vectors is not None:
            await vectors.aclose()
        await store.aclose()
        await client.aclose()

    binding = ServiceBinding(SERVICE_NAME, lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(
        servicer, server))
    return [binding], close


def build_semantic(settings: CacheSettings, on_rejected: Callable[[CacheKey, str], None]
                   ) -> tuple[CacheTier | None, VectorStore | None]:
    """The semantic tier, or a stand-in that reports why there is none (the exact tier serves alone)."""
    if not settings.semantic_enabled:
        return None, None
    from services.cache.embedding import StaticEmbedder
    from services.cache.setup_models import default_model_dir, model_ready
    from services.cache.verifier import DEFAULT_MODEL_PATH, Verifier

    model_dir = Path(settings.embedding_model_dir) if settings.embedding_model_dir else default_model_dir()
    if not model_ready(model_dir):
        log.warning("semantic tier off: no embedding model in %s (python -m services.cache.setup_models)", model_dir)
        return UnavailableTier(f"semantic tier off: no embedding model in {model_dir} "
                               "(run python -m services.cache.setup_models)"), None
    embedder = StaticEmbedder(model_dir)
    verifier = Verifier.load(Path(settings.verifier_model_path) if settings.verifier_model_path else DEFAULT_MODEL_PATH)
    mismatch = verifier.embedder_mismatch(embedder)
    if mismatch is not None:
        # Fail safe: an unverifiable semantic tier could serve wrong answers; the exact tier serves alone.
        log.warning("semantic tier off: %s", mismatch)
        return UnavailableTier(f"semantic tier off: {mismatch}"), None
    if settings.semantic_threshold:
        verifier.default_threshold = settings.semantic_threshold
    vectors: VectorStore
    if settings.qdrant_url:
        vectors = QdrantClientVectorStore.connect(settings.qdrant_url, settings.qdrant_api_key,
                                                  f"{settings.qdrant_collection}_{embedder.dim}", embedder.dim,
                                                  timeout_s=settings.qdrant_timeout_s,
                                                  max_entries=settings.semantic_max_entries)
    else:
        vectors = EdgeVectorStore(settings.vector_path(), embedder.dim, max_entries=settings.semantic_max_entries)

    def policy(key: CacheKey) -> SemanticPolicy:
        p = settings.policy_for(key.namespace.tenant_id, key.namespace.model_class)
        return SemanticPolicy(enabled=p.semantic is not False, threshold=p.semantic_threshold)

    tier = SemanticTier(vectors, embedder, verifier, stale_window_s=settings.stale_window_s, policy=policy,
                        on_rejected=on_rejected, candidates=settings.semantic_candidates,
                        min_cosine=settings.semantic_min_cosine, max_prompt_chars=settings.semantic_max_prompt_chars,
                        recheck_s=settings.vector_recheck_s)
    log.info("semantic tier on: embedder %s, %d-tree verifier (threshold %.3f), vectors in %s", embedder.fingerprint,
             len(verifier.model), verifier.default_threshold, "qdrant server" if settings.qdrant_url else "qdrant-edge")
    return tier, vectors


async def _sweep_forever(tier: SemanticTier, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        with contextlib.suppress(Exception):
            removed = await tier.sweep(time.time())
            if removed:
                log.info("swept %d expired semantic entries", removed)


async def serve(settings: CacheSettings) -> None:
    await serve_until_stopped(settings, "cache", lambda: build(settings))


def main() -> None:
    settings = load_settings(CacheSettings)
    run(lambda: serve(settings), service="cache", log_level=settings.log_level)
