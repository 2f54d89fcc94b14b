"""Stage 5, admit: may this request use a backend now, and is it within its limits and budget?

- the degradation level (full, reduced, cache-only), from the recent backend error rate and load;
- priority shedding: the key's tier, lowered by the request's priority, against the in-flight load;
- the reservation: the ratelimit service checks every rate limit and every USD budget (key, team, org)
  for the estimated tokens and cost, and holds them until accounting commits the real figures. **This is
  where the budget is checked.** A budget at 100 % refuses (``BUDGET_EXHAUSTED``); at 95 % the reservation
  asks the route to move to a cheaper model.

The reservation may start while the cache lookup runs (see :meth:`AdmitStage.may_reserve_early`), so a
miss pays one round trip instead of two. When the ratelimit service cannot answer (Unavailable,
DeadlineExceeded, its breaker open), this router's local limiter (``local_limits.py``) decides instead,
within this router's share of every limit and counting what this router admitted in the current windows;
a request it admits is marked degraded ``ratelimit_unavailable``. Without a local limiter (tests), the
request is admitted unreserved, marked. What the local limiter admitted is charged to the ratelimit service
once it answers again (``local_charges.py``): while charges are queued or on their way, admission starts
their delivery and admits locally, so the service never admits from buckets that do not know yet what this
router admitted alone.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractContextManager, nullcontext

from libs.chat import TokenUsage
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, QuotaExceeded, Unavailable
from libs.log_throttle import ThrottledLog
from services.router.pipeline.degradation import DegradationController, Level
from services.router.pipeline.local_charges import LocalCharges
from services.router.pipeline.local_limits import LocalLimiter
from services.router.pipeline.ports import RateLimitClient
from services.router.pipeline.request import RequestState
from services.router.pipeline.shedding import LoadShedder

log = logging.getLogger(__name__)

# ErrorInfo.reason the ratelimit service gives a reserve refused by a USD budget.
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
# Reserve concurrently with the cache lookup while fewer than this share of lookups hit.
SPECULATE_BELOW_HIT_RATE = 0.5


def is_budget_exhausted(exc: QuotaExceeded) -> bool:
    return exc.reason == BUDGET_EXHAUSTED


class AdmitStage:
    def __init__(self, ratelimit: RateLimitClient, *, default_max_output_tokens: int, side_timeout_s: float,
                 degradation: DegradationController | None = None, shedder: LoadShedder | None = None,
                 local: LocalLimiter | None = None, charges: LocalCharges | None = None):
        # One line per outcome and reason per 10 s while the limiter is away (the ledger marks each request).
        self._throttled = ThrottledLog(log)
        self._ratelimit = ratelimit
        self._local = local
        self._charges = charges
        self._default_max_output = default_max_output_tokens
        self._side_timeout_s = side_timeout_s
        self._degradation = degradation
        self._shedder = shedder

    def level(self) -> Level:
        return self._degradation.evaluate() if self._degradation else Level.FULL

    def may_reserve_early(self, state: RequestState, tier: str, *, hit_rate: float, looking_up: bool) -> bool:
        """Reserve while the lookup runs? Only while most lookups miss (a hit releases the reservation: two
        wasted calls), and not when the request could not go on anyway: shed by priority, or cache-only
        (where only a miss may become the probe)."""
        speculate = not looking_up or hit_rate < SPECULATE_BELOW_HIT_RATE
        return (state.level != Level.CACHE_ONLY and speculate
                and (self._shedder is None or self._shedder.would_admit(tier)))

    def start_reservation(self, state: RequestState, deadline: Deadline) -> None:
        state.reserving = asyncio.ensure_future(self._reserve(state, deadline))

    async def reserve(self, state: RequestState, deadline: Deadline) -> None:
        """The reservation (the one started early, or a new one). Raises QuotaExceeded when a limit or
        budget refuses (RESOURCE_EXHAUSTED, QuotaFailure naming the level, RetryInfo = window reset)."""
        await (state.reserving or self._reserve(state, deadline))

    async def _reserve(self, state: RequestState, deadline: Deadline) -> None:
        cmd = state.cmd
        max_out = cmd.params.max_output_tokens or self._default_max_output
        estimate = TokenUsage(state.prompt_tokens(), max_out)
        cost = state.price.cost(estimate)
        try:
            if self._charges is not None:
                self._charges.require_delivered()
            state.reservation = await self._ratelimit.reserve(
                state.key.principal, cmd.client_ip, state.request_id, estimate.total, cost,
                deadline.within(self._side_timeout_s))
        except (Unavailable, DeadlineExceeded) as exc:
            self._admit_locally(state, estimate.total, cost, exc.reason)
            return
        if self._local is not None:
            state.local_hold = self._local.record(state.key.principal, estimate.total, cost)
        if state.reservation.degraded:
            state.degrade("ratelimit_unavailable", "the limiter ran without its store")

    def _admit_locally(self, state: RequestState, tokens: int, cost: int, why: str) -> None:
        """The ratelimit service did not answer: this router's share decides (raises QuotaExceeded)."""
        if self._local is None:
            self._throttled.warning(f"unreserved:{why}", "ratelimit unavailable (%s): admitting request %s unreserved",
                                    why, state.request_id)
            state.degrade("ratelimit_unavailable", "admitted without a limit check (limiter unreachable)")
            return
        try:
            state.local_hold = self._local.admit(state.key.principal, tokens, cost)
        except QuotaExceeded:
            self._throttled.log(logging.INFO, f"refused:{why}",
                                "ratelimit unavailable (%s): request %s refused by the local limiter", why,
                                state.request_id)
            raise
        self._throttled.warning(f"admitted:{why}",
                                "ratelimit unavailable (%s): request %s admitted by the local limiter", why,
                                state.request_id)
        state.degrade("ratelimit_unavailable", "admitted by this router's local limiter (limiter unreachable)")

    def require_probe(self) -> None:
        """In cache-only mode a miss goes on only as the interval's probe (its answer tells the controller
        whether the backends are back); any other miss is refused."""
        assert self._degradation is not None
        if not self._degradation.allow_probe():
            raise Unavailable(
                f"the gateway is serving cached answers only ({self._degradation.reason}) and has none "
                "for this request; retry shortly", reason="CACHE_ONLY",
                retry_after_s=self._degradation.retry_after_s)

    def shed(self, tier: str) -> AbstractContextManager[object]:
        """Holds a place in the load shedder while the request uses a backend (raises Overloaded when its
        tier is being shed)."""
        return self._shedder.admit(tier) if self._shedder else nullcontext()

    def reduced_mode(self) -> tuple[str, str]:
        """(reason code, detail) for a request served in reduced mode."""
        assert self._degradation is not None
        return self._degradation.reason_code, f"reduced mode: {self._degradation.reason}"

    def observe(self, *, failed: bool) -> None:
        """A backend call's outcome, for the degradation controller."""
        if self._degradation is not None:
            self._degradation.record(failed=failed)
