"""Settings of the cache service (``TOLLGATE_CACHE_*``).

Redis is mesh-wide (``TOLLGATE_REDIS_URL``, key prefix ``TOLLGATE_REDIS_PREFIX``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from libs.settings import RedisSettings, ServiceSettings, shared_env


class NamespacePolicy(BaseModel):
    """Overrides for one tenant (key ``tenant``) or one model class of it (``tenant/model_class``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl_s: int | None = Field(None, ge=1)
    semantic: bool | None = None
    # Verifier operating point (probability); higher serves fewer, surer near-duplicates.
    semantic_threshold: float | None = Field(None, gt=0, lt=1)


class CacheSettings(ServiceSettings, RedisSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_CACHE_", extra="ignore", frozen=True,
                                      populate_by_name=True)

    port: int = Field(50052, ge=0, le=65535)

    # Freshness of an entry when the Store request gives no TTL, and the longest a request may ask for.
    default_ttl_s: int = Field(3600, ge=1)
    max_ttl_s: int = Field(7 * 86400, ge=1)
    # How long past its TTL an entry is kept for stale reads (allow_stale, the degraded path).
    stale_window_s: int = Field(86400, ge=0)
    # Larger responses are not worth a cache slot (and would bloat Redis); Store skips them.
    max_entry_bytes: int = Field(256 * 1024, ge=1, le=16 * 1024 * 1024)

    # In-process LRU that serves while Redis is unreachable.
    local_lru_entries: int = Field(10_000, ge=1)
    local_lru_max_bytes: int = Field(64 * 1024 * 1024, ge=1)
    # Every Redis command gives up after this; the router's side-call budget is larger, so a hung
    # Redis shows up here as a failover rather than as a router timeout.
    redis_timeout_s: float = Field(0.2, gt=0, le=30)
    # While degraded, how often Redis is probed (in the background, never on a request's path).
    redis_recheck_s: float = Field(2.0, gt=0, le=3600)

    # Deadline when the caller sets none, and the most any request may take.
    request_timeout_s: float = Field(1.0, gt=0, le=60)
    # The same for Invalidate, which may remove many entries (an interrupted one is resumed by the next).
    invalidate_timeout_s: float = Field(30.0, gt=0, le=600)

    # Request bounds.
    max_id_chars: int = Field(128, ge=1, le=1024)

    # --- semantic tier ---
    semantic_enabled: bool = True
    # With TOLLGATE_QDRANT_URL set, vectors live in that Qdrant server (through qdrant-client);
    # without, in Qdrant's engine in process (qdrant-edge, HNSW) under <data_dir>/cache-vectors
    # (a temporary folder when there is no data dir).
    qdrant_url: str = shared_env("qdrant_url", "")  # type: ignore[assignment]
    qdrant_api_key: str = Field("", repr=False)
    qdrant_collection: str = "tollgate_cache"
    qdrant_timeout_s: float = Field(0.5, gt=0, le=30)
    data_dir: str = shared_env("data_dir", "")  # type: ignore[assignment]
    # The static embedding model (setup: python -m libs.static_model); empty: the shared one make setup prepares.
    embedding_model_dir: str = ""
    # The verifier model; empty: the one shipped in services/cache/models/.
    verifier_model_path: str = ""
    # Default operating point (probability); 0: the one stored with the model.
    semantic_threshold: float = Field(0.0, ge=0, lt=1)
    semantic_candidates: int = Field(4, ge=1, le=32)
    # Candidates below this cosine are not even verified.
    semantic_min_cosine: float = Field(0.5, ge=-1, le=1)
    semantic_max_prompt_chars: int = Field(2000, ge=1)
    # While the vector store is down, how often a request tries it again.
    vector_recheck_s: float = Field(5.0, gt=0, le=3600)
    # How often expired points are swept from the vector store.
    vector_sweep_s: float = Field(300.0, gt=0)
    # The most entries the vector store keeps, whatever the TTLs: past it, those retained the shortest are
    # evicted (1 % at a time). An entry is its vector (1 KiB at 256 dimensions) plus its prompt and answer.
    semantic_max_entries: int = Field(50_000, ge=1)
    # Per-tenant / per-model-class overrides, JSON: {"acme": {"ttl_s": 600}, "acme/fast": {"semantic_threshold": 0.95}}.
    namespace_policies: dict[str, NamespacePolicy] = Field(default_factory=dict)

    def policy_for(self, tenant_id: str, model_class: str) -> NamespacePolicy:
        """The model class's policy over the tenant's (field by field)."""
        base = self.namespace_policies.get(tenant_id)
        specific = self.namespace_policies.get(f"{tenant_id}/{model_class}")
        if base is None:
            return specific or NamespacePolicy()
        if specific is None:
            return base
        return base.model_copy(update=specific.model_dump(exclude_none=True))

    def vector_path(self) -> Path | None:
        return Path(self.data_dir) / "cache-vectors" if self.data_dir else None

    @model_validator(mode="after")
    def _ttl_bounds(self) -> CacheSettings:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError("default_ttl_s must not exceed max_ttl_s")
        return self
