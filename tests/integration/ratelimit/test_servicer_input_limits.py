"""RateLimitService input limits and the defects the fuzzer found (tests/fuzz/test_fuzz_ratelimit.py)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2

from tests.integration.ratelimit.ratelimit_support import Running, rpc_error, subject


def violations(status: object) -> dict[str, str]:
    out: dict[str, str] = {}
    for d in status.details:  # type: ignore[attr-defined]
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def reconcile(seconds: int, nanos: int = 0) -> ratelimit_pb2.ReconcileSpendRequest:
    return ratelimit_pb2.ReconcileSpendRequest(
        scope=common_pb2.LIMIT_SCOPE_ORG, scope_id="o1", kind=ratelimit_pb2.LIMIT_KIND_BUDGET_DAILY_NANO_USD,
        window_time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), ledger_spent_nano_usd=5)


@pytest.mark.parametrize(("seconds", "nanos"), [(1_800_000_000, -1), (1_800_000_000, 1_000_000_000),
                                                (253_402_300_799, 0), (2**62, 0)])
async def test_reconcile_spend_with_an_invalid_window_time_is_invalid_argument(
        ratelimit: Running, seconds: int, nanos: int) -> None:
    """Found by the fuzzer (minimal example: window_time nanos=-1 on a valid request): the servicer's
    Timestamp.ToNanoseconds() raised ValueError and ReconcileSpend answered INTERNAL. The last day a
    Timestamp can hold (9999-12-31) overflowed the window's end the same way."""
    err, status = await rpc_error(ratelimit.stub.ReconcileSpend(reconcile(seconds, nanos)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "window_time" in violations(status)


async def test_reconcile_spend_inside_the_bounds_still_works(ratelimit: Running) -> None:
    reply = await ratelimit.stub.ReconcileSpend(reconcile(1_800_000_000, 999_999_999))
    assert reply.spent_nano_usd == 5


async def test_every_limit_names_its_field(ratelimit: Running) -> None:
    long_ip = "1" * 100
    req = ratelimit_pb2.ReserveRequest(
        subject=ratelimit_pb2.Subject(principal=common_pb2.Principal(org_id="o" * 257, team_id="t\x00",
                                                                     key_id="k"), client_ip=long_ip),
        request_id="r" * 257, estimated_tokens=10_000_001, estimated_cost_nano_usd=-1,
        ttl=duration_pb2.Duration(seconds=5, nanos=-1))
    _, status = await rpc_error(ratelimit.stub.Reserve(req))
    assert set(violations(status)) == {"subject.principal.org_id", "subject.principal.team_id",
                                       "subject.client_ip", "request_id", "estimated_tokens",
                                       "estimated_cost_nano_usd", "ttl"}
    _, status = await rpc_error(ratelimit.stub.Commit(ratelimit_pb2.CommitRequest(
        reservation_id="x" * 129, actual_tokens=10_000_001, actual_cost_nano_usd=2**53)))
    assert set(violations(status)) == {"reservation_id", "actual_tokens", "actual_cost_nano_usd"}
    _, status = await rpc_error(ratelimit.stub.GetUsage(ratelimit_pb2.GetUsageRequest(subject=subject(key="a b"))))
    assert set(violations(status)) == {"subject.principal.key_id"}
