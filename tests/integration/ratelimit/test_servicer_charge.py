"""RateLimitService.Charge through gRPC: usage admitted without the service, drawn without refusing, once per id."""

from __future__ import annotations

import time

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2

from tests.integration.ratelimit.ratelimit_support import (
    Running,
    detail,
    reserve_req,
    rpc_error,
    set_limit,
    subject,
    wait_for_limit,
)


def charge_req(charge_id: str, requests: int = 1, tokens: int = 0, cost: int = 0,
               **kwargs: object) -> ratelimit_pb2.ChargeRequest:
    return ratelimit_pb2.ChargeRequest(subject=subject(), charge_id=charge_id, requests=requests, tokens=tokens,
                                       cost_nano_usd=cost, **kwargs)  # type: ignore[arg-type]


async def test_charge_draws_without_refusing_once_per_id(ratelimit: Running) -> None:
    await set_limit(ratelimit, "key", "k1", rpm=5)
    await wait_for_limit(ratelimit, "k1", ratelimit_pb2.LIMIT_KIND_REQUESTS_PER_MINUTE, 5)
    await ratelimit.stub.Reserve(reserve_req(10))
    reply = await ratelimit.stub.Charge(charge_req("req-1", requests=3, tokens=100, cost=7,
                                                   used_at=timestamp_pb2.Timestamp(seconds=int(time.time()))))
    assert (reply.replayed, reply.degraded) == (False, False)
    again = await ratelimit.stub.Charge(charge_req("req-1", requests=3, tokens=100, cost=7))
    assert again.replayed
    usage = await ratelimit.stub.GetUsage(ratelimit_pb2.GetUsageRequest(subject=subject()))
    assert [(u.kind, u.remaining) for u in usage.usages] == [(ratelimit_pb2.LIMIT_KIND_REQUESTS_PER_MINUTE, 1)]
    await ratelimit.stub.Reserve(reserve_req(10))
    # Past what is left: a charge is never refused (the bucket stops at zero); the next reserve is.
    await ratelimit.stub.Charge(charge_req("req-2", requests=4))
    err, status = await rpc_error(ratelimit.stub.Reserve(reserve_req(10)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert detail(status, error_details_pb2.RetryInfo).retry_delay.seconds <= 12  # one request at 5/min


async def test_invalid_charges_name_their_fields(ratelimit: Running) -> None:
    req = ratelimit_pb2.ChargeRequest(
        subject=ratelimit_pb2.Subject(principal=common_pb2.Principal(org_id="", team_id="t", key_id="k\x00"),
                                      client_ip="not-an-ip"),
        charge_id="c" * 257, requests=1_000_001, tokens=10_000_001, cost_nano_usd=-1,
        used_at=timestamp_pb2.Timestamp(seconds=1_800_000_000, nanos=-1))
    err, status = await rpc_error(ratelimit.stub.Charge(req))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = detail(status, error_details_pb2.BadRequest)
    assert {v.field for v in bad.field_violations} == {
        "subject.principal.org_id", "subject.principal.key_id", "subject.client_ip", "charge_id", "requests",
        "tokens", "cost_nano_usd", "used_at"}
    err, status = await rpc_error(ratelimit.stub.Charge(ratelimit_pb2.ChargeRequest(subject=subject())))
    assert {v.field for v in detail(status, error_details_pb2.BadRequest).field_violations} == {"charge_id"}
    for seconds in (-1, 4_102_444_800, 2**62):
        err, _ = await rpc_error(ratelimit.stub.Charge(charge_req("r", used_at=timestamp_pb2.Timestamp(
            seconds=seconds))))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
