"""Router settings (``TOLLGATE_ROUTER_*``)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
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
    # Peers whose `x-tollgate-client-ip` metadata is believed (the HTTP edge), comma-separated.
    trusted_proxies: str = "127.0.0.1,::1"

    # Deadlines: used when the caller sets none, and the most any request may take.
    default_timeout_s: float = Field(60.0, gt=0)
    max_timeout_s: float = Field(600.0, gt=0)
    # Time kept back at each hop so the router can still answer after a downstream times out.
    hop_margin_s: float = Field(0.02, ge=0)
    # Side calls (cache, ratelimit) must be quick; a slow one is skipped or failed open.
    side_call_timeout_s: float = Field(0.5, gt=0)
    # Retrieval (embedding + hybrid search, p99 about 15 ms at 50k chunks) gets the same cap; past it, optional
    # retrieval is skipped. Well under 1 s so that a hung retrieval service keeps requests under 1 s (issue 24).
    retrieval_timeout_s: float = Field(0.5, gt=0)

    # Positive key lookups are cached this long. Revocations are also broadcast on Redis (immediate);
    # this bounds revocation latency when the broadcast is lost (Redis down).
    key_cache_ttl_s: float = Field(0.5, ge=0)
    # Bounds of the key caches (LRU): verified keys (kept `key_stale_ttl_s` for the PostgreSQL-down fallback)
    # and unknown keys (kept `key_cache_ttl_s`). A flood of random tokens evicts entries, never grows memory.
    key_cache_max_entries: int = Field(10_000, gt=0)
    key_negative_cache_max_entries: int = Field(10_000, gt=0)
    key_stale_ttl_s: float = Field(300.0, ge=0)
    # A key this router has not verified lately (not in the cache) waits at most this long for PostgreSQL,
    # then UNAVAILABLE (fail closed). Known keys never wait: past `key_cache_ttl_s` they are served from
    # memory while one background re-read per key refreshes them.
    key_lookup_timeout_s: float = Field(0.5, gt=0)
    # Failed key lookups (unknown, revoked, expired) one client IP may cause per window; past that, a token
    # this router has not verified lately is refused without a database query: RESOURCE_EXHAUSTED
    # (reason TOO_MANY_AUTH_FAILURES, RetryInfo = end of the window). At most `auth_failure_max_sources`
    # addresses are tracked (LRU).
    auth_failure_limit: int = Field(20, gt=0)
    auth_failure_window_s: float = Field(60.0, gt=0)
    auth_failure_max_sources: int = Field(10_000, gt=0)
    # Models, prices and the like are reloaded from PostgreSQL this often.
    registry_refresh_s: float = Field(2.0, gt=0)

    # Local limiter (pipeline/local_limits.py), used while the ratelimit service is unreachable: this router
    # admits at most `local_limit_share` of every limit and budget (key, team, org, global) per window, counting
    # what it admitted itself (through the service too) in that window. Unset: 1 / `router_replicas`, so the
    # routers' shares add up to the limit. Set `router_replicas` to the number of router processes.
    router_replicas: int = Field(1, ge=1, le=10_000)
    local_limit_share: float | None = Field(None, gt=0, le=1)
    # The ratelimit service's per-key default limits (its TOLLGATE_RATELIMIT_DEFAULT_KEY_RPM/TPM/TPD), for keys
    # without a `limits` row; keep them equal.
    local_limit_default_key_rpm: int = Field(0, ge=0)
    local_limit_default_key_tpm: int = Field(0, ge=0)
    local_limit_default_key_tpd: int = Field(0, ge=0)
    # What the local limiter admitted is charged to the ratelimit service when it answers again
    # (pipeline/local_charges.py): at most this many charges are kept (past it the oldest are dropped, logged),
    # retried every `local_charge_retry_s` while any are queued.
    local_charge_max_pending: int = Field(100_000, ge=1, le=10_000_000)
    local_charge_retry_s: float = Field(1.0, gt=0)

    default_max_output_tokens: int = Field(1024, gt=0)
    # A breaker per inference replica opens on `fail_max` consecutive faults, or on an error rate of at
    # least `error_rate` over `window_s` once `min_calls` calls fall in the window; probes after the reset.
    breaker_fail_max: int = Field(5, gt=0)
    breaker_reset_timeout_s: float = Field(5.0, gt=0)
    breaker_error_rate: float = Field(0.5, gt=0, le=1)
    breaker_window_s: float = Field(10.0, gt=0)
    breaker_min_calls: int = Field(10, gt=0)
    # Every breaker (cache, ratelimit, retrieval, each inference replica) also opens on this many consecutive
    # timeouts of the hop's own cap (a hung dependency): within about N x the cap (3 x 0.5 s for side calls).
    breaker_timeout_trip: int = Field(3, gt=0)
    # The cache, ratelimit and retrieval breakers probe again this soon after opening. A probe is one request's
    # side call (at most its hop cap, and a refused connection fails at once), and every second longer is a
    # second of skipped cache, of the local limiter, of answers without retrieval after the service is back.
    side_breaker_reset_timeout_s: float = Field(1.0, gt=0)
    # An inference replica that sends no first token within `inference_first_token_timeout_s`, or goes silent
    # for `inference_stall_timeout_s` between tokens, is cancelled and counted as a fault; before any token
    # reached the client the request fails over to the next candidate, after that it ends UNAVAILABLE.
    inference_first_token_timeout_s: float = Field(10.0, gt=0)
    inference_stall_timeout_s: float = Field(10.0, gt=0)
    # Per route (model name), overrides of those two and of `hedge_floor_s`, as JSON: a model that is slow by
    # nature (a large reasoning model) needs longer leashes than the default, a small one shorter. E.g.
    # {"gpt-4o": {"first_token_s": 20, "stall_s": 15, "hedge_floor_s": 1}}; checked at startup (unknown fields,
    # bad JSON and numbers that are not positive are refused). Unset: the global values for every model.
    route_timeouts_json: str = ""

    # Hedging (pipeline/hedging.py): an attempt that has sent no first token after the hedge delay gets a second
    # one on the next live candidate (another replica of its model first); the first to answer wins, the other
    # is cancelled (no breaker fault: it did nothing wrong) and only the winner is billed. It bounds what one
    # hung or slow replica costs a request to about the delay, instead of the first-token timeout. Only before
    # any token reached the client; never with one candidate live.
    hedge_enabled: bool = True
    # The delay adapts per model: this percentile of its recent first-token latencies times `hedge_factor`, so
    # that about (1 - percentile) of requests at most would be hedged in normal operation and a model that is
    # slow on every request is not hedged on every request...
    hedge_percentile: float = Field(0.95, gt=0, le=1)
    hedge_factor: float = Field(1.5, ge=1)
    # ...but never sooner than the floor (fast models: hedging after a few ms would double the load for
    # nothing), and `hedge_default_delay_s` (at least the floor) until `hedge_min_samples` latencies are known.
    hedge_floor_s: float = Field(0.25, gt=0)
    hedge_default_delay_s: float = Field(1.0, gt=0)
    hedge_min_samples: int = Field(20, gt=0)
    # Budget: at most this share of the requests sent to inference in the last `hedge_budget_window_s` is hedged
    # (and at least one per window), so that under overload, when every replica is slow, hedging cannot double
    # the load: one hung replica of two costs a few hedges (the demotion below), not half the traffic.
    hedge_max_share: float = Field(0.1, ge=0, le=1)
    hedge_budget_window_s: float = Field(10.0, gt=0)
    # A replica that lost a race without sending a first token is tried after its model's other replicas for this
    # long: a hung replica then costs a few hedged requests, not every other one (0: no demotion).
    hedge_demote_s: float = Field(2.0, ge=0)

    # Backend attempts per request (first try, fallbacks and retries together), and the backoff between rounds.
    retry_max_attempts: int = Field(4, ge=1, le=16)
    retry_backoff_base_s: float = Field(0.05, ge=0)
    retry_backoff_max_s: float = Field(2.0, ge=0)

    # Degradation tiers: full -> reduced (cheaper model) -> cache-only; down at once, up after `recover_s`.
    degradation_enabled: bool = True
    degradation_window_s: float = Field(10.0, gt=0)
    degradation_min_samples: int = Field(10, gt=0)
    degradation_reduced_error_rate: float = Field(0.25, gt=0, le=1)
    degradation_cache_only_error_rate: float = Field(0.75, gt=0, le=1)
    degradation_reduced_pressure: float = Field(0.9, gt=0)
    degradation_recover_s: float = Field(15.0, ge=0)
    degradation_probe_interval_s: float = Field(1.0, gt=0)

    # Priority shedding: free traffic is refused past `shed_free_share` of capacity, pro past `shed_pro_share`,
    # enterprise at capacity. Capacity = `shed_max_in_flight` generations in this router (0: no shedding),
    # or the inference replicas' queues, whichever is fuller.
    shed_max_in_flight: int = Field(256, ge=0)
    shed_free_share: float = Field(0.5, gt=0, le=1)
    shed_pro_share: float = Field(0.8, gt=0, le=1)
    shed_retry_after_s: float = Field(1.0, gt=0)

    # Model "auto": the complexity router's model file, and its cost/quality threshold (empty: the file's).
    auto_router_model: str = ""
    auto_router_threshold: float | None = Field(None, ge=0, le=1)

    usage_stream: str = "usage"
    ledger_batch_size: int = Field(500, gt=0)
    # The writer waits this long after a short batch, so that under load one INSERT carries many events.
    ledger_linger_s: float = Field(0.05, ge=0, le=5)
    # Run the ledger writer inside this process (one per deployment is enough; more are safe).
    run_ledger_writer: bool = True
    # How often the dead-letter count is checked (health `tollgate.router.v1.Ledger`, log).
    dead_letter_check_s: float = Field(10.0, gt=0)

    # First start: when set, the router creates what does not exist yet at startup (after the migrations,
    # before serving): the default org and team, these models with their prices, and an admin key if there is
    # none. JSON list of objects with control.bootstrap.DefaultModel's fields (name, provider, inference_target,
    # context_window, cost_tier, input_per_mtok, output_per_mtok, cached_input_per_mtok; prices in nano-USD per
    # million tokens). `tollgate up` sets it; set it on one router of a deployment (they would agree anyway).
    bootstrap_models_json: str = ""
    # Where a new admin key is written (mode 0600; never logged). Required with bootstrap_models_json.
    bootstrap_admin_key_file: str = ""

    @property
    def local_share(self) -> float:
        """This router's share of each limit while it decides alone."""
        return self.local_limit_share if self.local_limit_share is not None else 1.0 / self.router_replicas

    @field_validator("bootstrap_models_json")
    @classmethod
    def _models_parse(cls, value: str) -> str:
        if value.strip():
            from services.router.control.bootstrap import parse_default_models

            parse_default_models(value)
        return value

    @field_validator("route_timeouts_json")
    @classmethod
    def _route_timeouts_parse(cls, value: str) -> str:
        from services.router.pipeline.failover import parse_route_timeouts

        parse_route_timeouts(value)
        return value

    @model_validator(mode="after")
    def _key_file_with_models(self) -> RouterSettings:
        if self.bootstrap_models_json.strip() and not self.bootstrap_admin_key_file:
            raise ValueError("bootstrap_admin_key_file is required with bootstrap_models_json "
                             "(a new admin key would otherwise be lost)")
        return self
