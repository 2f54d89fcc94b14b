"""What both router servicers read from a gRPC call (the bearer token, the client address) and the
timestamp conversions they share."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from libs.clients import CLIENT_IP_METADATA
from libs.errors import Violations
from libs.validation import check_timestamp


def authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def _peer_ip(context: grpc.aio.ServicerContext) -> str:
    # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555"
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""


def client_ip(context: grpc.aio.ServicerContext, trusted_proxies: frozenset[str]) -> str:
    """The peer's address; for a trusted proxy (the HTTP edge), the client address it forwards."""
    peer = _peer_ip(context)
    if peer in trusted_proxies:
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_IP_METADATA and isinstance(value, str) and 0 < len(value) <= 64:
                return value
    return peer


def timestamp_field(v: Violations, msg: Any, field_name: str) -> datetime | None:
    """An optional Timestamp field as an aware datetime; a value datetime/PostgreSQL cannot hold is a violation."""
    if not msg.HasField(field_name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, field_name)
    if not check_timestamp(v, ts.seconds, ts.nanos, field_name):
        return None
    return ts.ToDatetime(UTC)


def to_timestamp(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts
