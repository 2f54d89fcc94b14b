"""Value types shared by the Redis limiter and its local fallback."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from libs.errors import QuotaExceeded, QuotaViolation
from services.ratelimit.budgets import BUDGET_EXHAUSTED, BudgetFailure, describe_failure
from services.ratelimit.limits import Kind, Level, Period, Scope


@dataclass(frozen=True)
class Bucket:
    """One token bucket a request draws from: a level's limit of one kind."""

    level: Level
    kind: Kind
    limit: int

    def cost(self, estimated_tokens: int) -> int:
        return estimated_tokens if self.kind.counts_tokens else 1

    @property
    def period_ms(self) -> int:
        return self.kind.period_s * 1000

    def redis_key(self, prefix: str) -> str:
        return bucket_key(prefix, self.level.scope, self.level.scope_id, self.kind)

    @property
    def identity(self) -> tuple[Scope, str, Kind]:
        return (self.level.scope, self.level.scope_id, self.kind)


def bucket_key(prefix: str, scope: Scope, scope_id: str, kind: Kind) -> str:
    """The Redis key of a token bucket."""
    return f"{prefix}rl:tb:{scope.value}:{scope_id}:{kind.short}"


def buckets_for(levels: Iterable[Level]) -> list[Bucket]:
    """Every (level, kind) with a non-zero limit."""
    return [Bucket(level, kind, limit) for level in levels for kind, limit in level.limits.active()]


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    # Unix time (seconds) after which an uncommitted reservation is refunded.
    expires_at: float
    # Admitted by the local fallback because Redis was unavailable.
    degraded: bool = False
    # Some budget is at or above PREFER_CHEAPER_PCT once this reservation is counted.
    prefer_cheaper: bool = False
    # A retried reserve (same request id) answered with the reservation it made before.
    replayed: bool = False


@dataclass(frozen=True)
class UsageRow:
    scope: Scope
    scope_id: str
    # A token/request limit (Kind) or a budget (Period, amounts in nano-USD).
    kind: Kind | Period
    limit: int
    # Can exceed `limit` when commits charged more than was reserved. For budgets: committed
    # spend plus what outstanding reservations hold in the current window.
    used: int
    remaining: int
    # Budgets only: the part of `used` held by outstanding reservations (used - reserved is the
    # committed spend, which is what the usage ledger reconciles with), and the window's bounds.
    reserved: int = 0
    window_start: float | None = None
    resets_at: float | None = None


@dataclass(frozen=True)
class Usage:
    rows: list[UsageRow]
    degraded: bool = False


def usage_row(bucket: Bucket, tokens: float, limit: int | None = None) -> UsageRow:
    limit = bucket.limit if limit is None else limit
    left = math.floor(tokens)
    return UsageRow(bucket.level.scope, bucket.level.scope_id, bucket.kind, limit,
                    used=max(0, limit - left), remaining=max(0, left))


def quota_exceeded(buckets: Sequence[Bucket], failed: Sequence[int], retry_after_s: float,
                   estimated_tokens: int, budget_failures: Sequence[BudgetFailure] = (),
                   estimated_cost: int = 0, *, local: bool = False) -> QuotaExceeded:
    """The error for a rejected reserve; ``failed`` are indexes into ``buckets``.

    One QuotaFailure violation per refusing limit or budget, its subject the level
    (``team:t1``), its description the kind or budget. When a budget refused, ErrorInfo's reason
    is BUDGET_EXHAUSTED (retrying before the window resets will not help; a cache hit still can),
    and RetryInfo is the time until the last refusing window resets.
    """
    violations: list[QuotaViolation] = []
    parts: list[str] = []
    for i in failed:
        b = buckets[i]
        cost = b.cost(estimated_tokens)
        if cost > b.limit:
            description = f"{b.kind.value} limit {b.limit} is below this request's {cost} tokens"
        else:
            description = f"{b.kind.value} limit {b.limit} exceeded"
        violations.append(QuotaViolation(subject=b.level.subject, description=description))
    if failed:
        parts.append("rate limit exceeded: " + ", ".join(f"{buckets[i].level.subject} {buckets[i].kind.value}"
                                                         for i in failed))
    for f in budget_failures:
        violations.append(QuotaViolation(subject=f.line.level.subject,
                                         description=describe_failure(f, estimated_cost, local=local)))
    if budget_failures:
        parts.append("budget exhausted: " + ", ".join(f.line.name for f in budget_failures))
    error = QuotaExceeded("; ".join(parts), violations, retry_after_s=_ceil_ms(retry_after_s))
    error.metadata = {"levels": ",".join(dict.fromkeys(v.subject for v in violations))}
    if budget_failures:
        error.reason = BUDGET_EXHAUSTED
        error.metadata["budgets"] = ",".join(f.line.name for f in budget_failures)
    return error


def _ceil_ms(seconds: float) -> float:
    """Millisecond resolution, never zero: a client told to retry "now" would only spin."""
    # round() first: 0.291 * 1000 is 291.00000000000006 in binary, which must not become 292 ms.
    return max(0.001, math.ceil(round(seconds * 1000, 6)) / 1000)
