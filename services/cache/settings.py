"""Settings of the cache service (``TOLLGATE_CACHE_*``).

Redis is mesh-wide (``TOLLGATE_REDIS_URL``, key prefix ``TOLLGATE_REDIS_PREFIX``).
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from libs.settings import RedisSettings, ServiceSettings


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

    @model_validator(mode="after")
    def _ttl_bounds(self) -> CacheSettings:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError("default_ttl_s must not exceed max_ttl_s")
        return self
