"""Regression guard: the router must not become markedly slower relative to calling inference directly.

Starts the mesh as ``tollgate up`` does (CI's Redis and PostgreSQL, the bundled fake provider upstream), gives
a member key limits and a budget at key level (so every miss reserves and commits), then at concurrency 1
alternates, call by call, InferenceService.Generate direct / RouterService.Generate miss / exact hit.
Alternating puts both sides of each ratio under the same machine load; only the ratios of p50s are
asserted, never absolute times (CI machines differ and are shared).

Bounds: on the project's 2-core machine (shared, load average 6-8) three runs measured miss/direct
1.92, 2.00, 2.10 and hit/direct 0.50, 0.57, 0.71 (direct ≈ 16-23 ms p50 there; the router hot path was being
optimised at the time). The bounds are about 3x the highest: noise does not trip them, a change that makes
a path about three times slower relative to direct inference does. Re-derive them (the test prints the
ratios; run with -s) when the hot path settles.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from ops.cli import start_mesh
from ops.launcher import LauncherSettings, Mesh, free_port
from tests.bench.gateway_harness import random_prompt
from tests.support import infra

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MODEL = "guard-small"
CALLS = 200  # per path, after WARMUP
WARMUP = 10
MISS_BOUND = 6.0  # router miss p50 / direct inference p50
HIT_BOUND = 2.0  # router exact-hit p50 / direct inference p50


@dataclass
class GuardMesh:
    mesh: Mesh
    admin_key: str

    @property
    def inference(self) -> str:
        return f"{self.mesh.settings.host}:{self.mesh.settings.inference_port}"


@pytest.fixture
async def guard_mesh(tmp_path: Path) -> AsyncIterator[GuardMesh]:
    db_name = infra.unique_name("tollgate_guard")
    database_url = await infra.create_database(db_name)
    prefix = f"tgtest:{infra.unique_name('guard')}:"
    env = {"TOLLGATE_REDIS_PREFIX": prefix, "TOLLGATE_RATELIMIT_LIMITS_REFRESH_S": "0.5",
           "TOLLGATE_LOG_LEVEL": "WARNING"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ports = ["router", "cache", "ratelimit", "retrieval", "inference"]
    ports += ["edge"] if "edge_port" in LauncherSettings.model_fields else []  # not the default 8080
    settings = LauncherSettings(data_dir=tmp_path / "mesh", redis_url=infra.REDIS_URL, database_url=database_url,
                                fake_provider_port=free_port()).model_copy(update={
        **{f"{n}_port": free_port() for n in ports},
        "provider_base_url": "", "inference_engine": "openai", "inference_models": MODEL})
    mesh: Mesh | None = None
    try:
        # start_mesh blocks (it waits for health checks): off the event loop.
        started, admin_key = await asyncio.to_thread(start_mesh, settings)
        mesh = started
        assert admin_key is not None
        yield GuardMesh(started, admin_key)
    finally:
        if mesh is not None:
            await asyncio.to_thread(mesh.stop)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        await infra.drop_database(db_name)
        await infra.delete_redis_prefix(infra.REDIS_URL, prefix)


def _messages(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content=text)]


async def _member_key(ch: grpc.aio.Channel, admin_key: str) -> str:
    admin = admin_pb2_grpc.AdminServiceStub(ch)
    md = (("authorization", f"Bearer {admin_key}"),)
    p = (await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=md)).keys[0].principal
    created = await admin.CreateKey(admin_pb2.CreateKeyRequest(
        org_id=p.org_id, team_id=p.team_id, name="overhead-guard", role=admin_pb2.KEY_ROLE_MEMBER), metadata=md)
    await admin.SetLimits(admin_pb2.SetLimitsRequest(
        scope=common_pb2.LIMIT_SCOPE_KEY, scope_id=created.key_id, requests_per_minute=1_000_000,
        tokens_per_minute=1_000_000_000, tokens_per_day=100_000_000_000), metadata=md)
    await admin.SetBudget(admin_pb2.SetBudgetRequest(
        scope=common_pb2.LIMIT_SCOPE_KEY, scope_id=created.key_id, daily_nano_usd=10**15), metadata=md)
    await asyncio.sleep(1.2)  # limits reload every 0.5 s here
    return str(created.key)


async def test_router_overhead_ratio_stays_bounded(guard_mesh: GuardMesh) -> None:
    async with grpc.aio.insecure_channel(guard_mesh.mesh.router_address) as rch, \
            grpc.aio.insecure_channel(guard_mesh.inference) as ich:
        key_md = (("authorization", f"Bearer {await _member_key(rch, guard_mesh.admin_key)}"),)
        router = router_pb2_grpc.RouterServiceStub(rch)
        inference = inference_pb2_grpc.InferenceServiceStub(ich)
        params = common_pb2.GenerationParams(temperature=0.0, max_output_tokens=16)
        run = uuid.uuid4().hex[:8]
        rng = random.Random(run)  # random words: "guard 17" would be a semantic hit for "guard 16"
        hit_input = router_pb2.GenerationInput(model=MODEL, messages=_messages(f"guard hit {run}"), params=params)

        async def direct(i: int) -> None:
            async for _ in inference.Generate(inference_pb2.GenerateRequest(
                    request_id=f"guard-{run}-{i}", model=MODEL,
                    messages=_messages(random_prompt(rng, f"guard {run} d{i}")), params=params), timeout=10):
                pass

        # The tier each router call was answered from. A few strays are tolerated (on a loaded machine a cache
        # side call can time out and fail open into a miss; the semantic tier may answer a random prompt).
        tiers: dict[str, Counter[int]] = {"miss": Counter(), "hit": Counter()}

        async def miss(i: int) -> None:
            resp = await router.Generate(router_pb2.GenerateRequest(input=router_pb2.GenerationInput(
                model=MODEL, messages=_messages(random_prompt(rng, f"guard {run} m{i}")), params=params)),
                metadata=key_md, timeout=10)
            tiers["miss"][resp.summary.cache_tier] += 1
            assert resp.summary.cache_tier != common_pb2.CACHE_TIER_MISS or resp.summary.cost_nano_usd > 0

        async def hit(i: int) -> None:
            resp = await router.Generate(router_pb2.GenerateRequest(input=hit_input), metadata=key_md, timeout=10)
            tiers["hit"][resp.summary.cache_tier] += 1

        await router.Generate(router_pb2.GenerateRequest(input=hit_input), metadata=key_md, timeout=10)
        await asyncio.sleep(0.5)  # the answer is stored after the response
        paths: dict[str, Callable[[int], Awaitable[None]]] = {"direct": direct, "miss": miss, "hit": hit}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(-WARMUP, CALLS):
            for name, call in paths.items():  # alternating: every path sees the same load
                t0 = time.perf_counter()
                await call(i)
                if i >= 0:
                    times[name].append(time.perf_counter() - t0)

    p50 = {name: statistics.median(v) * 1000 for name, v in times.items()}
    miss_ratio, hit_ratio = p50["miss"] / p50["direct"], p50["hit"] / p50["direct"]
    summary = (f"p50 direct {p50['direct']:.2f} ms, router miss {p50['miss']:.2f} ms ({miss_ratio:.2f}x), "
               f"exact hit {p50['hit']:.2f} ms ({hit_ratio:.2f}x); bounds {MISS_BOUND}x / {HIT_BOUND}x")
    print(summary)
    calls = CALLS + WARMUP
    assert tiers["miss"][common_pb2.CACHE_TIER_MISS] >= 0.95 * calls, f"miss path not measuring misses: {tiers}"
    assert tiers["hit"][common_pb2.CACHE_TIER_EXACT] >= 0.95 * calls, f"hit path not measuring exact hits: {tiers}"
    assert miss_ratio <= MISS_BOUND, f"router miss path markedly slower than direct inference: {summary}"
    assert hit_ratio <= HIT_BOUND, f"router exact-hit path markedly slower than direct inference: {summary}"
