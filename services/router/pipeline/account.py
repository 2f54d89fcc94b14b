"""Stage 7, account: what the request cost, and settling it exactly once however it ended.

:meth:`AccountStage.summary` prices the answer (the price version in force when the request started;
a cache hit's saving was priced when it was served, in ``lookup.py``). Settlement — commit or release
the reservation, store a fresh answer in the cache, write the usage event to the ledger — runs in a
tracked background task, so it happens exactly once on every exit path (done, error, client cancel)
without holding up the response; :meth:`AccountStage.aclose` drains it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from libs.chat import FinishReason
from libs.deadlines import Deadline
from libs.errors import TollgateError
from libs.log_throttle import ThrottledLog
from libs.rag_context import cited_chunk_ids
from services.router.ledger.events import UsageEvent, utcnow
from services.router.pipeline.local_charges import LocalCharges
from services.router.pipeline.local_limits import LocalLimiter
from services.router.pipeline.ports import CacheClient, Charge, RateLimitClient, UsageSink
from services.router.pipeline.request import RequestState, Summary

log = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 5.0


class AccountStage:
    def __init__(self, ratelimit: RateLimitClient, cache: CacheClient, usage: UsageSink,
                 local: LocalLimiter | None = None, charges: LocalCharges | None = None):
        # Per-request fallbacks: one line per reason per 10 s, with the count held back.
        self._throttled = ThrottledLog(log)
        self._ratelimit = ratelimit
        self._local = local
        self._charges = charges
        self._cache = cache
        self._usage = usage
        self._pending: set[asyncio.Task[None]] = set()

    @staticmethod
    def summary(state: RequestState) -> Summary:
        usage = state.billed_usage()
        assert state.model is not None
        return Summary(
            request_id=state.request_id, model=state.model.name, provider=state.provider,
            usage=usage, cost_nano_usd=state.price.cost(usage), saved_nano_usd=state.saved_nano_usd,
            cache_tier=state.cache_tier, degraded_reasons=list(state.degraded),
            finish_reason=state.finish or FinishReason.STOP, latency_s=time.monotonic() - state.t0,
            price_version=state.price.version,
            cited_chunk_ids=cited_chunk_ids("".join(state.text), state.context) if state.context else [],
            degradation_level=state.level.name.lower(), degraded_detail="; ".join(state.degraded_detail),
            route_reason=state.route_reason, attempts=state.attempts, variant=state.variant)

    def settle_later(self, state: RequestState) -> None:
        """Settle ``state`` off the response path (a tracked task ``aclose`` waits for)."""
        self._spawn(self._settle(state))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Never silent: a settlement that crashed may have left a request unbilled.
            log.error("settlement failed (%s); the request may be missing from the ledger", type(exc).__name__)

    async def _settle(self, state: RequestState) -> None:
        usage = state.billed_usage()
        cost = state.price.cost(usage)
        deadline = Deadline.after(SETTLE_TIMEOUT_S)
        await self._settle_reservation(state, usage.total, cost, deadline)
        if state.store_ns is not None and state.model is not None:
            try:
                await self._cache.store(state.store_ns, state.model.name, state.cmd.messages,
                                        state.cmd.params, "".join(state.text), usage, deadline)
            except TollgateError as exc:
                self._throttled.warning(f"store:{exc.reason}", "cache store skipped: %s", exc.reason)
        if state.model is None:
            return  # rejected before a model was chosen: nothing was served or billed
        await self._usage.record(UsageEvent(
            request_id=state.request_id, started_at=state.started_at, finished_at=utcnow(),
            org_id=state.key.principal.org_id, team_id=state.key.principal.team_id,
            key_id=state.key.key_id, model=state.model.name, provider=state.provider,
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens, cost_nano_usd=cost,
            saved_nano_usd=state.saved_nano_usd, price_version=state.price.version or None,
            cache_tier=state.cache_tier, status=state.status, error_reason=state.error_reason,
            latency_ms=int((time.monotonic() - state.t0) * 1000), degraded=bool(state.degraded),
            variant=state.variant, labels=dict(state.cmd.labels)))

    async def _settle_reservation(self, state: RequestState, tokens: int, cost: int, deadline: Deadline) -> None:
        """Commit what a generation used, or release the reservation of a hit or a failure."""
        if state.reserving is not None and not state.reserving.done():
            # A cache hit (or an early exit) answered while the reservation was still in flight.
            await asyncio.wait([state.reserving], timeout=deadline.remaining())
        if state.reserving is not None and state.reserving.done() and not state.reserving.cancelled():
            state.reserving.exception()  # retrieved: a refused reservation is no settlement's business
        served = state.cache_tier == "miss" and bool(state.text or state.usage)
        hold = state.local_hold
        if self._local is not None and hold is not None:
            # This router's own record (what its local limiter counts while the limiter is unreachable).
            if served:
                self._local.settle(hold, tokens=tokens, cost=cost)
            else:
                self._local.release(hold)
            if served and hold.local and self._charges is not None:
                # Admitted without the ratelimit service: charged to it when it answers again.
                self._charges.add(Charge(state.key.principal, state.cmd.client_ip, state.request_id, 1, tokens,
                                         cost, state.started_at.timestamp()))
        try:
            if state.reservation is not None:
                if served:
                    await self._ratelimit.commit(state.reservation.reservation_id, tokens, cost, deadline)
                else:
                    await self._ratelimit.release(state.reservation.reservation_id, deadline)
        except TollgateError as exc:
            # An uncommitted reservation expires and is refunded by the limiter itself.
            log.warning("reservation %s not settled: %s", state.request_id, exc.reason)

    async def aclose(self) -> None:
        """Wait for in-flight settlements (shutdown must not lose usage)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
