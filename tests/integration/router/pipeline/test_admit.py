"""AdmitStage across a ratelimit outage: the real ratelimit service (Redis, PostgreSQL) in-process, then stopped;
the routers' local limiters (limits loaded from the same PostgreSQL) take over without a fresh burst, and when the
service is started again it is charged for what they admitted (no fresh bucket at the switch-back either)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from libs.breaker import Breaker
from libs.chat import ChatMessage, FinishReason, GenerationParams, Role, TokenUsage
from libs.clients import Downstream
from libs.deadlines import Deadline
from libs.errors import QuotaExceeded, Unavailable
from libs.grpc_server import GrpcServer
from libs.pg_migrations import migrate
from services.ratelimit.server import RateLimitApp, build_app
from services.ratelimit.settings import RateLimitSettings
from services.router.control.limit_book import LimitBook
from services.router.downstreams import GrpcRateLimitClient
from services.router.pipeline.account import AccountStage
from services.router.pipeline.admit import AdmitStage
from services.router.pipeline.local_charges import LocalCharges
from services.router.pipeline.local_limits import LocalLimiter
from services.router.pipeline.request import GenerateCommand, RequestState
from tests.integration.ratelimit.ratelimit_support import MIGRATIONS, set_limit
from tests.support.router import KEY, Ledger

LIMIT_RPM = 12


@dataclass
class Mesh:
    db: asyncpg.Pool
    server: GrpcServer
    app: RateLimitApp
    port: int
    settings: RateLimitSettings
    stopped: bool = False

    async def stop_ratelimit(self) -> None:
        self.stopped = True
        await self.server.stop(0)
        await self.app.close()

    async def start_ratelimit(self) -> None:
        """A fresh service process's worth (nothing in memory) on the same port, the same Redis and PostgreSQL."""
        settings = self.settings.model_copy(update={"port": self.port})
        self.app = await build_app(settings)
        self.server = GrpcServer(settings, self.app.bindings)
        await self.server.start()
        self.stopped = False


@pytest.fixture
async def mesh(clean_env: None, database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Mesh]:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, MIGRATIONS)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=4)
    await set_limit(pool, "key", KEY.principal.key_id, rpm=LIMIT_RPM)
    settings = RateLimitSettings(host="127.0.0.1", port=0, redis_url=redis_url, redis_prefix=redis_prefix,
                                 database_url=database_url, limits_refresh_s=0.1, sweep_interval_s=0.1,
                                 grace_period_s=1, redis_timeout_s=2.0)
    app = await build_app(settings)
    server = GrpcServer(settings, app.bindings)
    port = await server.start()
    running = Mesh(pool, server, app, port, settings)
    try:
        yield running
    finally:
        if not running.stopped:
            await running.stop_ratelimit()
        await pool.close()


async def _router(mesh: Mesh, share: float) -> tuple[AdmitStage, Downstream]:
    book = LimitBook(mesh.db, 0.1)
    await book.load()
    ds = Downstream("ratelimit", f"127.0.0.1:{mesh.port}", breaker=Breaker("ratelimit"), margin_s=0.01, cap_s=0.5)
    admit = AdmitStage(GrpcRateLimitClient(ds), default_max_output_tokens=16, side_timeout_s=0.5,
                       local=LocalLimiter(book, share=share))
    return admit, ds


async def _try(admit: AdmitStage) -> RequestState | None:
    cmd = GenerateCommand(model="m", messages=[ChatMessage(Role.USER, "hello")],
                          params=GenerationParams(temperature=0.0, max_output_tokens=16))
    state = RequestState.begin(KEY, cmd)
    try:
        await admit.reserve(state, Deadline.after(5))
    except QuotaExceeded as exc:
        assert exc.violations and exc.violations[0].subject == f"key:{KEY.principal.key_id}"
        return None
    return state


@pytest.mark.parametrize("before", [LIMIT_RPM, 6, 0])
async def test_one_router_stays_within_the_limit_across_the_switch_over(mesh: Mesh, before: int) -> None:
    """S = ``before`` admitted by the service, then it stops: admitted <= S + max(0, A - S) = max(S, 12)."""
    admit, ds = await _router(mesh, share=1.0)
    try:
        service = [await _try(admit) for _ in range(before)]
        assert all(s is not None and s.reservation is not None and not s.degraded for s in service)
        await mesh.stop_ratelimit()
        local = [s for s in [await _try(admit) for _ in range(40)] if s is not None]
    finally:
        await ds.close()
    assert len(local) == LIMIT_RPM - before
    assert all(s.reservation is None and s.degraded == ["ratelimit_unavailable"] for s in local)
    assert before + len(local) <= max(before, LIMIT_RPM)


async def test_two_routers_at_half_share_stay_within_the_stated_bound(mesh: Mesh) -> None:
    """R = 2 at share 1/2 (A = 6 each); the service admitted 4 through router a and 2 through router b, then
    stopped. Bound: S + sum max(0, A_i - S_i) = 6 + 2 + 4 = 12 = the limit."""
    (a, ds_a), (b, ds_b) = await _router(mesh, 0.5), await _router(mesh, 0.5)
    try:
        before = [await _try(a) for _ in range(4)] + [await _try(b) for _ in range(2)]
        assert all(s is not None and s.reservation is not None for s in before)
        await mesh.stop_ratelimit()
        local_a = [s for s in [await _try(a) for _ in range(20)] if s is not None]
        local_b = [s for s in [await _try(b) for _ in range(20)] if s is not None]
    finally:
        await ds_a.close()
        await ds_b.close()
    assert (len(local_a), len(local_b)) == (2, 4)
    assert len(before) + len(local_a) + len(local_b) <= LIMIT_RPM


class _NoCache:
    async def lookup(self, *args: object, **kwargs: object) -> None:
        return None

    async def store(self, *args: object, **kwargs: object) -> None:
        return None


async def _settle_served(account: AccountStage, state: RequestState) -> None:
    state.text, state.usage, state.finish = ["hi"], TokenUsage(4, 1, 0), FinishReason.STOP
    account.settle_later(state)
    await account.aclose()


@pytest.mark.parametrize("write_back", [True, False])
async def test_the_service_is_charged_for_local_admissions_and_gives_no_fresh_bucket_when_it_returns(
        mesh: Mesh, write_back: bool) -> None:
    """L = 12/min. The service admits 2, stops; the router admits 5 locally (served and settled), the service
    starts again (a new process: nothing in memory, its Redis buckets refilled meanwhile). With the write-back it
    admits only L - 7 more (plus what refilled over the test), then refuses: its bucket was charged the 5, no fresh
    bucket. Without it (``write_back`` False, the old behaviour) it admits L - 2: the local 5 are admitted twice."""
    book = LimitBook(mesh.db, 0.1)
    await book.load()
    ds = Downstream("ratelimit", f"127.0.0.1:{mesh.port}", margin_s=0.01, cap_s=0.5,
                    breaker=Breaker("ratelimit", reset_timeout_s=0.1))
    client = GrpcRateLimitClient(ds)
    local = LocalLimiter(book)
    charges = LocalCharges(client) if write_back else None
    admit = AdmitStage(client, default_max_output_tokens=16, side_timeout_s=0.5, local=local, charges=charges)
    account = AccountStage(client, _NoCache(), Ledger(), local, charges)
    try:
        t0 = time.monotonic()
        service = [await _try(admit) for _ in range(2)]
        assert all(s is not None and s.reservation is not None for s in service)
        await mesh.stop_ratelimit()
        for _ in range(5):
            state = await _try(admit)
            assert state is not None and state.reservation is None and state.degraded == ["ratelimit_unavailable"]
            await _settle_served(account, state)
        assert charges is None or len(charges) == 5

        await mesh.start_ratelimit()
        # The channel reconnects and the breaker lets a probe through: the charges go as soon as it answers.
        for _ in range(100):
            try:
                if charges is not None:
                    await charges.flush(Deadline.after(1))
                else:
                    await client.commit("0123456789abcdef", 0, 0, Deadline.after(1))
                break
            except Unavailable:
                await asyncio.sleep(0.05)
            except Exception:  # the commit probe's NOT_FOUND: the service answers
                break
        after = 0
        for _ in range(40):
            state = await _try(admit)
            if state is None:
                break
            assert state.reservation is not None, "admitted by the local limiter, not the service"
            after += 1
        elapsed = time.monotonic() - t0
    finally:
        await ds.close()
    refill = LIMIT_RPM * elapsed / 60
    if charges is not None:
        assert len(charges) == 0
        assert LIMIT_RPM - 7 <= after <= LIMIT_RPM - 7 + refill
        assert 2 + 5 + after <= LIMIT_RPM + refill  # the token bucket's own bound over the whole test
    else:
        assert after >= LIMIT_RPM - 2  # a fresh bucket: what the router admitted locally is admitted again
