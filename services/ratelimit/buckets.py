"""Value types shared by the Redis limiter and its local fallback."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from libs.errors import QuotaExceeded, QuotaViolation
from services.ratelimit.limits import Kind, Level, Scope


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
        return f"{prefix}rl:b:{self.level.scope.value}:{self.level.scope_id}:{self.kind.short}"

    @property
    def identity(self) -> tuple[Scope, str, Kind]:
        return (self.level.scope, self.level.scope_id, self.kind)


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


@dataclass(frozen=True)
class UsageRow:
    scope: Scope
    scope_id: str
    kind: Kind
    limit: int
    # Can exceed `limit` when commits charged more than was reserved.
    used: int
    remaining: int


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
                   estimated_tokens: int) -> QuotaExceeded:
    """The error for a rejected reserve; ``failed`` are indexes into ``buckets``."""
    violations: list[QuotaViolation] = []
    for i in failed:
        b = buckets[i]
        cost = b.cost(estimated_tokens)
        if cost > b.limit:
            description = f"{b.kind.value} limit {b.limit} is below this request's {cost} tokens"
        else:
            description = f"{b.kind.value} limit {b.limit} exceeded"
        violations.append(QuotaViolation(subject=b.level.subject, description=description))
    names = ", ".join(f"{v.subject} {buckets[i].kind.value}" for i, v in zip(failed, violations, strict=True))
    error = QuotaExceeded(f"rate limit exceeded: {names}", violations, retry_after_s=_ceil_ms(retry_after_s))
    error.metadata = {"levels": ",".join(v.subject for v in violations)}
    return error


def _ceil_ms(seconds: float) -> float:
    """Millisecond resolution, never zero: a client told to retry "now" would only spin."""
    return max(0.001, math.ceil(seconds * 1000) / 1000)
