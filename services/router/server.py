"""Router process: wires PostgreSQL, Redis, downstream clients, the gateway and both servicers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import redis.asyncio as redis
from tollgate.router.v1 import admin_pb2_grpc, router_pb2_grpc

from libs.breaker import Breaker
from libs.clients import Downstream
from libs.errors import Unavailable
from libs.grpc_server import ServiceBinding, run, serve_until_stopped
from libs.settings import load_settings
from services.router.control.admin_servicer import AdminServicer
from services.router.control.bootstrap import apply_migrations, bootstrap_at_startup, parse_default_models
from services.router.control.experiments import ExperimentBook, ExperimentStore
from services.router.control.keys import RevocationBus
from services.router.control.limit_book import LimitBook
from services.router.control.plane import ControlPlane
from services.router.control.registry import Registry
from services.router.db import create_pool
from services.router.downstreams import (
    GrpcCacheClient,
    GrpcInferenceClient,
    GrpcRateLimitClient,
    GrpcRetrievalClient,
)
from services.router.ledger.dead_letters import DeadLetterMonitor, DeadLetterStore
from services.router.ledger.health import LedgerHealth
from services.router.ledger.spool import UsageRecorder
from services.router.ledger.writer import LedgerWriter
from services.router.pipeline.authenticate import Authenticator, AuthLimits
from services.router.pipeline.complexity import DEFAULT_MODEL_PATH, ComplexityModelError, ComplexityRouter
from services.router.pipeline.degradation import DegradationController, DegradationPolicy
from services.router.pipeline.failover import RetryPolicy, parse_route_timeouts
from services.router.pipeline.gateway import Gateway
from services.router.pipeline.hedging import HedgePolicy, Hedger
from services.router.pipeline.local_charges import LocalCharges
from services.router.pipeline.local_limits import LocalLimiter
from services.router.pipeline.ports import AutoRouter
from services.router.pipeline.shedding import LoadShedder, SheddingPolicy
from services.router.servicer import RouterServicer
from services.router.settings import RouterSettings

log = logging.getLogger(__name__)


def _auto_router(settings: RouterSettings) -> AutoRouter | None:
    """The complexity router for model "auto"; without its model files "auto" means the cheap tier (logged)."""
    try:
        router = ComplexityRouter.load(Path(settings.auto_router_model) if settings.auto_router_model
                                       else DEFAULT_MODEL_PATH, threshold=settings.auto_router_threshold)
    except ComplexityModelError as exc:
        log.warning("complexity router not loaded (%s): model 'auto' uses the cheap tier", exc)
        return None
    log.info("complexity router loaded: threshold %.3f", router.threshold)
    return router


def _retry_policy(settings: RouterSettings) -> RetryPolicy:
    """Attempts, backoff and the inference timeouts, with the per-route overrides."""
    return RetryPolicy(max_attempts=settings.retry_max_attempts, backoff_base_s=settings.retry_backoff_base_s,
                       backoff_max_s=settings.retry_backoff_max_s,
                       first_token_timeout_s=settings.inference_first_token_timeout_s,
                       stall_timeout_s=settings.inference_stall_timeout_s,
                       routes=parse_route_timeouts(settings.route_timeouts_json))


def _hedger(settings: RouterSettings) -> Hedger | None:
    """Hedged first attempts (pipeline/hedging.py), unless turned off."""
    if not settings.hedge_enabled:
        return None
    return Hedger(HedgePolicy(percentile=settings.hedge_percentile, factor=settings.hedge_factor,
                              floor_s=settings.hedge_floor_s, default_delay_s=settings.hedge_default_delay_s,
                              min_samples=settings.hedge_min_samples, max_share=settings.hedge_max_share,
                              window_s=settings.hedge_budget_window_s, demote_s=settings.hedge_demote_s))


async def build(settings: RouterSettings, ledger_health: LedgerHealth | None = None,
                ) -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
    await apply_migrations(settings.database_url)
    pool = await create_pool(settings.database_url)
    if settings.bootstrap_models_json.strip():
        # Before the first registry load, so it already has the default models.
        models = parse_default_models(settings.bootstrap_models_json)
        if await bootstrap_at_startup(pool, models, Path(settings.bootstrap_admin_key_file)):
            log.info("bootstrap: created the default admin key, written to %s", settings.bootstrap_admin_key_file)
        else:
            log.info("bootstrap: defaults present (%d model(s) checked); an admin key exists", len(models))
    redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    # Revocations are broadcast on Redis so every router rejects a revoked key at once (issue 6).
    revocations = RevocationBus(redis_client, settings.redis_prefix)
    control = ControlPlane(pool, revocations)
    registry = Registry(pool, settings.registry_refresh_s)
    await registry.load()
    # Limits and budgets for the local limiter (stands in while the ratelimit service is unreachable).
    limit_book = LimitBook(pool, settings.registry_refresh_s, key_default=(
        settings.local_limit_default_key_rpm, settings.local_limit_default_key_tpm,
        settings.local_limit_default_key_tpd))
    try:
        await limit_book.load()
    except Unavailable as exc:
        log.warning("limits not loaded yet (%s); the local limiter retries in the background", exc)
    experiments = ExperimentStore(pool)
    experiment_book = ExperimentBook(experiments, settings.registry_refresh_s)
    await experiment_book.load()
    auth = Authenticator(control, cache_ttl_s=settings.key_cache_ttl_s, stale_ttl_s=settings.key_stale_ttl_s,
                         lookup_timeout_s=settings.key_lookup_timeout_s,
                         limits=AuthLimits(cache_max_keys=settings.key_cache_max_entries,
                                           negative_cache_max_keys=settings.key_negative_cache_max_entries,
                                           failures_per_window=settings.auth_failure_limit,
                                           failure_window_s=settings.auth_failure_window_s,
                                           failure_max_sources=settings.auth_failure_max_sources))

    margin, side_cap = settings.hop_margin_s, settings.side_call_timeout_s
    trip, side_reset = settings.breaker_timeout_trip, settings.side_breaker_reset_timeout_s

    def side_breaker(name: str) -> Breaker:
        return Breaker(name, timeout_trip=trip, reset_timeout_s=side_reset)

    cache_ds = Downstream("cache", settings.cache_target, breaker=side_breaker("cache"), margin_s=margin,
                          cap_s=side_cap)
    retrieval_ds = Downstream("retrieval", settings.retrieval_target, breaker=side_breaker("retrieval"),
                              margin_s=margin, cap_s=settings.retrieval_timeout_s)
    ratelimit_ds = Downstream("ratelimit", settings.ratelimit_target, breaker=side_breaker("ratelimit"),
                              margin_s=margin, cap_s=side_cap)
    inference = GrpcInferenceClient(margin_s=settings.hop_margin_s, cap_s=settings.max_timeout_s,
                                    fail_max=settings.breaker_fail_max,
                                    reset_timeout_s=settings.breaker_reset_timeout_s,
                                    error_rate=settings.breaker_error_rate, window_s=settings.breaker_window_s,
                                    min_calls=settings.breaker_min_calls, timeout_trip=trip)
    shedder = LoadShedder(SheddingPolicy(
        max_in_flight=settings.shed_max_in_flight, free_share=settings.shed_free_share,
        pro_share=settings.shed_pro_share, retry_after_s=settings.shed_retry_after_s),
        backend_pressure=inference.pressure)
    degradation = DegradationController(DegradationPolicy(
        window_s=settings.degradation_window_s, min_samples=settings.degradation_min_samples,
        reduced_error_rate=settings.degradation_reduced_error_rate,
        cache_only_error_rate=settings.degradation_cache_only_error_rate,
        reduced_pressure=settings.degradation_reduced_pressure, recover_s=settings.degradation_recover_s,
        probe_interval_s=settings.degradation_probe_interval_s),
        pressure=shedder.pressure) if settings.degradation_enabled else None
    stream_key = f"{settings.redis_prefix}{settings.usage_stream}"
    recorder = UsageRecorder(redis_client, stream_key, Path(settings.data_dir) / "spool")
    ratelimit = GrpcRateLimitClient(ratelimit_ds)
    # What the local limiter admits is charged to the ratelimit service when it answers again.
    charges = LocalCharges(ratelimit, max_pending=settings.local_charge_max_pending, call_timeout_s=side_cap,
                           retry_s=settings.local_charge_retry_s)
    gateway = Gateway(registry=registry, cache=GrpcCacheClient(cache_ds), ratelimit=ratelimit,
                      inference=inference, usage=recorder,
                      default_max_output_tokens=settings.default_max_output_tokens,
                      side_call_timeout_s=settings.side_call_timeout_s,
                      retrieval=GrpcRetrievalClient(retrieval_ds), retrieval_timeout_s=settings.retrieval_timeout_s,
                      retry=_retry_policy(settings),
                      degradation=degradation, shedder=shedder, experiments=experiment_book,
                      auto_router=_auto_router(settings),
                      local_limits=LocalLimiter(limit_book, share=settings.local_share),
                      hedger=_hedger(settings), local_charges=charges)

    background = [asyncio.create_task(registry.refresh_forever(), name="registry-refresh"),
                  asyncio.create_task(recorder.replay_forever(), name="usage-spool-replay"),
                  asyncio.create_task(revocations.listen_forever(auth), name="key-revocations"),
                  asyncio.create_task(experiment_book.refresh_forever(), name="experiments-refresh"),
                  asyncio.create_task(limit_book.refresh_forever(), name="limits-refresh"),
                  asyncio.create_task(charges.run_forever(), name="local-charges-retry")]
    if settings.run_ledger_writer:
        writer = LedgerWriter(redis_client, pool, stream_key, consumer=f"{socket.gethostname()}-{os.getpid()}",
                              batch_size=settings.ledger_batch_size, linger_s=settings.ledger_linger_s)
        background.append(asyncio.create_task(writer.run_forever(), name="ledger-writer"))
    # Rows the ledger refused are never silent: counted on the health service and in the log, listed and
    # replayed over AdminService (`tollgate dead-letters`).
    dead_letters = DeadLetterStore(redis_client, pool, stream_key)
    monitor = DeadLetterMonitor(dead_letters, (ledger_health or LedgerHealth()).publish,
                                every_s=settings.dead_letter_check_s)
    background.append(asyncio.create_task(monitor.run_forever(), name="dead-letter-monitor"))

    trusted_proxies = frozenset(p.strip() for p in settings.trusted_proxies.split(",") if p.strip())
    router = RouterServicer(gateway, auth, default_timeout_s=settings.default_timeout_s,
                            max_timeout_s=settings.max_timeout_s, experiments=experiments,
                            trusted_proxies=trusted_proxies)
    admin = AdminServicer(control, auth, registry, experiments=experiments, experiment_book=experiment_book,
                          trusted_proxies=trusted_proxies)
    admin.serve_dead_letters(dead_letters)
    bindings = [
        ServiceBinding("tollgate.router.v1.RouterService",
                       lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(router, s)),
        ServiceBinding("tollgate.router.v1.AdminService",
                       lambda s: admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, s)),
    ]

    async def close() -> None:
        # In-flight settlements first (they record usage), then let the writer flush, then close.
        await gateway.aclose()
        await asyncio.sleep(0)
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await inference.aclose()
        await cache_ds.close()
        await ratelimit_ds.close()
        await retrieval_ds.close()
        await redis_client.aclose()
        await pool.close()

    return bindings, close


async def serve(settings: RouterSettings) -> None:
    ledger_health = LedgerHealth()
    await serve_until_stopped(settings, "router", lambda: build(settings, ledger_health),
                              on_started=ledger_health.attach)


def main() -> None:
    settings = load_settings(RouterSettings)
    run(lambda: serve(settings), service="router", log_level=settings.log_level)
