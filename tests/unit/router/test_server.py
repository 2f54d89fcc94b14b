"""services/router/server.py: what the settings turn into (the rest of the wiring runs in the integration tests)."""

from __future__ import annotations

from services.router.pipeline.failover import RouteTimeouts
from services.router.pipeline.hedging import HedgePolicy
from services.router.server import _hedger, _retry_policy
from services.router.settings import RouterSettings


def test_the_hedger_gets_the_hedge_settings() -> None:
    hedger = _hedger(RouterSettings(hedge_percentile=0.9, hedge_factor=2, hedge_floor_s=0.4, hedge_default_delay_s=2,
                                    hedge_min_samples=7, hedge_max_share=0.2, hedge_budget_window_s=30,
                                    hedge_demote_s=3))
    assert hedger is not None
    assert hedger.policy == HedgePolicy(percentile=0.9, factor=2, floor_s=0.4, default_delay_s=2, min_samples=7,
                                        max_share=0.2, window_s=30, demote_s=3)


def test_hedging_can_be_turned_off() -> None:
    assert _hedger(RouterSettings(hedge_enabled=False)) is None


def test_the_retry_policy_carries_the_route_timeouts() -> None:
    retry = _retry_policy(RouterSettings(inference_first_token_timeout_s=7, inference_stall_timeout_s=6,
                                         route_timeouts_json='{"big": {"first_token_s": 30}}'))
    assert retry.routes == {"big": RouteTimeouts(first_token_s=30)}
    assert (retry.first_token_timeout("big"), retry.first_token_timeout("m"), retry.stall_timeout("big")) == (30, 7, 6)
