"""AdmitStage (services/router/pipeline/admit.py): degradation level, early reservation, fail-open, shedding."""

from __future__ import annotations

import asyncio
import time

import pytest

from libs.breaker import BreakerOpen
from libs.chat import ChatMessage, GenerationParams, Principal, Role, TokenUsage
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, Overloaded, QuotaExceeded, QuotaViolation, TollgateError, Unavailable
from services.router.control.limit_book import LimitBook, LimitSnapshot
from services.router.pipeline.admit import BUDGET_EXHAUSTED, AdmitStage, is_budget_exhausted
from services.router.pipeline.degradation import DegradationController, DegradationPolicy, Level
from services.router.pipeline.local_limits import LocalLimiter
from services.router.pipeline.ports import Reservation
from services.router.pipeline.request import GenerateCommand, RequestState
from services.router.pipeline.shedding import LoadShedder, SheddingPolicy
from tests.support.router import KEY, PRIMARY, registry_of

DEFAULT_MAX_OUTPUT = 100


class RecordingLimiter:
    """Records every reserve; answers ``reservation`` or raises ``error``, after ``delay_s``."""

    def __init__(self, *, error: TollgateError | None = None, prefer_cheaper: bool = False, degraded: bool = False,
                 delay_s: float = 0.0) -> None:
        self.error = error
        self.prefer_cheaper = prefer_cheaper
        self.degraded = degraded
        self.delay_s = delay_s
        self.reserves: list[tuple[Principal, str, str, int, int, Deadline]] = []

    async def reserve(self, principal: Principal, client_ip: str, request_id: str, estimated_tokens: int,
                      estimated_cost_nano_usd: int, deadline: Deadline) -> Reservation:
        self.reserves.append((principal, client_ip, request_id, estimated_tokens, estimated_cost_nano_usd, deadline))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return Reservation(f"res-{request_id}", self.prefer_cheaper, self.degraded)

    async def commit(self, reservation_id: str, actual_tokens: int, actual_cost_nano_usd: int,
                     deadline: Deadline) -> None:
        raise AssertionError("admission never commits")

    async def release(self, reservation_id: str, deadline: Deadline) -> None:
        raise AssertionError("admission never releases")


def _admit(limiter: RecordingLimiter | None = None, **kw: object) -> AdmitStage:
    return AdmitStage(limiter or RecordingLimiter(), default_max_output_tokens=DEFAULT_MAX_OUTPUT,
                      side_timeout_s=0.25, **kw)  # type: ignore[arg-type]


def _state(max_output_tokens: int = 50, *, priced: bool = True) -> RequestState:
    # "12345678": (8 + 3) // 4 + 4 per-message overhead = 6 prompt tokens.
    cmd = GenerateCommand(model="primary", messages=[ChatMessage(Role.USER, "12345678")],
                          params=GenerationParams(temperature=0.0, max_output_tokens=max_output_tokens),
                          client_ip="203.0.113.7")
    state = RequestState.begin(KEY, cmd, "req-1")
    if priced:
        state.use_model(PRIMARY, registry_of(PRIMARY))  # $1/M in, $2/M out: 1000 / 2000 nano-USD a token
    return state


def _controller(now: list[float] | None = None, **kw: float) -> DegradationController:
    policy = DegradationPolicy(**{"min_samples": 4, "recover_s": 60, "probe_interval_s": 2.0, **kw})  # type: ignore[arg-type]
    return DegradationController(policy, clock=(lambda: now[0]) if now is not None else time.monotonic)


# --- level --------------------------------------------------------------------------------------

def test_without_a_controller_the_level_is_full() -> None:
    assert _admit().level() is Level.FULL


def test_the_level_is_the_controllers_evaluation() -> None:
    controller = _controller()
    admit = _admit(degradation=controller)
    assert admit.level() is Level.FULL
    for _ in range(4):
        admit.observe(failed=True)
    assert admit.level() is Level.CACHE_ONLY and controller.level is Level.CACHE_ONLY


def test_observe_feeds_successes_and_failures_to_the_controller() -> None:
    controller = _controller()
    admit = _admit(degradation=controller)
    for failed in (True, False, False, False):
        admit.observe(failed=failed)
    assert admit.level() is Level.REDUCED  # 1 of 4 failed: 25 %
    assert admit.reduced_mode() == ("backend_errors", "reduced mode: backend error rate 25% over the last 10 s")


def test_observe_without_a_controller_is_a_no_op() -> None:
    admit = _admit()
    admit.observe(failed=True)
    assert admit.level() is Level.FULL


# --- may_reserve_early --------------------------------------------------------------------------

@pytest.mark.parametrize(("level", "hit_rate", "looking_up", "early"), [
    (Level.CACHE_ONLY, 0.0, True, False),  # only a miss may become the probe
    (Level.CACHE_ONLY, 0.0, False, False),
    (Level.FULL, 0.6, True, False),  # most lookups hit: a reservation would mostly be released
    (Level.FULL, 0.5, True, False),
    (Level.FULL, 0.49, True, True),
    (Level.FULL, 0.9, False, True),  # not looking up: the request goes on to admission anyway
    (Level.REDUCED, 0.0, True, True),
])
def test_may_reserve_early(level: Level, hit_rate: float, looking_up: bool, early: bool) -> None:
    state = _state()
    state.level = level
    assert _admit().may_reserve_early(state, "pro", hit_rate=hit_rate, looking_up=looking_up) is early


def test_no_early_reservation_for_a_tier_the_shedder_would_refuse() -> None:
    shedder = LoadShedder(SheddingPolicy(max_in_flight=10), backend_pressure=lambda: 0.6)
    admit = _admit(shedder=shedder)
    state = _state()
    assert not admit.may_reserve_early(state, "free", hit_rate=0.0, looking_up=True)  # free is shed at 50 %
    assert admit.may_reserve_early(state, "pro", hit_rate=0.0, looking_up=True)  # pro only at 80 %
    assert shedder.in_flight == 0 and shedder.shed == {"free": 0, "pro": 0, "enterprise": 0}  # no side effect


# --- reserve ------------------------------------------------------------------------------------

async def test_reserve_uses_the_reservation_started_early() -> None:
    limiter = RecordingLimiter(delay_s=0.02)
    admit = _admit(limiter)
    state = _state()
    admit.start_reservation(state, Deadline.after(5))
    assert state.reserving is not None and not state.reserving.done()
    await admit.reserve(state, Deadline.after(5))
    assert len(limiter.reserves) == 1
    assert state.reservation == Reservation("res-req-1", False, False)


async def test_reserve_without_an_early_start_reserves_now() -> None:
    limiter = RecordingLimiter()
    admit = _admit(limiter)
    state = _state()
    await admit.reserve(state, Deadline.after(5))
    assert len(limiter.reserves) == 1 and state.reserving is None
    assert state.reservation is not None and state.reservation.reservation_id == "res-req-1"


async def test_the_estimate_is_the_prompt_and_max_output_at_the_requests_price() -> None:
    limiter = RecordingLimiter()
    state = _state(max_output_tokens=50)
    await _admit(limiter).reserve(state, Deadline.after(5))
    [(principal, client_ip, request_id, tokens, cost, deadline)] = limiter.reserves
    assert (principal, client_ip, request_id) == (KEY.principal, "203.0.113.7", "req-1")
    assert tokens == 6 + 50
    assert cost == 6 * 1_000 + 50 * 2_000 == state.price.cost(TokenUsage(6, 50))
    assert 0 < deadline.remaining() <= 0.25


async def test_the_estimate_uses_the_default_max_output_when_the_command_sets_none() -> None:
    limiter = RecordingLimiter()
    await _admit(limiter).reserve(_state(max_output_tokens=0), Deadline.after(5))
    assert limiter.reserves[0][3:5] == (6 + DEFAULT_MAX_OUTPUT, 6 * 1_000 + DEFAULT_MAX_OUTPUT * 2_000)


async def test_an_unpriced_request_reserves_tokens_at_no_cost() -> None:
    limiter = RecordingLimiter()
    await _admit(limiter).reserve(_state(priced=False), Deadline.after(5))
    assert limiter.reserves[0][3:5] == (56, 0)


@pytest.mark.parametrize("error", [Unavailable("ratelimit down"), DeadlineExceeded("ratelimit slow")])
async def test_an_unreachable_limiter_admits_the_request_marked(error: TollgateError) -> None:
    state = _state()
    await _admit(RecordingLimiter(error=error)).reserve(state, Deadline.after(5))
    assert state.reservation is None
    assert state.degraded == ["ratelimit_unavailable"]
    assert state.degraded_detail == ["admitted without a limit check (limiter unreachable)"]


async def test_a_limiter_without_its_store_admits_marked() -> None:
    state = _state()
    await _admit(RecordingLimiter(degraded=True)).reserve(state, Deadline.after(5))
    assert state.reservation is not None and state.reservation.degraded
    assert state.degraded == ["ratelimit_unavailable"]
    assert state.degraded_detail == ["the limiter ran without its store"]


async def test_a_healthy_reservation_is_not_degraded() -> None:
    state = _state()
    await _admit(RecordingLimiter(prefer_cheaper=True)).reserve(state, Deadline.after(5))
    assert state.reservation is not None and state.reservation.prefer_cheaper and state.degraded == []


async def test_a_refusal_propagates_from_an_early_reservation_too() -> None:
    refusal = QuotaExceeded("over", [QuotaViolation("key:k1", "tpm")], 3.0)
    admit = _admit(RecordingLimiter(error=refusal))
    state = _state()
    with pytest.raises(QuotaExceeded) as err:
        await admit.reserve(state, Deadline.after(5))
    assert err.value is refusal and state.reservation is None and state.degraded == []
    early = _state()
    admit.start_reservation(early, Deadline.after(5))
    with pytest.raises(QuotaExceeded):
        await admit.reserve(early, Deadline.after(5))


def test_is_budget_exhausted_reads_the_reason() -> None:
    budget = QuotaExceeded("budget", [QuotaViolation("org:o", "daily USD")], 60.0)
    budget.reason = BUDGET_EXHAUSTED
    assert is_budget_exhausted(budget)
    assert not is_budget_exhausted(QuotaExceeded("rate", [QuotaViolation("key:k", "rpm")], 1.0))


# --- cache-only probe ---------------------------------------------------------------------------

def test_require_probe_lets_one_miss_through_per_interval() -> None:
    now = [100.0]
    controller = _controller(now, probe_interval_s=2.0)
    for _ in range(4):
        controller.record(failed=True)
    admit = _admit(degradation=controller)
    assert admit.level() is Level.CACHE_ONLY
    admit.require_probe()  # the interval's probe
    with pytest.raises(Unavailable) as err:
        admit.require_probe()
    assert err.value.reason == "CACHE_ONLY" and err.value.retry_after_s == 2.0
    assert "backend error rate 100%" in err.value.message and "cached answers only" in err.value.message
    now[0] = 102.0
    admit.require_probe()  # the next interval's probe


# --- shedding -----------------------------------------------------------------------------------

def test_shed_holds_a_slot_and_refuses_a_tier_being_shed() -> None:
    shedder = LoadShedder(SheddingPolicy(max_in_flight=2, free_share=0.5, pro_share=0.8, retry_after_s=1.5))
    admit = _admit(shedder=shedder)
    with admit.shed("pro"):
        assert shedder.in_flight == 1
        with pytest.raises(Overloaded) as err, admit.shed("free"):
            pass  # pragma: no cover
        assert err.value.retry_after_s == 1.5 and shedder.shed["free"] == 1
        with admit.shed("enterprise"):
            assert shedder.in_flight == 2
    assert shedder.in_flight == 0


def test_without_a_shedder_shed_admits_everything() -> None:
    admit = _admit()
    with admit.shed("free"), admit.shed("free"):
        pass


# --- the local limiter (pipeline/local_limits.py) while the ratelimit service is unreachable ---------

def _local(rpm: int = 2, share: float = 1.0) -> LocalLimiter:
    book = LimitBook(None, 1.0)
    book.replace(LimitSnapshot({("key", KEY.principal.key_id): (rpm, 0, 0)}, {}))
    return LocalLimiter(book, share=share)


@pytest.mark.parametrize("error", [Unavailable("ratelimit down"), BreakerOpen("ratelimit unavailable (circuit open)"),
                                   DeadlineExceeded("ratelimit slow")])
async def test_an_unreachable_limiter_falls_back_to_the_local_limiter(error: TollgateError) -> None:
    local = _local()
    state = _state()
    await _admit(RecordingLimiter(error=error), local=local).reserve(state, Deadline.after(5))
    assert state.reservation is None and state.local_hold is not None
    assert state.degraded == ["ratelimit_unavailable"]
    assert state.degraded_detail == ["admitted by this router's local limiter (limiter unreachable)"]
    assert local.used("key", "k1")["requests_per_minute"] == 1


async def test_a_key_at_its_limit_is_refused_locally() -> None:
    local = _local(rpm=2)
    admit = _admit(RecordingLimiter(error=Unavailable("ratelimit down")), local=local)
    for _ in range(2):
        await admit.reserve(_state(), Deadline.after(5))
    with pytest.raises(QuotaExceeded) as err:
        await admit.reserve(_state(), Deadline.after(5))
    assert [v.subject for v in err.value.violations] == ["key:k1"]
    assert err.value.metadata["limiter"] == "local" and err.value.retry_after_s > 0


async def test_reservations_the_service_made_carry_over_into_the_outage() -> None:
    local = _local(rpm=2)
    limiter = RecordingLimiter()
    admit = _admit(limiter, local=local)
    for _ in range(2):
        state = _state()
        await admit.reserve(state, Deadline.after(5))
        assert state.reservation is not None and state.local_hold is not None and state.degraded == []
    limiter.error = Unavailable("ratelimit down")
    with pytest.raises(QuotaExceeded):
        await admit.reserve(_state(), Deadline.after(5))


async def test_the_local_share_is_a_fraction_of_the_limit() -> None:
    local = _local(rpm=6, share=1 / 3)
    admit = _admit(RecordingLimiter(error=Unavailable("ratelimit down")), local=local)
    for _ in range(2):
        await admit.reserve(_state(), Deadline.after(5))
    with pytest.raises(QuotaExceeded):
        await admit.reserve(_state(), Deadline.after(5))
