"""Map domain errors to ``google.rpc.Status`` with details, and back.

Server side: :class:`ErrorMappingInterceptor` turns any :class:`TollgateError`
raised by a servicer into the right status code with ``BadRequest``,
``QuotaFailure``, ``RetryInfo`` and ``ErrorInfo`` details (grpcio-status).
Client side: :func:`domain_error_from_rpc` rebuilds the domain error from an
``AioRpcError`` so a caller can pass a downstream's quota failure on intact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from libs.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    QuotaViolation,
    TollgateError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

ERROR_DOMAIN = "tollgate.dev"

_CODES: list[tuple[type[TollgateError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
]


def _pack(msg: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    seconds = max(0.0, seconds)
    whole = math.floor(seconds)
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
    )


def code_for(error: TollgateError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(error: TollgateError) -> grpc.Status:
    """Build a rich status (code, message, details) for a domain error."""
    code = code_for(error)
    details: list[any_pb2.Any] = [
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))
    ]
    if isinstance(error, InvalidArgument):
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ])))
    if isinstance(error, QuotaExceeded):
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
            for v in error.violations
        ])))
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        details.append(_pack(_retry_info(retry_after)))
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


async def abort_with(context: grpc.aio.ServicerContext, error: TollgateError) -> None:
    await context.abort_with_status(to_status(error))


def status_proto_from_rpc(err: grpc.aio.AioRpcError | grpc.RpcError) -> status_pb2.Status | None:
    metadata = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value if isinstance(value, bytes) else value.encode())
            return status
    return None


def domain_error_from_rpc(err: grpc.aio.AioRpcError) -> TollgateError:
    """Rebuild the domain error a downstream raised, with its details."""
    code = err.code()
    message = err.details() or code.name
    status = status_proto_from_rpc(err)
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    quota: list[QuotaViolation] = []
    retry_after: float | None = None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            violations = [FieldViolation(v.field, v.description) for v in br.field_violations]
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            qf = error_details_pb2.QuotaFailure()
            detail.Unpack(qf)
            quota = [QuotaViolation(v.subject, v.description) for v in qf.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            detail.Unpack(ri)
            retry_after = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
    error: TollgateError
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        error = InvalidArgument(violations, message)
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        error = (QuotaExceeded(message, quota, retry_after or 1.0) if quota
                 else Overloaded(message, retry_after or 1.0))
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        error = Unauthenticated(message)
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        error = PermissionDenied(message)
    elif code == grpc.StatusCode.NOT_FOUND:
        error = NotFound(message)
    elif code == grpc.StatusCode.FAILED_PRECONDITION:
        error = FailedPrecondition(message)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        error = DeadlineExceeded(message)
    else:
        error = Unavailable(message, retry_after_s=retry_after)
    if reason:
        error.reason = reason
    error.metadata.update(metadata)
    return error


_UNEXPECTED = status_pb2.Status(
    code=code_pb2.INTERNAL,
    message="internal error",
    details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL_ERROR", domain=ERROR_DOMAIN))],
)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors raised by any handler into rich statuses.

    Unexpected exceptions are logged with their traceback (never request text)
    and answered INTERNAL with an ErrorInfo, so a bug is visible, not a hang.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


async def _abort_keeping_trailers(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    """``abort_with_status``, keeping the trailing metadata the handler had set (the router's request id):
    grpcio's abort replaces it with the status's own."""
    own = tuple(status.trailing_metadata or ())
    names = {name for name, _ in own}
    kept = tuple((name, value) for name, value in (context.trailing_metadata() or ()) if name not in names)
    await context.abort(status.code, status.details, trailing_metadata=kept + own)


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, TollgateError):
        await _abort_keeping_trailers(context, to_status(exc))
    if isinstance(exc, NotImplementedError):
        # The generated base servicer raises this for RPCs a service does not implement (yet).
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
    log.exception("unhandled error in %s", method, exc_info=exc)
    await _abort_keeping_trailers(context, rpc_status.to_status(_UNEXPECTED))


class _Undecodable:
    """Stands in for a request message whose bytes did not parse (see :func:`_tolerant`)."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A request deserializer that never raises: grpcio answers a deserializer's exception with INTERNAL
    ("Exception deserializing request!"), but bytes that are not the RPC's message are the caller's
    mistake, so the handler gets a marker and answers INVALID_ARGUMENT instead."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or whatever a parser raises on foreign bytes
            return _Undecodable(type(exc).__name__)

    return deserialize


def _undecodable(error: _Undecodable) -> InvalidArgument:
    return InvalidArgument([FieldViolation("request", "the request bytes are not a serialized message of this "
                                                      f"RPC's request type ({error.error})")])


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise _undecodable(request)
        yield request


def _checked(request: Any) -> Any:
    """The request, or (for a client stream) an iterator that raises on an undecodable message."""
    if isinstance(request, _Undecodable):
        raise _undecodable(request)
    if hasattr(request, "__aiter__"):
        return _decoded_stream(request)
    return request


def _wrap_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(_checked(request), context)
        except (TollgateError, Exception) as exc:
            if _is_abort(exc):
                raise
            await _abort_for(exc, context, method)

    return wrapped


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(_checked(request), context):
                yield item
        except (TollgateError, Exception) as exc:
            if _is_abort(exc):
                raise
            await _abort_for(exc, context, method)

    return wrapped


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises an internal AbortError; let it through untouched.
    return type(exc).__name__ == "AbortError" or isinstance(exc, grpc.aio.AbortError)
