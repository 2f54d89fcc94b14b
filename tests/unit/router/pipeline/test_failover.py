"""services/router/pipeline/failover.py: per-route timeouts (issue 24); the retry rules are exercised through the
generate stage in test_generate.py."""

from __future__ import annotations

import pytest

from services.router.pipeline.failover import RetryPolicy, RouteTimeouts, parse_route_timeouts


def test_route_timeouts_parse_from_json() -> None:
    routes = parse_route_timeouts('{"gpt-4o": {"first_token_s": 20, "stall_s": 15}, "small": {"hedge_floor_s": 0.1}}')
    assert routes == {"gpt-4o": RouteTimeouts(first_token_s=20, stall_s=15),
                      "small": RouteTimeouts(hedge_floor_s=0.1)}
    assert parse_route_timeouts("") == {} and parse_route_timeouts("  ") == {}


@pytest.mark.parametrize(("text", "names"), [
    ("{", "Invalid JSON"),
    ("[]", "object"),
    ('{"m": {"first_token": 20}}', "m.first_token"),  # unknown field
    ('{"m": {"first_token_s": 0}}', "m.first_token_s"),
    ('{"m": {"stall_s": -1}}', "m.stall_s"),
    ('{"m": {"hedge_floor_s": "soon"}}', "m.hedge_floor_s"),
    ('{"m": 5}', "m"),
    ('{"": {}}', "key"),
])
def test_bad_route_timeouts_are_refused_naming_the_entry(text: str, names: str) -> None:
    with pytest.raises(ValueError, match="route timeouts") as err:
        parse_route_timeouts(text)
    assert names in str(err.value)


def test_a_route_overrides_only_what_it_sets() -> None:
    retry = RetryPolicy(first_token_timeout_s=10, stall_timeout_s=8, routes={
        "big": RouteTimeouts(first_token_s=30), "fast": RouteTimeouts(stall_s=2, hedge_floor_s=0.1)})
    assert (retry.first_token_timeout("big"), retry.stall_timeout("big"), retry.hedge_floor("big")) == (30, 8, None)
    assert (retry.first_token_timeout("fast"), retry.stall_timeout("fast"), retry.hedge_floor("fast")) == (10, 2, 0.1)
    assert (retry.first_token_timeout("other"), retry.stall_timeout("other")) == (10, 8)
