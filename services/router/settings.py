"""Router settings (``TOLLGATE_ROUTER_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.settings import DatabaseSettings, RedisSettings, ServiceSettings, shared_env


class RouterSettings(ServiceSettings, RedisSettings, DatabaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_ROUTER_", extra="ignore", frozen=True,
                                      populate_by_name=True)

    port: int = Field(50051, ge=0, le=65535)
    cache_target: str = "127.0.0.1:50052"
    ratelimit_target: str = "127.0.0.1:50053"
    retrieval_target: str = "127.0.0.1:50054"
    data_dir: str = shared_env("data_dir", ".tollgate")  # type: ignore[assignment]

    # Deadlines: used when the caller sets none, and the most any request may take.
    default_timeout_s: float = Field(60.0, gt=0)
    max_timeout_s: float = Field(600.0, gt=0)
    # Time kept back at each hop so the router can still answer after a downstream times out.
    hop_margin_s: float = Field(0.02, ge=0)
    # Side calls (cache, ratelimit) must be quick; a slow one is skipped or failed open.
    side_call_timeout_s: float = Field(0.5, gt=0)
    # Retrieval (embedding + hybrid search) gets longer; past it, optional retrieval is skipped.
    retrieval_timeout_s: float = Field(2.0, gt=0)

    # Positive key lookups are cached this long. Revocations are also broadcast on Redis (immediate);
    # this bounds revocation latency when the broadcast is lost (Redis down).
    key_cache_ttl_s: float = Field(0.5, ge=0)
    # Models, prices and the like are reloaded from PostgreSQL this often.
    registry_refresh_s: float = Field(2.0, gt=0)

    default_max_output_tokens: int = Field(1024, gt=0)
    breaker_fail_max: int = Field(5, gt=0)
    breaker_reset_timeout_s: float = Field(5.0, gt=0)

    usage_stream: str = "usage"
    ledger_batch_size: int = Field(500, gt=0)
    # Run the ledger writer inside this process (one per deployment is enough; more are safe).
    run_ledger_writer: bool = True
