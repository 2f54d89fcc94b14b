"""LocalCharges (services/router/pipeline/local_charges.py): what the local limiter admitted, queued with its
actual usage once served, delivered to the ratelimit service once per request id when it answers again, kept on
failure, bounded; and admission waiting for it before it reserves with the service again."""

from __future__ import annotations

import asyncio
import logging

import pytest

from libs.breaker import BreakerOpen
from libs.chat import FinishReason, Principal, TokenUsage
from libs.deadlines import Deadline
from libs.errors import InvalidArgument, TollgateError, Unavailable
from services.router.control.limit_book import LimitBook, LimitSnapshot
from services.router.pipeline.account import AccountStage
from services.router.pipeline.admit import AdmitStage
from services.router.pipeline.local_charges import LocalCharges
from services.router.pipeline.local_limits import LocalLimiter
from services.router.pipeline.ports import Charge, Reservation
from services.router.pipeline.request import RequestState
from tests.support.router import KEY, PRIMARY, Ledger, command, registry_of

P = Principal("org1", "team1", "k1")


class FakeService:
    """The ratelimit service as the router sees it: reserve, and Charge idempotent per request id.

    ``up`` False: every call fails as an open breaker would. ``lose_reply``: ids whose first Charge is applied but
    answered with a timeout (the reply lost). ``invalid``: ids refused for good. ``hang``: calls wait that long.
    """

    def __init__(self, *, up: bool = True) -> None:
        self.up = up
        self.hang = 0.0
        self.lose_reply: set[str] = set()
        self.invalid: set[str] = set()
        self.applied: dict[str, Charge] = {}
        self.sent: list[str] = []
        self.events: list[str] = []
        self.fail_after: int | None = None  # answer this many more charges, then go down

    def _check(self) -> None:
        if not self.up:
            raise BreakerOpen("ratelimit is unavailable (circuit open)")

    async def reserve(self, principal: Principal, client_ip: str, request_id: str, estimated_tokens: int,
                      estimated_cost_nano_usd: int, deadline: Deadline) -> Reservation:
        self.events.append(f"reserve:{request_id}")
        self._check()
        return Reservation(f"res-{request_id}", False, False)

    async def commit(self, reservation_id: str, actual_tokens: int, actual_cost_nano_usd: int,
                     deadline: Deadline) -> None:
        self._check()

    async def release(self, reservation_id: str, deadline: Deadline) -> None:
        self._check()

    async def charge(self, charge: Charge, deadline: Deadline) -> None:
        self.sent.append(charge.request_id)
        if self.hang:
            await asyncio.sleep(self.hang)
        if self.fail_after is not None:
            if self.fail_after == 0:
                self.up = False
            self.fail_after -= 1
        self._check()
        if charge.request_id in self.invalid:
            raise InvalidArgument([], "bad charge")
        self.events.append(f"charge:{charge.request_id}")
        self.applied.setdefault(charge.request_id, charge)  # idempotent: a replay draws nothing
        if charge.request_id in self.lose_reply:
            self.lose_reply.discard(charge.request_id)
            raise Unavailable("ratelimit did not answer in time", reason="BACKEND_TIMEOUT")


def _charge(rid: str, tokens: int = 10, cost: int = 100) -> Charge:
    return Charge(P, "203.0.113.7", rid, 1, tokens, cost, 1_742_000_000.0)


def _leash(s: float = 1.0) -> Deadline:
    return Deadline.after(s)


# --- queued after settle ---------------------------------------------------------------------------------------

def _limits() -> LocalLimiter:
    book = LimitBook(None, 1.0)
    book.replace(LimitSnapshot({("key", "k1"): (10, 0, 0)}))
    return LocalLimiter(book)


async def _admitted(admit: AdmitStage, rid: str) -> RequestState:
    state = RequestState.begin(KEY, command(), rid)
    state.use_model(PRIMARY, registry_of(PRIMARY))
    await admit.reserve(state, Deadline.after(5))
    return state


def _served(state: RequestState) -> RequestState:
    state.text, state.usage, state.finish, state.provider = ["Paris"], TokenUsage(10, 3, 0), FinishReason.STOP, "f"
    return state


async def test_a_request_admitted_locally_is_queued_with_its_actual_usage_once_served() -> None:
    service = FakeService(up=False)
    local, charges = _limits(), LocalCharges(service)
    admit = AdmitStage(service, default_max_output_tokens=100, side_timeout_s=0.25, local=local, charges=charges)
    account = AccountStage(service, _NoCache(), Ledger(), local, charges)
    served = _served(await _admitted(admit, "req-served"))
    failed = await _admitted(admit, "req-failed")  # nothing generated: released, costs nothing
    assert served.reservation is None and served.local_hold is not None and served.local_hold.local
    for state in (served, failed):
        account.settle_later(state)
    await account.aclose()
    assert len(charges) == 1
    [queued] = charges._queue
    cost = served.price.cost(TokenUsage(10, 3, 0))
    assert queued == Charge(KEY.principal, served.cmd.client_ip, "req-served", 1, 13, cost,
                            served.started_at.timestamp())
    assert cost > 0

    # A request the service reserved is the service's already: recorded locally, never charged.
    service.up = True
    await charges.flush(_leash())
    assert list(service.applied) == ["req-served"]
    reserved = _served(await _admitted(admit, "req-reserved"))
    assert reserved.reservation is not None and reserved.local_hold is not None and not reserved.local_hold.local
    account.settle_later(reserved)
    await account.aclose()
    assert len(charges) == 0 and list(service.applied) == ["req-served"]


class _NoCache:
    async def lookup(self, *args: object, **kwargs: object) -> None:
        return None

    async def store(self, *args: object, **kwargs: object) -> None:
        return None


# --- delivery ------------------------------------------------------------------------------------------------

async def test_nothing_is_delivered_while_the_service_is_away_and_everything_once_when_it_answers() -> None:
    service = FakeService(up=False)
    charges = LocalCharges(service)
    for i in range(20):
        charges.add(_charge(f"r{i}"))
    with pytest.raises(Unavailable) as err:
        await charges.flush(_leash())
    assert err.value.reason == "CHARGES_UNDELIVERED"
    assert len(charges) == 20 and service.applied == {}
    assert service.sent == ["r0"]  # the oldest alone first: the probe; the pass ends at the first failure

    service.up = True
    service.sent.clear()
    await charges.flush(_leash())
    assert len(charges) == 0 and charges.delivered == 20
    assert list(service.applied) == [f"r{i}" for i in range(20)]  # oldest first
    assert sorted(service.sent) == sorted(f"r{i}" for i in range(20))  # each sent once
    await charges.flush(_leash())  # nothing queued: returns at once, sends nothing
    assert len(service.sent) == 20


async def test_a_failure_midway_keeps_the_rest_in_order_for_the_next_pass() -> None:
    service = FakeService()
    service.fail_after = 3  # 3 charges answered, then the service goes away
    charges = LocalCharges(service, concurrency=2)
    for i in range(8):
        charges.add(_charge(f"r{i}"))
    with pytest.raises(Unavailable):
        await charges.flush(_leash())
    assert list(service.applied) == ["r0", "r1", "r2"]
    assert [c.request_id for c in charges._queue] == [f"r{i}" for i in range(3, 8)]
    service.up, service.fail_after = True, None
    await charges.flush(_leash())
    assert list(service.applied) == [f"r{i}" for i in range(8)] and len(charges) == 0


async def test_a_lost_reply_is_sent_again_and_drawn_once() -> None:
    service = FakeService()
    service.lose_reply = {"r1"}
    charges = LocalCharges(service)
    for i in range(3):
        charges.add(_charge(f"r{i}"))
    with pytest.raises(Unavailable):
        await charges.flush(_leash())
    assert [c.request_id for c in charges._queue] == ["r1"]  # applied, but not known to be: kept
    await charges.flush(_leash())
    assert service.sent.count("r1") == 2 and len(charges) == 0 and charges.delivered == 3
    assert list(service.applied) == ["r0", "r1", "r2"]  # the service drew it once (the replay is a no-op)


async def test_a_charge_refused_for_good_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    service = FakeService()
    service.invalid = {"bad"}
    charges = LocalCharges(service)
    for rid in ("a", "bad", "b"):
        charges.add(_charge(rid))
    with caplog.at_level(logging.ERROR):
        await charges.flush(_leash())
    assert len(charges) == 0 and charges.rejected == 1 and list(service.applied) == ["a", "b"]
    assert any("bad" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)


async def test_the_queue_is_bounded_dropping_the_oldest_and_logging_the_count_once_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    charges = LocalCharges(FakeService(up=False), max_pending=3, log_every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR):
        for i in range(5):
            charges.add(_charge(f"r{i}"))
        assert [c.request_id for c in charges._queue] == ["r2", "r3", "r4"] and charges.dropped == 2
        now[0] = 5.0
        charges.add(_charge("r5"))
        charges.add(_charge("r6"))
        now[0] = 10.0
        charges.add(_charge("r7"))
    lines = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
    # The first drop at once, then the 3 dropped since in one line after the interval: never one per charge.
    assert len(lines) == 2 and "dropped 1 " in lines[0] and "dropped 4 " in lines[1]
    assert charges.dropped == 5 and len(charges) == 3


async def test_run_forever_retries_without_traffic() -> None:
    service = FakeService(up=False)
    charges = LocalCharges(service, retry_s=0.01)
    charges.add(_charge("r0"))
    task = asyncio.create_task(charges.run_forever())
    try:
        await asyncio.sleep(0.05)
        assert len(charges) == 1
        service.up = True
        for _ in range(100):
            if not len(charges):
                break
            await asyncio.sleep(0.01)
        assert list(service.applied) == ["r0"]
    finally:
        task.cancel()


async def test_aclose_tries_once_more_and_reports_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    service = FakeService(up=False)
    charges = LocalCharges(service)
    charges.add(_charge("r0"))
    with caplog.at_level(logging.ERROR):
        await charges.aclose(timeout_s=0.1)
    assert any("1 charges for local admissions not delivered" in r.getMessage() for r in caplog.records)
    service.up = True
    await charges.aclose(timeout_s=1.0)
    assert list(service.applied) == ["r0"]


# --- admission: no reservation while charges are undelivered ------------------------------------------------------

async def test_admission_stays_local_until_the_charges_are_delivered_then_reserves_again() -> None:
    service = FakeService()
    local, charges = _limits(), LocalCharges(service)
    admit = AdmitStage(service, default_max_output_tokens=100, side_timeout_s=0.25, local=local, charges=charges)
    for i in range(3):
        charges.add(_charge(f"local-{i}"))
    # Queued: admitted locally at once (no waiting on the backlog), and a pass is started.
    state = await _admitted(admit, "req-0")
    assert state.reservation is None and state.degraded == ["ratelimit_unavailable"] and charges.draining
    assert service.events == []
    await charges.flush(_leash())
    results = await asyncio.gather(*(_admitted(admit, f"req-{i}") for i in range(1, 4)))
    assert all(s.reservation is not None for s in results)
    # Every charge reached the service before any reservation, each once.
    first_reserve = next(i for i, e in enumerate(service.events) if e.startswith("reserve"))
    assert sorted(service.events[:first_reserve]) == [f"charge:local-{i}" for i in range(3)]
    assert all(service.sent.count(f"local-{i}") == 1 for i in range(3))


async def test_while_the_service_is_away_no_reserve_is_tried_and_a_pass_starts_per_request() -> None:
    service = FakeService(up=False)
    local, charges = _limits(), LocalCharges(service)
    admit = AdmitStage(service, default_max_output_tokens=100, side_timeout_s=0.25, local=local, charges=charges)
    charges.add(_charge("local-0"))
    for i in range(3):
        state = await _admitted(admit, f"req-{i}")
        assert state.reservation is None and state.degraded == ["ratelimit_unavailable"]
        while charges.draining:  # the pass it started runs (and fails: the breaker is open)
            await asyncio.sleep(0)
    assert service.events == [] and service.sent == ["local-0"] * 3 and len(charges) == 1

    # A hung service: requests do not wait for the pass (admitted locally at once); one pass at a time.
    service.up, service.hang = True, 0.2
    states = await asyncio.gather(*(_admitted(admit, f"req-h{i}") for i in range(3)))
    assert all(s.reservation is None for s in states) and charges.draining
    service.hang = 0.0
    await charges.flush(_leash())
    assert len(charges) == 0 and list(service.applied) == ["local-0"] and service.sent.count("local-0") == 4
    assert (await _admitted(admit, "req-3")).reservation is not None


@pytest.mark.parametrize("error", [Unavailable("x"), InvalidArgument([], "x")])
async def test_errors_are_classified(error: TollgateError) -> None:
    class Failing(FakeService):
        async def charge(self, charge: Charge, deadline: Deadline) -> None:
            raise error

    charges = LocalCharges(Failing())
    charges.add(_charge("r0"))
    if isinstance(error, Unavailable):
        with pytest.raises(Unavailable):
            await charges.flush(_leash())
        assert len(charges) == 1
    else:
        await charges.flush(_leash())
        assert len(charges) == 0 and charges.rejected == 1
