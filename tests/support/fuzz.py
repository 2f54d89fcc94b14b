"""What every gRPC fuzz test asserts, and how many examples it runs.

Bad input must get a typed status: never ``INTERNAL``, ``UNKNOWN`` or ``DATA_LOSS``; an
``INVALID_ARGUMENT`` must carry a ``google.rpc.BadRequest`` detail whose field violations name the
field; and the service must still report SERVING afterwards.

``TOLLGATE_FUZZ_EXAMPLES`` sets the examples per RPC (1,000 by default, what ``make test`` runs;
``make fuzz`` runs 10,000). Under ``make test`` the examples are derandomized, so CI sees the same
inputs every run; ``make fuzz`` sets ``TOLLGATE_FUZZ_RANDOM=1`` to explore new ones.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, settings

from libs.grpc_errors import status_proto_from_rpc

FUZZ_EXAMPLES = int(os.environ.get("TOLLGATE_FUZZ_EXAMPLES", "1000"))
FUZZ_RANDOM = os.environ.get("TOLLGATE_FUZZ_RANDOM", "") not in ("", "0")

# Codes that mean "the server did not understand what went wrong": never acceptable for bad input.
FORBIDDEN_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


def fuzz_settings(**overrides: Any) -> settings:
    """Hypothesis settings for a fuzz test: many examples, no per-example deadline, no example database."""
    base: dict[str, Any] = dict(
        max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=not FUZZ_RANDOM,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large, HealthCheck.large_base_example,
                               HealthCheck.filter_too_much],
    )
    base.update(overrides)
    return settings(**base)


def unary_method(channel: grpc.aio.Channel, service: ServiceDescriptor, method_name: str,
                 ) -> Callable[..., Awaitable[Message]]:
    """A unary-unary callable for ``service.method_name``, typed from the descriptor (no generated stub)."""
    method = service.methods_by_name[method_name]
    from google.protobuf import message_factory

    response_cls = message_factory.GetMessageClass(method.output_type)
    return channel.unary_unary(f"/{service.full_name}/{method.name}",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_cls.FromString)


def unary_stream_method(channel: grpc.aio.Channel, service: ServiceDescriptor, method_name: str) -> Any:
    method = service.methods_by_name[method_name]
    from google.protobuf import message_factory

    response_cls = message_factory.GetMessageClass(method.output_type)
    return channel.unary_stream(f"/{service.full_name}/{method.name}",
                                request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=response_cls.FromString)


def check_rpc_error(err: grpc.aio.AioRpcError, where: str) -> grpc.StatusCode:
    """Assert a failed call's status is typed; an INVALID_ARGUMENT must name the offending field."""
    code = err.code()
    assert code not in FORBIDDEN_CODES, f"{where}: {code.name}: {err.details()}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        status = status_proto_from_rpc(err)
        assert status is not None, f"{where}: INVALID_ARGUMENT without google.rpc.Status details: {err.details()}"
        violations = []
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(bad.field_violations)
        assert violations, f"{where}: INVALID_ARGUMENT without a BadRequest field violation: {err.details()}"
        assert all(v.field for v in violations), f"{where}: a field violation names no field: {violations}"
    return code


async def call_unary(method: Callable[..., Awaitable[Message]], request: Message, where: str, *,
                     metadata: Sequence[tuple[str, str]] = (), timeout_s: float = 10.0) -> grpc.StatusCode:
    try:
        await method(request, metadata=tuple(metadata), timeout=timeout_s)
    except grpc.aio.AioRpcError as err:
        return check_rpc_error(err, where)
    return grpc.StatusCode.OK


async def call_stream(method: Any, request: Message, where: str, *, metadata: Sequence[tuple[str, str]] = (),
                      timeout_s: float = 10.0, max_messages: int = 4) -> grpc.StatusCode:
    """Read at most ``max_messages`` of a server stream, then cancel it (cancellation is part of the test)."""
    call = method(request, metadata=tuple(metadata), timeout=timeout_s)
    try:
        seen = 0
        async for _ in call:
            seen += 1
            if seen >= max_messages:
                call.cancel()
                break
    except grpc.aio.AioRpcError as err:
        return check_rpc_error(err, where)
    return grpc.StatusCode.OK


async def assert_serving(channel: grpc.aio.Channel, service: str = "") -> None:
    """The standard health service still reports SERVING (the overall server when ``service`` is empty)."""
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"health of {service!r}: {reply.status}"
