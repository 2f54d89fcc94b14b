"""Rate limit service settings (``TOLLGATE_RATELIMIT_*``; Redis/PostgreSQL URLs are mesh-wide)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.settings import DatabaseSettings, RedisSettings, ServiceSettings


class RateLimitSettings(ServiceSettings, RedisSettings, DatabaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_RATELIMIT_", extra="ignore", frozen=True,
                                      populate_by_name=True)

    port: int = Field(50053, ge=0, le=65535)

    # Limits for a key that has no row in the `limits` table (0 = unlimited).
    default_key_rpm: int = Field(0, ge=0)
    default_key_tpm: int = Field(0, ge=0)
    default_key_tpd: int = Field(0, ge=0)

    # An uncommitted reservation is refunded after this long (callers may ask for less or more, up to the max).
    reservation_ttl_s: float = Field(120.0, gt=0, le=86_400)
    max_reservation_ttl_s: float = Field(3_600.0, gt=0, le=86_400)
    # How often expired reservations are looked for and refunded.
    sweep_interval_s: float = Field(1.0, gt=0, le=60)

    # Read limits from PostgreSQL (reloaded every `limits_refresh_s`). Off, or an empty
    # TOLLGATE_DATABASE_URL, means only the defaults above apply.
    use_database: bool = True
    limits_refresh_s: float = Field(2.0, gt=0, le=3_600)

    # Largest estimate a single Reserve may carry (input + max output tokens).
    max_estimated_tokens: int = Field(10_000_000, gt=0)

    # Redis calls are side calls on every request: bounded tightly, and after a failure Redis is
    # not tried again for `redis_retry_s` (requests use the local fallback meanwhile).
    redis_timeout_s: float = Field(0.25, gt=0, le=30)
    redis_retry_s: float = Field(1.0, ge=0, le=300)
    # Replicas of this service: while Redis is down each enforces limit / replicas locally.
    replicas: int = Field(1, ge=1, le=10_000)

    # Deadline for a request whose caller set none, and the most any request may take.
    default_timeout_s: float = Field(1.0, gt=0)
    max_timeout_s: float = Field(5.0, gt=0)

    @property
    def database_enabled(self) -> bool:
        return self.use_database and bool(self.database_url.strip())
