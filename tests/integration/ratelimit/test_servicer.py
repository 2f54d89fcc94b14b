"""RateLimitService through real gRPC, with real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from tests.integration.ratelimit.ratelimit_support import (
    Running,
    detail,
    reserve_req,
    rpc_error,
    set_limit,
    subject,
    wait_for_limit,
)
from tests.support.infra import free_port
from tests.support.procs import ServiceProcess


async def test_reserve_commit_release_and_usage(ratelimit: Running) -> None:
    await set_limit(ratelimit, "key", "k1", rpm=10, tpm=10_000)
    await wait_for_limit(ratelimit, "k1", ratelimit_pb2.LIMIT_KIND_TOKENS_PER_MINUTE, 10_000)
    stub = ratelimit.stub
    ttl = duration_pb2.Duration(seconds=30)
    res = await stub.Reserve(ratelimit_pb2.ReserveRequest(subject=subject(ip="10.0.0.1"), estimated_tokens=4000,
                                                          ttl=ttl))
    assert res.reservation_id and not res.degraded
    assert res.advice == ratelimit_pb2.BUDGET_ADVICE_NONE
    assert 25 < res.expires_at.ToDatetime().timestamp() - time.time() <= 31
    usage = await stub.GetUsage(ratelimit_pb2.GetUsageRequest(subject=subject()))
    rows = {u.kind: u for u in usage.usages}
    assert not usage.degraded
    tpm = rows[ratelimit_pb2.LIMIT_KIND_TOKENS_PER_MINUTE]
    assert (tpm.scope, tpm.scope_id, tpm.limit) == (common_pb2.LIMIT_SCOPE_KEY, "k1", 10_000)
    assert 3990 <= tpm.used <= 4000 and tpm.used + tpm.remaining == 10_000
    assert rows[ratelimit_pb2.LIMIT_KIND_REQUESTS_PER_MINUTE].used == 1

    commit = await stub.Commit(ratelimit_pb2.CommitRequest(reservation_id=res.reservation_id, actual_tokens=1500))
    assert commit.refunded_tokens == 2500
    over = await stub.Reserve(reserve_req(100))
    commit = await stub.Commit(ratelimit_pb2.CommitRequest(reservation_id=over.reservation_id, actual_tokens=300))
    assert commit.refunded_tokens == -200
    again = await stub.Reserve(reserve_req(100))
    await stub.Release(ratelimit_pb2.ReleaseRequest(reservation_id=again.reservation_id))

    err, status = await rpc_error(stub.Release(ratelimit_pb2.ReleaseRequest(reservation_id=again.reservation_id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert detail(status, error_details_pb2.ErrorInfo).reason == "NOT_FOUND"


async def test_over_limit_is_resource_exhausted_with_quota_failure_and_retry_info(ratelimit: Running) -> None:
    await set_limit(ratelimit, "key", "k1", tpm=100_000)
    await set_limit(ratelimit, "team", "t1", tpm=1200)
    await wait_for_limit(ratelimit, "k1", ratelimit_pb2.LIMIT_KIND_TOKENS_PER_MINUTE, 1200)
    await ratelimit.stub.Reserve(reserve_req(1000))
    err, status = await rpc_error(ratelimit.stub.Reserve(reserve_req(400)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    quota = detail(status, error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in quota.violations] == [
        ("team:t1", "tokens_per_minute limit 1200 exceeded")]
    retry = detail(status, error_details_pb2.RetryInfo).retry_delay
    assert 9.0 < retry.seconds + retry.nanos / 1e9 <= 10.0  # 200 tokens at 20/s
    assert detail(status, error_details_pb2.ErrorInfo).reason == "QUOTA_EXCEEDED"


async def test_bad_requests_are_invalid_argument_with_field_violations(ratelimit: Running) -> None:
    bad = ratelimit_pb2.ReserveRequest(
        subject=ratelimit_pb2.Subject(principal=common_pb2.Principal(org_id="o1"), client_ip="not-an-ip"),
        estimated_tokens=0, ttl=duration_pb2.Duration(seconds=-5))
    err, status = await rpc_error(ratelimit.stub.Reserve(bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in detail(status, error_details_pb2.BadRequest).field_violations}
    assert fields == {"subject.principal.team_id", "subject.principal.key_id", "subject.client_ip",
                      "estimated_tokens", "ttl"}

    err, status = await rpc_error(ratelimit.stub.Reserve(reserve_req(20_000_000)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in detail(status, error_details_pb2.BadRequest).field_violations] == ["estimated_tokens"]

    err, status = await rpc_error(ratelimit.stub.Commit(ratelimit_pb2.CommitRequest(actual_cost_nano_usd=-1)))
    fields = {v.field for v in detail(status, error_details_pb2.BadRequest).field_violations}
    assert fields == {"reservation_id", "actual_cost_nano_usd"}

    err, status = await rpc_error(ratelimit.stub.Release(ratelimit_pb2.ReleaseRequest(reservation_id="a" * 200)))
    assert [v.field for v in detail(status, error_details_pb2.BadRequest).field_violations] == ["reservation_id"]

    err, status = await rpc_error(ratelimit.stub.GetUsage(ratelimit_pb2.GetUsageRequest()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_reservation_is_not_found(ratelimit: Running) -> None:
    err, _ = await rpc_error(ratelimit.stub.Commit(ratelimit_pb2.CommitRequest(reservation_id="nope",
                                                                               actual_tokens=1)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_limit_changes_in_the_table_are_picked_up(ratelimit: Running) -> None:
    stub = ratelimit.stub
    await stub.Reserve(reserve_req(5000))  # no rows yet: unlimited
    await set_limit(ratelimit, "key", "k1", tpm=1000)
    await wait_for_limit(ratelimit, "k1", ratelimit_pb2.LIMIT_KIND_TOKENS_PER_MINUTE, 1000, timeout_s=3)
    err, _ = await rpc_error(stub.Reserve(reserve_req(5000)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await set_limit(ratelimit, "key", "k1", tpm=0)
    await set_limit(ratelimit, "client_ip", "*", rpm=1)
    deadline = time.monotonic() + 3
    while True:  # the lifted key limit and the new per-IP default arrive together
        try:
            await stub.Reserve(reserve_req(5000, ip="10.0.0.9"))
            break
        except grpc.aio.AioRpcError:
            assert time.monotonic() < deadline, "limit change not picked up within 3 s"
            await asyncio.sleep(0.05)
    err, status = await rpc_error(stub.Reserve(reserve_req(1, ip="10.0.0.9")))
    assert [v.subject for v in detail(status, error_details_pb2.QuotaFailure).violations] == ["client_ip:10.0.0.9"]


async def test_abandoned_reservations_are_refunded_by_the_sweeper(ratelimit: Running) -> None:
    await set_limit(ratelimit, "key", "k1", tpm=1000)
    await wait_for_limit(ratelimit, "k1", ratelimit_pb2.LIMIT_KIND_TOKENS_PER_MINUTE, 1000)
    req = reserve_req(1000)
    req.ttl.FromMilliseconds(200)
    res = await ratelimit.stub.Reserve(req)
    await asyncio.sleep(0.5)  # expiry plus a few sweeps (every 0.1 s here)
    await ratelimit.stub.Reserve(reserve_req(1000))
    err, _ = await rpc_error(ratelimit.stub.Commit(ratelimit_pb2.CommitRequest(reservation_id=res.reservation_id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.usefixtures("clean_env")
def test_runs_as_a_process(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    port = free_port()
    env = {
        "TOLLGATE_RATELIMIT_PORT": str(port),
        "TOLLGATE_REDIS_URL": redis_url,
        "TOLLGATE_REDIS_PREFIX": redis_prefix,
        "TOLLGATE_DATABASE_URL": "",  # no database: only the default key limits
        "TOLLGATE_RATELIMIT_DEFAULT_KEY_RPM": "1",
    }
    proc = ServiceProcess("ratelimit", port, env, tmp_path).wait_ready()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = ratelimit_pb2_grpc.RateLimitServiceStub(channel)
            res = stub.Reserve(reserve_req(10), timeout=5)
            assert res.reservation_id and not res.degraded
            with pytest.raises(grpc.RpcError) as info:
                stub.Reserve(reserve_req(10), timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stub.Release(ratelimit_pb2.ReleaseRequest(reservation_id=res.reservation_id), timeout=5)
            stub.Reserve(reserve_req(10), timeout=5)
    finally:
        assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log()
