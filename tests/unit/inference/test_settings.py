from __future__ import annotations

from pathlib import Path

import pytest

from libs.settings import SettingsError, load_settings
from services.inference.server import make_engine, served_models
from services.inference.settings import InferenceSettings


@pytest.mark.usefixtures("clean_env")
def test_defaults() -> None:
    s = InferenceSettings()
    assert s.port == 50055
    assert (s.engine, s.provider, s.base_url) == ("openai", "openai", "https://api.openai.com")
    assert s.model_map == {"gpt-4o-mini": "gpt-4o-mini"}


@pytest.mark.usefixtures("clean_env")
def test_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_INFERENCE_PORT", "6000")
    monkeypatch.setenv("TOLLGATE_INFERENCE_ENGINE", "anthropic")
    monkeypatch.setenv("TOLLGATE_INFERENCE_PROVIDER_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("TOLLGATE_INFERENCE_API_KEY", "sk-very-secret")
    monkeypatch.setenv("TOLLGATE_INFERENCE_SERVED_MODELS", " claude = claude-3-5-haiku-latest , other ")
    monkeypatch.setenv("TOLLGATE_INFERENCE_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("TOLLGATE_INFERENCE_MAX_WAITING", "0")
    s = InferenceSettings()
    assert (s.port, s.engine, s.provider, s.max_concurrency, s.max_waiting) == (6000, "anthropic", "anthropic", 3, 0)
    assert s.base_url == "http://127.0.0.1:9"
    assert s.model_map == {"claude": "claude-3-5-haiku-latest", "other": "other"}
    assert s.api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(s) and "sk-very-secret" not in str(s.model_dump())
    assert [(m.name, m.upstream_name, m.provider) for m in served_models(s)] == [
        ("claude", "claude-3-5-haiku-latest", "anthropic"), ("other", "other", "anthropic")]


@pytest.mark.usefixtures("clean_env")
def test_launcher_spelling_of_the_model_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_INFERENCE_MODELS", "demo-small")
    assert InferenceSettings().model_map == {"demo-small": "demo-small"}


@pytest.mark.usefixtures("clean_env")
def test_invalid_settings_exit_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_INFERENCE_SERVED_MODELS", " , ")
    with pytest.raises(SettingsError):
        load_settings(InferenceSettings)
    monkeypatch.setenv("TOLLGATE_INFERENCE_SERVED_MODELS", "m")
    monkeypatch.setenv("TOLLGATE_INFERENCE_ENGINE", "llamacpp")
    with pytest.raises(SettingsError):
        load_settings(InferenceSettings)


@pytest.mark.usefixtures("clean_env")
def test_vllm_without_a_prepared_model_stops_with_a_message(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingsError):
        make_engine(InferenceSettings(engine="vllm", vllm_model_path=str(tmp_path / "missing")))
    assert "make setup" in capsys.readouterr().err
