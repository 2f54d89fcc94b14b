import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from libs.settings import RedisSettings, ServiceSettings, SettingsError, load_settings


class DemoSettings(ServiceSettings, RedisSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_DEMO_", extra="ignore", frozen=True,
                                      populate_by_name=True)
    ttl_s: int = Field(60, gt=0)


def test_reads_prefixed_and_mesh_wide_variables(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_DEMO_PORT", "7000")
    monkeypatch.setenv("TOLLGATE_DEMO_TTL_S", "5")
    monkeypatch.setenv("TOLLGATE_REDIS_PREFIX", "x:")
    s = load_settings(DemoSettings)
    assert (s.port, s.ttl_s, s.redis_prefix, s.address) == (7000, 5, "x:", "127.0.0.1:7000")


def test_bad_values_exit_with_a_message_naming_the_variable(clean_env: None, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOLLGATE_DEMO_TTL_S", "-1")
    monkeypatch.setenv("TOLLGATE_DEMO_PORT", "http")
    with pytest.raises(SettingsError):
        load_settings(DemoSettings)
    err = capsys.readouterr().err
    assert "TOLLGATE_DEMO_TTL_S" in err and "TOLLGATE_DEMO_PORT" in err
