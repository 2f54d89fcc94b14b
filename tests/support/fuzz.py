"""What every gRPC fuzz test asserts, and how many examples it runs.

Bad input must get a typed status: never ``INTERNAL``, ``UNKNOWN`` or ``DATA_LOSS``; an
``INVALID_ARGUMENT`` must carry a ``google.rpc.BadRequest`` detail whose field violations name the
field; and the service must still report SERVING afterwards.

``TOLLGATE_FUZZ_EXAMPLES`` sets the examples per RPC (1,000 by default, what ``make test`` runs;
``make fuzz`` runs 10,000). Under ``make test`` the examples are derandomized, so CI sees the same
inputs every run; ``make fuzz`` sets ``TOLLGATE_FUZZ_RANDOM=1`` to explore new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc._cython import cygrpc  # ExecuteBatchError: a half-close that lost the race
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, settings
from hypothesis.strategies import SearchStrategy

from libs.grpc_errors import status_proto_from_rpc
from libs.grpc_server import GrpcServer

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


def check_rpc_error(err: grpc.aio.AioRpcError, where: str, *, input_type: Descriptor | None = None
                    ) -> grpc.StatusCode:
    """Assert a failed call's status is typed; an INVALID_ARGUMENT must name the offending field (with
    ``input_type``, a path that starts with one of that request message's fields)."""
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
        if input_type is not None:
            unknown = [v.field for v in violations if re.split(r"[.\[]", v.field)[0] not in input_type.fields_by_name]
            assert not unknown, f"{where}: field violations name no field of {input_type.full_name}: {unknown}"
    return code


async def call_unary(method: Callable[..., Awaitable[Message]], request: Message, where: str, *,
                     metadata: Sequence[tuple[str, str]] = (), timeout_s: float = 10.0,
                     input_type: Descriptor | None = None) -> grpc.StatusCode:
    try:
        await method(request, metadata=tuple(metadata), timeout=timeout_s)
    except grpc.aio.AioRpcError as err:
        return check_rpc_error(err, where, input_type=input_type)
    return grpc.StatusCode.OK


async def call_stream(method: Any, request: Message, where: str, *, metadata: Sequence[tuple[str, str]] = (),
                      timeout_s: float = 10.0, max_messages: int = 4,
                      input_type: Descriptor | None = None) -> grpc.StatusCode:
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
        return check_rpc_error(err, where, input_type=input_type)
    return grpc.StatusCode.OK


async def assert_serving(channel: grpc.aio.Channel, service: str = "") -> None:
    """The standard health service still reports SERVING (the overall server when ``service`` is empty)."""
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"health of {service!r}: {reply.status}"


def stream_unary_method(channel: grpc.aio.Channel, service: ServiceDescriptor, method_name: str) -> Any:
    """A stream-unary (client-streaming) callable for ``service.method_name``, typed from the descriptor."""
    method = service.methods_by_name[method_name]
    from google.protobuf import message_factory

    response_cls = message_factory.GetMessageClass(method.output_type)
    return channel.stream_unary(f"/{service.full_name}/{method.name}",
                                request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=response_cls.FromString)


async def call_client_stream(method: Any, requests: Sequence[Message], where: str, *,
                             metadata: Sequence[tuple[str, str]] = (), timeout_s: float = 10.0,
                             cancel_after: int | None = None, input_type: Descriptor | None = None
                             ) -> grpc.StatusCode:
    """Send ``requests`` as one client stream; with ``cancel_after``, cancel the call after that many
    messages instead of half-closing (a client that goes away mid-upload is part of the test)."""
    call = method(metadata=tuple(metadata), timeout=timeout_s)
    try:
        for i, request in enumerate(requests):
            if cancel_after is not None and i >= cancel_after:
                call.cancel()
                return grpc.StatusCode.CANCELLED
            await call.write(request)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, cygrpc.BaseError):
        # The server answered before reading everything (it rejected an earlier message), so a write or
        # the half-close failed on the client's side (grpc raises AioRpcError INTERNAL, InvalidStateError,
        # or its core's ExecuteBatchError, depending on the timing); the call's status is the server's
        # answer.
        pass
    try:
        await call
    except grpc.aio.AioRpcError as err:
        if _lost_write_race(err):
            # grpc replaced the server's status with its own INTERNAL because a write raced the server's
            # early answer; what the server answered is unknown here, so ServerErrorLog is the check.
            return grpc.StatusCode.CANCELLED
        return check_rpc_error(err, where, input_type=input_type)
    return grpc.StatusCode.OK


def _lost_write_race(err: grpc.aio.AioRpcError) -> bool:
    return err.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (err.debug_error_string() or "")


class ServerErrorLog(logging.Handler):
    """Collects what ``ErrorMappingInterceptor`` logs for an unhandled exception in an in-process server.

    A second oracle next to the status codes: it sees a server bug even when the client never gets the
    server's status (a cancelled stream, a client-stream write that raced the server's early answer).
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(self.format(record))

    def check(self, where: str) -> None:
        found, self.messages = self.messages, []
        assert not found, f"{where}: the server logged an unhandled error:\n" + "\n".join(m[-3000:] for m in found)


@contextlib.contextmanager
def server_error_log() -> Iterator[ServerErrorLog]:
    """Attach a :class:`ServerErrorLog` to the error-mapping interceptor's logger while the block runs."""
    handler = ServerErrorLog()
    logger = logging.getLogger("libs.grpc_errors")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def merged(base: Message, overlay: Message) -> Message:
    """``base`` with ``overlay``'s set fields merged in: a valid request with a few hostile fields, so the
    fuzzer gets past the first required field and reaches the later checks and the domain code."""
    out = type(base)()
    out.CopyFrom(base)
    out.MergeFrom(overlay)
    return out


def request_strategy(method: MethodDescriptor, bases: Sequence[Message] = ()) -> SearchStrategy[Any]:
    """Requests for ``method``: anything its input type can hold, and (given ``bases``, valid requests)
    a valid request with hostile fields merged in, or with one field at any depth changed (mostly still
    valid, so the domain code behind validation is fuzzed too). A client-streaming method gets a list."""
    from hypothesis import strategies as st

    from tests.support.proto_strategies import message_strategy, one_field_mutated

    anything = message_strategy(method.input_type)
    one = anything if not bases else st.one_of(
        anything, st.builds(merged, st.sampled_from(list(bases)), anything),
        *[st.sampled_from(list(bases)).flatmap(one_field_mutated)] * 2)
    return st.lists(one, max_size=4) if method.client_streaming else one


async def call_method(channel: grpc.aio.Channel, service: ServiceDescriptor, method_name: str, request: Any,
                      where: str, *, metadata: Sequence[tuple[str, str]] = (), timeout_s: float = 10.0,
                      cancel_after: int | None = None) -> grpc.StatusCode:
    """Call any unary or streaming method with a request from :func:`request_strategy`."""
    method = service.methods_by_name[method_name]
    if method.client_streaming and method.server_streaming:
        raise NotImplementedError(f"{where}: bidirectional streaming has no fuzz caller yet")
    if method.client_streaming:
        return await call_client_stream(stream_unary_method(channel, service, method_name), request, where,
                                        metadata=metadata, timeout_s=timeout_s, cancel_after=cancel_after,
                                        input_type=method.input_type)
    if method.server_streaming:
        return await call_stream(unary_stream_method(channel, service, method_name), request, where,
                                 metadata=metadata, timeout_s=timeout_s, input_type=method.input_type)
    return await call_unary(unary_method(channel, service, method_name), request, where, metadata=metadata,
                            timeout_s=timeout_s, input_type=method.input_type)


async def fuzz_example(channel: grpc.aio.Channel, service: ServiceDescriptor, method_name: str,
                       bases: Sequence[Message], data: Any, server_errors: ServerErrorLog, *,
                       health: Sequence[str] = (), cancel_one_stream_in: int = 0) -> grpc.StatusCode:
    """One fuzz example against a running server: draw a request for ``method_name`` (random, or a valid
    ``bases`` request with hostile fields), call it, and assert a typed status, no unhandled server error
    and SERVING health for the service and every name in ``health``. Client streams are cancelled after
    their first message once in ``cancel_one_stream_in`` examples (0: never)."""
    from hypothesis import event
    from hypothesis import strategies as st

    method = service.methods_by_name[method_name]
    where = f"{service.name}.{method_name}"
    request = data.draw(request_strategy(method, bases), "request")
    cancel_after = None
    if method.client_streaming and cancel_one_stream_in:
        cancel_after = 1 if data.draw(st.integers(0, cancel_one_stream_in - 1), "cancel") == 0 else None
    code = await call_method(channel, service, method_name, request, where, cancel_after=cancel_after)
    event(code.name)
    server_errors.check(where)
    for name in (service.full_name, *health):
        await assert_serving(channel, name)
    return code


async def call_raw(channel: grpc.aio.Channel, service: ServiceDescriptor, method_name: str,
                   payloads: Sequence[bytes], where: str, *, timeout_s: float = 10.0) -> grpc.StatusCode:
    """Send raw bytes as the request message(s), as a client with another schema (or a broken one) would:
    bytes that do not parse must be INVALID_ARGUMENT, never grpcio's own INTERNAL."""
    method = service.methods_by_name[method_name]
    path = f"/{service.full_name}/{method.name}"
    try:
        if method.client_streaming:
            stream_call = (channel.stream_stream if method.server_streaming else channel.stream_unary)(path)

            async def requests() -> Any:
                for payload in payloads:
                    yield payload

            result = stream_call(requests(), timeout=timeout_s)
            if method.server_streaming:
                async for _ in result:
                    pass
            else:
                await result
        elif method.server_streaming:
            async for _ in channel.unary_stream(path)(payloads[0], timeout=timeout_s):
                pass
        else:
            await channel.unary_unary(path)(payloads[0], timeout=timeout_s)
    except grpc.aio.AioRpcError as err:
        return check_rpc_error(err, where)
    return grpc.StatusCode.OK


@contextlib.asynccontextmanager
async def served_channel(settings: Any, bindings: Any, close: Callable[[], Awaitable[None]]
                         ) -> AsyncIterator[grpc.aio.Channel]:
    """A service's ``build()`` output served on a loopback port, and a channel to it; all closed afterwards."""
    server = GrpcServer(settings, bindings)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0)
        await close()
