"""Each level (key, team, org, client IP, global) trips on its own, and is the one named.

Every level is configured in every case, the others roomy, so a refusal naming the wrong level
(or a level that is skipped) fails the test.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from libs.errors import QuotaExceeded
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Kind, Limits, Scope, StaticLimitStore, Subject

MakeLimiter = Callable[..., tuple[Limiter, StaticLimitStore]]
SUBJECT = Subject("o1", "t1", "k1", client_ip="10.1.2.3")
ROOMY = Limits(requests_per_minute=60, tokens_per_minute=10_000_000, tokens_per_day=100_000_000)
LEVELS = [(Scope.KEY, "k1", "key:k1"), (Scope.TEAM, "t1", "team:t1"), (Scope.ORG, "o1", "org:o1"),
          (Scope.CLIENT_IP, "10.1.2.3", "client_ip:10.1.2.3"), (Scope.GLOBAL, "*", "global")]


def tight(kind: Kind) -> Limits:
    values = {Kind.REQUESTS_PER_MINUTE: ROOMY.requests_per_minute, Kind.TOKENS_PER_MINUTE: ROOMY.tokens_per_minute,
              Kind.TOKENS_PER_DAY: ROOMY.tokens_per_day}
    values[kind] = 3 if kind is Kind.REQUESTS_PER_MINUTE else 3_000
    return Limits(values[Kind.REQUESTS_PER_MINUTE], values[Kind.TOKENS_PER_MINUTE], values[Kind.TOKENS_PER_DAY])


@pytest.mark.parametrize("scope, scope_id, name", LEVELS)
@pytest.mark.parametrize("kind", list(Kind))
async def test_each_level_trips_on_its_own(make_limiter: MakeLimiter, scope: Scope, scope_id: str, name: str,
                                           kind: Kind) -> None:
    rows = {(s, i): ROOMY for s, i, _ in LEVELS}
    rows[(scope, scope_id)] = tight(kind)
    limiter, _ = make_limiter(rows)
    for _ in range(3):
        await limiter.reserve(SUBJECT, 1_000)
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 1_000)
    err = info.value
    assert [v.subject for v in err.violations] == [name]
    assert err.violations[0].description == f"{kind.value} limit {3 if kind is Kind.REQUESTS_PER_MINUTE else 3000}" \
        " exceeded"
    assert err.reason == "QUOTA_EXCEEDED" and err.metadata["levels"] == name
    # The refusal debited nothing: every level still shows three requests (a fourth debit would
    # show as 4; at one request a second of refill, a slow run may show 2).
    usage = await limiter.usage(SUBJECT)
    rpm_rows = [row for row in usage.rows if row.kind is Kind.REQUESTS_PER_MINUTE]
    assert len(rpm_rows) == 5
    assert all(2 <= row.used <= 3 for row in rpm_rows), rpm_rows
    # A subject that does not share the tripped level is still admitted (the global level is shared by all).
    if scope is not Scope.GLOBAL:
        await limiter.reserve(Subject("o2", "t2", "k2", client_ip="10.9.9.9"), 1_000)
