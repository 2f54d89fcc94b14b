"""The traffic plane on the request path: retries and backoff, 429 cool-downs, context-window fallback,
degradation tiers, priority shedding, the auto router and A/B assignment (in-memory downstreams)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from libs.chat import ChatMessage, FinishReason, GenerationChunk, GenerationParams, Principal, Role, TokenUsage
from libs.deadlines import Deadline
from libs.errors import InvalidArgument, Overloaded, QuotaExceeded, QuotaViolation, Unavailable
from services.router.control.experiments import Experiment, ExperimentBook, Variant
from services.router.control.keys import KeyRecord
from services.router.control.registry import ModelEntry
from services.router.pipeline.complexity import RouteDecision
from services.router.pipeline.degradation import DegradationController, DegradationPolicy, Level
from services.router.pipeline.failover import CONTEXT_WINDOW_EXCEEDED, RetryPolicy
from services.router.pipeline.gateway import Gateway
from services.router.pipeline.ports import CachedAnswer
from services.router.pipeline.request import GenerateCommand, Summary
from services.router.pipeline.shedding import LoadShedder, SheddingPolicy
from tests.support.router import BACKUP, KEY, PRIMARY, Ledger, MemoryCache, MemoryLimiter, command, registry_of


class Backends:
    """Per target, a script of outcomes consumed call by call (the last one repeats):
    ok | down (backend fault) | 429 (provider rate limit, retry-after 0.2 s) | busy (overloaded)
    | overflow (prompt too long) | slow (streams until cancelled)."""

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        self.scripts = scripts
        self.calls: list[tuple[str, float]] = []
        self.cooling: dict[str, float] = {}

    def order(self, targets: Sequence[str]) -> list[str]:
        now = time.monotonic()
        return [t for t in targets if self.cooling.get(t, 0) <= now]

    def cool_down(self, target: str, seconds: float) -> None:
        self.cooling[target] = time.monotonic() + seconds

    def cooling_for(self, targets: Sequence[str]) -> float | None:
        now = time.monotonic()
        waits = [self.cooling[t] - now for t in targets if self.cooling.get(t, 0) > now]
        return min(waits) if waits else None

    def targets_called(self) -> list[str]:
        return [t for t, _ in self.calls]

    async def generate(self, target: str, request_id: str, model: str, messages: list[ChatMessage],
                       params: GenerationParams, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        self.calls.append((target, time.monotonic()))
        script = self.scripts[target]
        mode = script.pop(0) if len(script) > 1 else script[0]
        if mode == "down":
            raise Unavailable("backend down", reason="BACKEND_ERROR")
        if mode == "429":
            raise QuotaExceeded("provider rate limit", [QuotaViolation("provider:p", "rpm")], 0.2)
        if mode == "busy":
            raise Overloaded("queue full", 0.2)
        if mode == "overflow":
            err = InvalidArgument([], "too long")
            err.reason = CONTEXT_WINDOW_EXCEEDED
            raise err
        if mode == "slow":
            while True:
                yield GenerationChunk(delta="word ")
                await asyncio.sleep(0.01)
        yield GenerationChunk(delta="answer")
        yield GenerationChunk(usage=TokenUsage(10, 1, 0), finish_reason=FinishReason.STOP, model=model,
                              provider="fake")


def _gw(scripts: dict[str, list[str]], *models: ModelEntry, **kw: object) -> tuple[Gateway, Backends, MemoryCache]:
    backends, cache = Backends(scripts), MemoryCache()
    kw.setdefault("ratelimit", MemoryLimiter())
    gw = Gateway(registry=registry_of(*(models or (PRIMARY, BACKUP))), cache=cache, inference=backends, usage=Ledger(),
                 default_max_output_tokens=100, side_call_timeout_s=0.5, **kw)  # type: ignore[arg-type]
    return gw, backends, cache


async def _run(gw: Gateway, cmd: GenerateCommand, *, key: KeyRecord = KEY, timeout_s: float = 5) -> Summary:
    summary = None
    async for event in gw.generate(key, cmd, Deadline(time.monotonic() + timeout_s, True)):
        if isinstance(event, Summary):
            summary = event
    await gw.aclose()
    assert summary is not None
    return summary


# --- retries and fallback ------------------------------------------------------------------------

async def test_a_failed_round_is_retried_after_a_backoff_within_the_attempt_budget() -> None:
    gw, backends, _ = _gw({"t-primary": ["down", "ok"]}, retry=RetryPolicy(max_attempts=3, backoff_base_s=0.05))
    s = await _run(gw, command())
    assert s.model == "primary" and s.attempts == 2 and backends.targets_called() == ["t-primary", "t-primary"]


async def test_the_attempt_budget_bounds_the_work_per_request() -> None:
    gw, backends, _ = _gw({"t-primary": ["down"], "t-backup": ["down"]},
                          retry=RetryPolicy(max_attempts=3, backoff_base_s=0.01))
    with pytest.raises(Unavailable) as err:
        await _run(gw, command(fallback_models=("backup",)))
    assert err.value.reason == "NO_BACKEND"
    assert backends.targets_called() == ["t-primary", "t-backup", "t-primary"]


async def test_no_retry_is_started_past_the_callers_deadline() -> None:
    # The provider asks for 0.2 s; the caller has 0.15 s: the router gives up instead of waiting past it.
    gw, backends, _ = _gw({"t-primary": ["429"]}, retry=RetryPolicy(max_attempts=4))
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        await _run(gw, command(), timeout_s=0.15)
    assert time.monotonic() - t0 < 0.15
    assert len(backends.calls) == 1


async def test_a_429_cools_the_backend_down_for_its_retry_after_and_is_then_retried() -> None:
    gw, backends, _ = _gw({"t-primary": ["429", "ok"]}, retry=RetryPolicy(max_attempts=3, backoff_base_s=0.01))
    s = await _run(gw, command(), timeout_s=2)
    (_, first), (_, second) = backends.calls
    assert s.model == "primary" and second - first >= 0.19  # honoured retry-after, not the 10 ms backoff


async def test_a_429_moves_traffic_to_the_fallback_at_once() -> None:
    gw, backends, _ = _gw({"t-primary": ["429"], "t-backup": ["ok"]})
    s = await _run(gw, command(fallback_models=("backup",), cache=_no_cache()))
    assert s.model == "backup" and backends.targets_called() == ["t-primary", "t-backup"]
    s2 = await _run(gw, command(fallback_models=("backup",), cache=_no_cache()))  # still cooling: not even tried
    assert s2.model == "backup" and backends.targets_called()[-1] == "t-backup" and len(backends.calls) == 3


async def test_bad_input_is_not_retried() -> None:
    class Rejecting(Backends):
        async def generate(self, target: str, request_id: str, model: str, messages: list[ChatMessage],
                           params: GenerationParams, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
            self.calls.append((target, time.monotonic()))
            raise InvalidArgument([], "bad")
            yield GenerationChunk()  # pragma: no cover

    backends = Rejecting({})
    gw = Gateway(registry=registry_of(PRIMARY, BACKUP), cache=MemoryCache(), ratelimit=MemoryLimiter(),
                 inference=backends, usage=Ledger(), default_max_output_tokens=100, side_call_timeout_s=0.5)
    with pytest.raises(InvalidArgument):
        await _run(gw, command(fallback_models=("backup",)))
    assert len(backends.calls) == 1


# --- context window ------------------------------------------------------------------------------

SMALL = ModelEntry("small", "p", "t-small", 64, "cheap")
LARGE = ModelEntry("large", "p", "t-large", 100_000, "cheap")
LONG_PROMPT = "word " * 400


async def test_a_prompt_too_long_for_the_model_goes_to_one_with_a_larger_window() -> None:
    gw, backends, _ = _gw({"t-small": ["ok"], "t-large": ["ok"]}, SMALL, LARGE)
    cmd = GenerateCommand(model="small", messages=[ChatMessage(Role.USER, LONG_PROMPT)],
                          params=GenerationParams(temperature=0.0))
    s = await _run(gw, cmd)
    assert s.model == "large" and backends.targets_called() == ["t-large"]
    assert "context window" in s.route_reason


async def test_a_backend_overflow_falls_back_to_a_larger_window() -> None:
    # The router's estimate said it fits; the backend's tokenizer disagreed.
    gw, backends, _ = _gw({"t-small": ["overflow"], "t-large": ["ok"]}, SMALL, LARGE)
    s = await _run(gw, command("small"))
    assert s.model == "large" and backends.targets_called() == ["t-small", "t-large"]


async def test_no_model_fits_is_invalid_argument_with_the_reason() -> None:
    gw, backends, _ = _gw({"t-small": ["ok"]}, SMALL)
    cmd = GenerateCommand(model="small", messages=[ChatMessage(Role.USER, LONG_PROMPT)],
                          params=GenerationParams(temperature=0.0))
    with pytest.raises(InvalidArgument) as err:
        await _run(gw, cmd)
    assert err.value.reason == CONTEXT_WINDOW_EXCEEDED and not backends.calls


# --- degradation tiers ---------------------------------------------------------------------------

def _controller(**kw: float) -> DegradationController:
    policy = DegradationPolicy(**{"min_samples": 4, "recover_s": 60, "probe_interval_s": 60, **kw})  # type: ignore[arg-type]
    return DegradationController(policy)


async def test_reduced_mode_serves_the_cheaper_model_and_says_why() -> None:
    controller = _controller()
    for failed in (True, False, False, False):  # 25 % errors: reduced
        controller.record(failed=failed)
    gw, backends, _ = _gw({"t-primary": ["ok"], "t-backup": ["ok"]}, degradation=controller)
    s = await _run(gw, command())
    assert s.model == "backup" and s.degradation_level == "reduced" and backends.targets_called() == ["t-backup"]
    assert s.degraded_reasons == ["backend_errors"] and "error rate 25%" in s.degraded_detail


async def test_cache_only_serves_stale_answers_and_otherwise_is_unavailable_with_a_clear_message() -> None:
    controller = _controller()
    for _ in range(4):
        controller.record(failed=True)
    controller.allow_probe()  # the interval's probe is spent
    gw, backends, cache = _gw({"t-primary": ["ok"]}, degradation=controller)
    cmd = command()
    key = ("org1", "capital of France?")
    cache.entries[key] = CachedAnswer("old answer", TokenUsage(10, 3, 0), "primary", "exact", True)
    cache.stale_only.add(key)
    s = await _run(gw, cmd)
    assert s.degradation_level == "cache_only" and "stale_cache" in s.degraded_reasons and not backends.calls
    with pytest.raises(Unavailable) as err:
        await _run(gw, GenerateCommand(model="primary", messages=[ChatMessage(Role.USER, "something new")],
                                       params=GenerationParams(temperature=0.0)))
    assert err.value.reason == "CACHE_ONLY" and "cached answers only" in err.value.message
    assert err.value.retry_after_s == 60 and not backends.calls


def test_the_level_drops_at_once_and_recovers_one_step_at_a_time() -> None:
    now = [0.0]
    controller = DegradationController(DegradationPolicy(window_s=10, min_samples=4, recover_s=30),
                                       clock=lambda: now[0])
    for _ in range(4):
        controller.record(failed=True)
    assert controller.evaluate() is Level.CACHE_ONLY  # straight down, no waiting
    now[0] = 11  # the failures have left the window: signals say "full"
    assert controller.evaluate() is Level.CACHE_ONLY  # ...but up only after recover_s of health
    now[0] = 40
    assert controller.evaluate() is Level.CACHE_ONLY
    now[0] = 41.5
    assert controller.evaluate() is Level.REDUCED  # one step
    now[0] = 60
    assert controller.evaluate() is Level.REDUCED
    now[0] = 72
    assert controller.evaluate() is Level.FULL


def test_a_relapse_during_recovery_resets_the_clock() -> None:
    now = [0.0]
    controller = DegradationController(DegradationPolicy(window_s=10, min_samples=4, recover_s=30),
                                       clock=lambda: now[0])
    for _ in range(4):
        controller.record(failed=True)
    controller.evaluate()
    now[0] = 11
    controller.evaluate()  # healthy since 11
    now[0] = 25
    for _ in range(4):
        controller.record(failed=True)
    assert controller.evaluate() is Level.CACHE_ONLY
    now[0] = 36
    assert controller.evaluate() is Level.CACHE_ONLY  # not 30 s of health since the relapse
    now[0] = 67
    assert controller.evaluate() is Level.REDUCED


def test_load_pressure_reduces_and_cache_only_lets_one_probe_per_interval() -> None:
    now = [0.0]
    pressure = [0.95]
    controller = DegradationController(DegradationPolicy(probe_interval_s=1.0), pressure=lambda: pressure[0],
                                       clock=lambda: now[0])
    assert controller.evaluate() is Level.REDUCED and controller.reason_code == "load"
    assert controller.allow_probe() and not controller.allow_probe()
    now[0] = 1.0
    assert controller.allow_probe()


# --- priority shedding ---------------------------------------------------------------------------

FREE_KEY = KeyRecord("kf", Principal("org1", "team1", "kf"), "member", (), None, False, tier="free")
ENTERPRISE_KEY = KeyRecord("ke", Principal("org1", "team1", "ke"), "member", (), None, False, tier="enterprise")


async def test_under_load_free_is_shed_first_then_pro_and_enterprise_last() -> None:
    shedder = LoadShedder(SheddingPolicy(max_in_flight=10, free_share=0.5, pro_share=0.8, retry_after_s=2))
    gw, _, _ = _gw({"t-primary": ["slow"]}, shedder=shedder)
    held: list[asyncio.Task[Summary]] = []
    for _ in range(5):  # five free generations hold half of the capacity
        held.append(asyncio.create_task(_run(gw, command(cache=_no_cache()), key=FREE_KEY)))
    await asyncio.sleep(0.05)
    assert shedder.in_flight == 5
    with pytest.raises(Overloaded) as err:
        await _run(gw, command(cache=_no_cache()), key=FREE_KEY)
    assert err.value.retry_after_s == 2 and "free-tier" in err.value.message
    for _ in range(3):  # pro still gets in, up to 80 %
        held.append(asyncio.create_task(_run(gw, command(cache=_no_cache()), key=KEY)))
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded):
        await _run(gw, command(cache=_no_cache()), key=KEY)
    held.append(asyncio.create_task(_run(gw, command(cache=_no_cache()), key=ENTERPRISE_KEY)))
    await asyncio.sleep(0.05)
    assert shedder.in_flight == 9 and shedder.shed == {"free": 1, "pro": 1, "enterprise": 0}
    # A LOW-priority enterprise request is shed like free traffic.
    with pytest.raises(Overloaded):
        await _run(gw, command(cache=_no_cache(), priority="low"), key=ENTERPRISE_KEY)
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    assert shedder.in_flight == 0


async def test_cache_hits_are_served_even_when_shedding() -> None:
    shedder = LoadShedder(SheddingPolicy(max_in_flight=1), backend_pressure=lambda: 1.0)
    gw, backends, cache = _gw({"t-primary": ["ok"]}, shedder=shedder)
    cache.entries[("org1", "capital of France?")] = CachedAnswer("Paris", TokenUsage(10, 3, 0), "primary", "exact",
                                                                 False)
    s = await _run(gw, command(), key=FREE_KEY)
    assert s.cache_tier == "exact" and not backends.calls


def _no_cache() -> object:
    from services.router.pipeline.request import CachePolicy

    return CachePolicy(no_cache=True)


# --- auto routing and experiments ----------------------------------------------------------------

class FixedRouter:
    def __init__(self, tier: str) -> None:
        self.tier = tier

    def decide(self, messages: Sequence[ChatMessage]) -> RouteDecision:
        return RouteDecision(self.tier, 0.3 if self.tier == "strong" else 0.9, "classifier")


async def test_auto_follows_the_complexity_router_with_the_other_tier_as_fallback() -> None:
    gw, backends, _ = _gw({"t-primary": ["down"], "t-backup": ["ok"]}, auto_router=FixedRouter("strong"),
                          retry=RetryPolicy(max_attempts=2))
    s = await _run(gw, command("auto"))
    assert backends.targets_called() == ["t-primary", "t-backup"] and s.model == "backup"
    assert s.route_reason.startswith("auto: strong tier")


async def test_an_experiment_assigns_sticky_variants_and_labels_the_ledger() -> None:
    book = ExperimentBook(None, 60)
    book.replace([Experiment("exp1", "auto", (Variant("control", "backup", 0.5), Variant("strong", "primary", 0.5)),
                             True, None)])  # type: ignore[arg-type]
    gw, _, _ = _gw({"t-primary": ["ok"], "t-backup": ["ok"]}, experiments=book)
    seen: dict[str, set[str]] = {}
    for user in ("u1", "u2", "u3", "u4", "u5", "u6"):
        for _ in range(2):
            s = await _run(gw, command("auto", user_id=user, cache=_no_cache()))
            seen.setdefault(user, set()).add(s.variant)
            assert s.model == ("backup" if s.variant == "exp1/control" else "primary")
    assert all(len(v) == 1 for v in seen.values())  # sticky
    assert {v for vs in seen.values() for v in vs} == {"exp1/control", "exp1/strong"}


# --- the hot path --------------------------------------------------------------------------------

async def test_lookup_and_reservation_run_concurrently_and_a_hit_releases_the_reservation() -> None:
    class SlowCache(MemoryCache):
        async def lookup(self, *args: object, **kwargs: object) -> CachedAnswer | None:
            await asyncio.sleep(0.1)
            return await super().lookup(*args, **kwargs)  # type: ignore[arg-type]

    class SlowLimiter(MemoryLimiter):
        async def reserve(self, *args: object, **kwargs: object) -> object:
            await asyncio.sleep(0.1)
            return await super().reserve(*args, **kwargs)  # type: ignore[arg-type]

    backends, cache, limiter = Backends({"t-primary": ["ok"]}), SlowCache(), SlowLimiter()
    gw = Gateway(registry=registry_of(PRIMARY, BACKUP), cache=cache, ratelimit=limiter, inference=backends,
                 usage=Ledger(), default_max_output_tokens=100, side_call_timeout_s=1)
    t0 = time.monotonic()
    miss = await _run(gw, command())
    assert time.monotonic() - t0 < 0.18  # 0.1 s + 0.1 s in sequence would be 0.2 s
    assert limiter.committed[miss.request_id] == 11
    hit = await _run(gw, command())
    assert hit.cache_tier == "exact"
    assert hit.request_id in limiter.released and hit.request_id not in limiter.committed


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    import random

    policy = RetryPolicy(backoff_base_s=0.1, backoff_max_s=0.5)
    rng = random.Random(7)
    for round_no, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        waits = [policy.backoff(round_no, rng) for _ in range(500)]
        assert min(waits) >= 0 and max(waits) <= ceiling
        assert max(waits) > 0.8 * ceiling  # it does spread over the whole range


async def test_when_most_lookups_hit_the_reservation_waits_for_the_miss() -> None:
    limiter = MemoryLimiter()
    gw, _, cache = _gw({"t-primary": ["ok"]}, ratelimit=limiter)
    await _run(gw, command())  # stored
    for _ in range(40):  # a hit-heavy stream of requests
        await _run(gw, command())
    released_before = len(limiter.released)
    for _ in range(5):
        await _run(gw, command())
    assert len(limiter.released) == released_before  # no speculative reserve + release per hit any more
    cache.entries.clear()
    miss = await _run(gw, command())
    assert miss.cache_tier == "miss" and limiter.committed[miss.request_id] == 11  # a miss still reserves


async def test_in_cache_only_mode_a_hit_does_not_use_up_the_probe() -> None:
    controller = _controller()
    for _ in range(4):
        controller.record(failed=True)
    gw, backends, cache = _gw({"t-primary": ["ok"]}, degradation=controller)
    cache.entries[("org1", "capital of France?")] = CachedAnswer("Paris", TokenUsage(10, 3, 0), "primary", "exact",
                                                                 False)
    assert (await _run(gw, command())).cache_tier == "exact" and not backends.calls
    probe = await _run(gw, GenerateCommand(model="primary", messages=[ChatMessage(Role.USER, "new question")],
                                           params=GenerationParams(temperature=0.0)))
    assert probe.cache_tier == "miss" and backends.targets_called() == ["t-primary"]  # the interval's probe
    with pytest.raises(Unavailable):  # the next miss in the same interval is not
        await _run(gw, GenerateCommand(model="primary", messages=[ChatMessage(Role.USER, "another one")],
                                       params=GenerationParams(temperature=0.0)))
