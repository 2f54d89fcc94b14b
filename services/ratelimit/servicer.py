"""gRPC RateLimitService: validate, translate protobuf <-> domain, call the limiter."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from libs.deadlines import Deadline
from libs.errors import Violations
from services.ratelimit.buckets import UsageRow
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Kind, Scope, Subject, normalize_ip

# Ids become Redis key segments and log fields: keep them bounded.
MAX_ID_LEN = 256
MAX_RESERVATION_ID_LEN = 128

_SCOPES = {
    Scope.GLOBAL: common_pb2.LIMIT_SCOPE_GLOBAL,
    Scope.ORG: common_pb2.LIMIT_SCOPE_ORG,
    Scope.TEAM: common_pb2.LIMIT_SCOPE_TEAM,
    Scope.KEY: common_pb2.LIMIT_SCOPE_KEY,
    Scope.CLIENT_IP: common_pb2.LIMIT_SCOPE_CLIENT_IP,
}
_KINDS = {
    Kind.REQUESTS_PER_MINUTE: ratelimit_pb2.LIMIT_KIND_REQUESTS_PER_MINUTE,
    Kind.TOKENS_PER_MINUTE: ratelimit_pb2.LIMIT_KIND_TOKENS_PER_MINUTE,
    Kind.TOKENS_PER_DAY: ratelimit_pb2.LIMIT_KIND_TOKENS_PER_DAY,
}


def _check_id(v: Violations, value: str, path: str, *, required: bool, max_len: int = MAX_ID_LEN) -> None:
    if not value:
        v.check(not required, path, "is required")
    elif len(value) > max_len:
        v.add(path, f"must be at most {max_len} characters")
    elif not value.isprintable() or any(c.isspace() for c in value):
        v.add(path, "must not contain whitespace or control characters")


def subject_from_proto(msg: ratelimit_pb2.Subject, v: Violations, path: str = "subject") -> Subject:
    """Validate a Subject, collecting violations; the client IP is normalised (one bucket per address)."""
    principal = msg.principal
    _check_id(v, principal.org_id, f"{path}.principal.org_id", required=True)
    _check_id(v, principal.team_id, f"{path}.principal.team_id", required=True)
    _check_id(v, principal.key_id, f"{path}.principal.key_id", required=True)
    client_ip = ""
    if msg.client_ip:
        try:
            client_ip = normalize_ip(msg.client_ip)
        except ValueError:
            v.add(f"{path}.client_ip", "must be an IPv4 or IPv6 address")
    return Subject(org_id=principal.org_id, team_id=principal.team_id, key_id=principal.key_id, client_ip=client_ip)


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(unix_s * 1e9))
    return ts


def _usage_proto(row: UsageRow) -> ratelimit_pb2.LimitUsage:
    return ratelimit_pb2.LimitUsage(scope=_SCOPES[row.scope], scope_id=row.scope_id, kind=_KINDS[row.kind],
                                    limit=row.limit, used=row.used, remaining=row.remaining)


class RateLimitServicer(ratelimit_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, limiter: Limiter, *, max_estimated_tokens: int = 10_000_000, max_ttl_s: float = 3600.0,
                 default_timeout_s: float = 1.0, max_timeout_s: float = 5.0):
        self._limiter = limiter
        self._max_estimated_tokens = max_estimated_tokens
        self._max_ttl_s = max_ttl_s
        self._default_timeout_s = default_timeout_s
        self._max_timeout_s = max_timeout_s

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        return Deadline.from_remaining(context.time_remaining(), default_s=self._default_timeout_s,
                                       max_s=self._max_timeout_s)

    def _check_reservation_id(self, v: Violations, reservation_id: str) -> None:
        _check_id(v, reservation_id, "reservation_id", required=True, max_len=MAX_RESERVATION_ID_LEN)

    async def Reserve(self, request: ratelimit_pb2.ReserveRequest,
                      context: grpc.aio.ServicerContext) -> ratelimit_pb2.ReserveResponse:
        v = Violations()
        subject = subject_from_proto(request.subject, v)
        v.check(request.estimated_tokens > 0, "estimated_tokens", "must be greater than 0")
        v.check(request.estimated_tokens <= self._max_estimated_tokens, "estimated_tokens",
                f"must be at most {self._max_estimated_tokens}")
        v.check(request.estimated_cost_nano_usd >= 0, "estimated_cost_nano_usd", "must not be negative")
        _check_id(v, request.request_id, "request_id", required=False)
        ttl_s: float | None = None
        if request.HasField("ttl"):
            ttl_s = request.ttl.ToNanoseconds() / 1e9
            v.check(0 <= ttl_s <= self._max_ttl_s, "ttl", f"must be between 0 and {self._max_ttl_s:g} seconds")
        v.raise_if_any()
        reservation = await self._limiter.reserve(subject, int(request.estimated_tokens), ttl_s=ttl_s or None,
                                                  deadline=self._deadline(context))
        return ratelimit_pb2.ReserveResponse(
            reservation_id=reservation.reservation_id,
            expires_at=_timestamp(reservation.expires_at),
            # Budgets are not enforced yet, so there is never a reason to prefer the cheaper tier.
            advice=ratelimit_pb2.BUDGET_ADVICE_NONE,
            degraded=reservation.degraded,
        )

    async def Commit(self, request: ratelimit_pb2.CommitRequest,
                     context: grpc.aio.ServicerContext) -> ratelimit_pb2.CommitResponse:
        v = Violations()
        self._check_reservation_id(v, request.reservation_id)
        v.check(request.actual_tokens <= self._max_estimated_tokens, "actual_tokens",
                f"must be at most {self._max_estimated_tokens}")
        v.check(request.actual_cost_nano_usd >= 0, "actual_cost_nano_usd", "must not be negative")
        v.raise_if_any()
        refunded = await self._limiter.commit(request.reservation_id, int(request.actual_tokens),
                                              deadline=self._deadline(context))
        return ratelimit_pb2.CommitResponse(refunded_tokens=refunded)

    async def Release(self, request: ratelimit_pb2.ReleaseRequest,
                      context: grpc.aio.ServicerContext) -> ratelimit_pb2.ReleaseResponse:
        v = Violations()
        self._check_reservation_id(v, request.reservation_id)
        v.raise_if_any()
        await self._limiter.release(request.reservation_id, deadline=self._deadline(context))
        return ratelimit_pb2.ReleaseResponse()

    async def GetUsage(self, request: ratelimit_pb2.GetUsageRequest,
                       context: grpc.aio.ServicerContext) -> ratelimit_pb2.GetUsageResponse:
        v = Violations()
        subject = subject_from_proto(request.subject, v)
        v.raise_if_any()
        usage = await self._limiter.usage(subject, deadline=self._deadline(context))
        return ratelimit_pb2.GetUsageResponse(usages=[_usage_proto(r) for r in usage.rows], degraded=usage.degraded)
