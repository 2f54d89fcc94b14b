"""Domain errors -> google.rpc.Status details -> domain errors, over a real loopback call."""

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.errors import (
    FieldViolation,
    InvalidArgument,
    Overloaded,
    QuotaExceeded,
    QuotaViolation,
    TollgateError,
    Unauthenticated,
    Unavailable,
)
from libs.grpc_errors import ErrorMappingInterceptor, domain_error_from_rpc

ERRORS: list[TollgateError] = [
    InvalidArgument([FieldViolation("input.model", "required"), FieldViolation("input.messages", "empty")]),
    QuotaExceeded("over", [QuotaViolation("key:k1", "tokens_per_minute limit 10 exceeded")], 2.5),
    Overloaded("queue full", 0.5),
    Unauthenticated("unknown key"),
    Unavailable("provider down", reason="UNAVAILABLE"),
]


class RaisingHealth(health_pb2_grpc.HealthServicer):
    """A servicer whose Check raises the domain error named by the service field."""

    async def Check(self, request: health_pb2.HealthCheckRequest, context: object) -> health_pb2.HealthCheckResponse:
        if request.service == "bug":
            raise RuntimeError("unexpected")
        raise ERRORS[int(request.service)]


@pytest.fixture
async def stub() -> AsyncIterator[health_pb2_grpc.HealthStub]:
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(RaisingHealth(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield health_pb2_grpc.HealthStub(ch)
    await server.stop(0)


@pytest.mark.parametrize("index", range(len(ERRORS)))
async def test_round_trip_keeps_code_reason_and_details(stub: health_pb2_grpc.HealthStub, index: int) -> None:
    original = ERRORS[index]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service=str(index)), timeout=5)
    rebuilt = domain_error_from_rpc(info.value)
    assert type(rebuilt) is type(original)
    assert rebuilt.reason == original.reason
    if isinstance(original, InvalidArgument):
        assert rebuilt.violations == original.violations  # type: ignore[attr-defined]
    if isinstance(original, QuotaExceeded):
        assert rebuilt.violations == original.violations  # type: ignore[attr-defined]
        assert rebuilt.retry_after_s == pytest.approx(2.5)  # type: ignore[attr-defined]


async def test_unexpected_exception_is_internal_with_error_info_and_no_detail_leak(
        stub: health_pb2_grpc.HealthStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service="bug"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "unexpected" not in (info.value.details() or "")
    assert domain_error_from_rpc(info.value).reason == "INTERNAL_ERROR"
