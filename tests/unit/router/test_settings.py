"""RouterSettings (services/router/settings.py): the settings validated at startup."""

from __future__ import annotations

import pytest

from libs.settings import SettingsError, load_settings
from services.router.settings import RouterSettings


def test_route_timeouts_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    value = '{"gpt-4o": {"first_token_s": 20, "stall_s": 15}}'
    monkeypatch.setenv("TOLLGATE_ROUTER_ROUTE_TIMEOUTS_JSON", value)
    assert load_settings(RouterSettings).route_timeouts_json == value


@pytest.mark.parametrize("value", ["{not json", '{"m": {"first_token_s": 0}}', '{"m": {"stall_s": -2}}',
                                   '{"m": {"first_token_secs": 20}}'])
def test_bad_route_timeouts_stop_the_router_at_startup(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], value: str) -> None:
    monkeypatch.setenv("TOLLGATE_ROUTER_ROUTE_TIMEOUTS_JSON", value)
    with pytest.raises(SettingsError):
        load_settings(RouterSettings)
    assert "TOLLGATE_ROUTER_ROUTE_TIMEOUTS_JSON" in capsys.readouterr().err


def test_hedging_is_on_by_default_and_its_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = RouterSettings()
    assert settings.hedge_enabled and settings.hedge_percentile == 0.95 and settings.hedge_max_share == 0.1
    for name, bad in [("HEDGE_PERCENTILE", "1.5"), ("HEDGE_FACTOR", "0.5"), ("HEDGE_FLOOR_S", "0"),
                      ("HEDGE_MAX_SHARE", "-0.1"), ("HEDGE_BUDGET_WINDOW_S", "0")]:
        with monkeypatch.context() as env:
            env.setenv(f"TOLLGATE_ROUTER_{name}", bad)
            with pytest.raises(SettingsError):
                load_settings(RouterSettings)
