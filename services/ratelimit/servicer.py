"""gRPC RateLimitService: validate, translate protobuf <-> domain, call the limiter."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from libs.deadlines import Deadline
from libs.errors import Violations
from services.ratelimit.buckets import UsageRow
from services.ratelimit.budgets import MAX_NANO_USD
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Kind, Period, Scope, Subject, normalize_ip

# Ids become Redis key segments and log fields: keep them bounded.
MAX_ID_LEN = 256
MAX_RESERVATION_ID_LEN = 128
# The longest textual IPv6 address with a zone is 45+ characters; anything longer is not an address.
MAX_CLIENT_IP_CHARS = 64
# ReconcileSpend's window_time: from the epoch up to 2100-01-01 (the window's end must stay a date
# Python can hold; reconciling a window a century ahead means nothing).
MAX_WINDOW_TIME_S = 4_102_444_800
# Requests one Charge may carry (the router sends one per request it admitted itself).
MAX_CHARGE_REQUESTS = 1_000_000
_NANOS_PER_S = 1_000_000_000

_SCOPES = {
    Scope.GLOBAL: common_pb2.LIMIT_SCOPE_GLOBAL,
    Scope.ORG: common_pb2.LIMIT_SCOPE_ORG,
    Scope.TEAM: common_pb2.LIMIT_SCOPE_TEAM,
    Scope.KEY: common_pb2.LIMIT_SCOPE_KEY,
    Scope.CLIENT_IP: common_pb2.LIMIT_SCOPE_CLIENT_IP,
}
_KINDS: dict[Kind | Period, ratelimit_pb2.LimitKind] = {
    Kind.REQUESTS_PER_MINUTE: ratelimit_pb2.LIMIT_KIND_REQUESTS_PER_MINUTE,
    Kind.TOKENS_PER_MINUTE: ratelimit_pb2.LIMIT_KIND_TOKENS_PER_MINUTE,
    Kind.TOKENS_PER_DAY: ratelimit_pb2.LIMIT_KIND_TOKENS_PER_DAY,
    Period.DAILY: ratelimit_pb2.LIMIT_KIND_BUDGET_DAILY_NANO_USD,
    Period.MONTHLY: ratelimit_pb2.LIMIT_KIND_BUDGET_MONTHLY_NANO_USD,
}
_BUDGET_SCOPES = {v: k for k, v in _SCOPES.items() if k is not Scope.CLIENT_IP}
_PERIODS = {v: k for k, v in _KINDS.items() if isinstance(k, Period)}


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
    if len(msg.client_ip) > MAX_CLIENT_IP_CHARS:
        v.add(f"{path}.client_ip", f"must be at most {MAX_CLIENT_IP_CHARS} characters")
    elif msg.client_ip:
        try:
            client_ip = normalize_ip(msg.client_ip)
        except ValueError:
            v.add(f"{path}.client_ip", "must be an IPv4 or IPv6 address")
    return Subject(org_id=principal.org_id, team_id=principal.team_id, key_id=principal.key_id, client_ip=client_ip)


def _time_in_range(ts: timestamp_pb2.Timestamp) -> bool:
    return 0 <= ts.seconds < MAX_WINDOW_TIME_S and 0 <= ts.nanos < _NANOS_PER_S


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(unix_s * 1e9))
    return ts


def _usage_proto(row: UsageRow) -> ratelimit_pb2.LimitUsage:
    msg = ratelimit_pb2.LimitUsage(scope=_SCOPES[row.scope], scope_id=row.scope_id, kind=_KINDS[row.kind],
                                   limit=row.limit, used=row.used, remaining=row.remaining, reserved=row.reserved)
    if row.window_start is not None:
        msg.window_start.CopyFrom(_timestamp(row.window_start))
    if row.resets_at is not None:
        msg.resets_at.CopyFrom(_timestamp(row.resets_at))
    return msg


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
        v.check(0 <= request.estimated_cost_nano_usd <= MAX_NANO_USD, "estimated_cost_nano_usd",
                f"must be between 0 and {MAX_NANO_USD}")
        _check_id(v, request.request_id, "request_id", required=False)
        ttl_s: float | None = None
        if request.HasField("ttl"):
            ttl_s = request.ttl.seconds + request.ttl.nanos / _NANOS_PER_S
            v.check(0 <= request.ttl.nanos < _NANOS_PER_S and 0 <= ttl_s <= self._max_ttl_s, "ttl",
                    f"must be between 0 and {self._max_ttl_s:g} seconds")
        v.raise_if_any()
        reservation = await self._limiter.reserve(
            subject, int(request.estimated_tokens), estimated_cost_nano_usd=request.estimated_cost_nano_usd,
            request_id=request.request_id, ttl_s=ttl_s or None, deadline=self._deadline(context))
        return ratelimit_pb2.ReserveResponse(
            reservation_id=reservation.reservation_id,
            expires_at=_timestamp(reservation.expires_at),
            advice=(ratelimit_pb2.BUDGET_ADVICE_PREFER_CHEAPER if reservation.prefer_cheaper
                    else ratelimit_pb2.BUDGET_ADVICE_NONE),
            degraded=reservation.degraded,
            replayed=reservation.replayed,
        )

    async def Commit(self, request: ratelimit_pb2.CommitRequest,
                     context: grpc.aio.ServicerContext) -> ratelimit_pb2.CommitResponse:
        v = Violations()
        self._check_reservation_id(v, request.reservation_id)
        v.check(request.actual_tokens <= self._max_estimated_tokens, "actual_tokens",
                f"must be at most {self._max_estimated_tokens}")
        v.check(0 <= request.actual_cost_nano_usd <= MAX_NANO_USD, "actual_cost_nano_usd",
                f"must be between 0 and {MAX_NANO_USD}")
        v.raise_if_any()
        refunded = await self._limiter.commit(request.reservation_id, int(request.actual_tokens),
                                              actual_cost_nano_usd=request.actual_cost_nano_usd,
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

    async def ReconcileSpend(self, request: ratelimit_pb2.ReconcileSpendRequest,
                             context: grpc.aio.ServicerContext) -> ratelimit_pb2.ReconcileSpendResponse:
        v = Violations()
        scope = _BUDGET_SCOPES.get(request.scope)
        v.check(scope is not None, "scope", "must be LIMIT_SCOPE_GLOBAL, _ORG, _TEAM or _KEY")
        _check_id(v, request.scope_id, "scope_id", required=scope in (Scope.ORG, Scope.TEAM, Scope.KEY))
        period = _PERIODS.get(request.kind)
        v.check(period is not None, "kind", "must be LIMIT_KIND_BUDGET_DAILY_NANO_USD or _MONTHLY_NANO_USD")
        # Checked by hand: Timestamp.ToNanoseconds() raises on nanos outside [0, 1e9) (that was INTERNAL).
        wt = request.window_time
        v.check(request.HasField("window_time") and _time_in_range(wt), "window_time",
                "is required: any instant inside the window, from 1970 up to 2100 (nanos in [0, 1e9))")
        v.check(0 <= request.ledger_spent_nano_usd <= MAX_NANO_USD, "ledger_spent_nano_usd",
                f"must be between 0 and {MAX_NANO_USD}")
        v.raise_if_any()
        assert scope is not None and period is not None
        result = await self._limiter.reconcile_spend(
            scope, request.scope_id if scope is not Scope.GLOBAL else "", period,
            wt.seconds + wt.nanos / _NANOS_PER_S, request.ledger_spent_nano_usd,
            deadline=self._deadline(context))
        return ratelimit_pb2.ReconcileSpendResponse(
            window_start=_timestamp(result.window_start), resets_at=_timestamp(result.resets_at),
            previous_spent_nano_usd=result.previous_spent, spent_nano_usd=result.spent,
            reserved_nano_usd=result.reserved)

    async def Charge(self, request: ratelimit_pb2.ChargeRequest,
                     context: grpc.aio.ServicerContext) -> ratelimit_pb2.ChargeResponse:
        v = Violations()
        subject = subject_from_proto(request.subject, v)
        _check_id(v, request.charge_id, "charge_id", required=True)
        v.check(request.requests <= MAX_CHARGE_REQUESTS, "requests", f"must be at most {MAX_CHARGE_REQUESTS}")
        v.check(request.tokens <= self._max_estimated_tokens, "tokens", f"must be at most {self._max_estimated_tokens}")
        v.check(0 <= request.cost_nano_usd <= MAX_NANO_USD, "cost_nano_usd", f"must be between 0 and {MAX_NANO_USD}")
        used_at_s: float | None = None
        if request.HasField("used_at"):
            v.check(_time_in_range(request.used_at), "used_at", "must be from 1970 up to 2100 (nanos in [0, 1e9))")
            used_at_s = request.used_at.seconds + request.used_at.nanos / _NANOS_PER_S
        v.raise_if_any()
        charged = await self._limiter.charge(subject, request.charge_id, requests=int(request.requests),
                                             tokens=int(request.tokens), cost_nano_usd=request.cost_nano_usd,
                                             used_at_s=used_at_s, deadline=self._deadline(context))
        return ratelimit_pb2.ChargeResponse(replayed=charged.replayed, degraded=charged.degraded)
