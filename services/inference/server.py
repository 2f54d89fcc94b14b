"""Inference service process: one engine (an HTTP provider now, vLLM later) behind the admission gate."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from libs.grpc_server import ServiceBinding, run, serve_until_stopped
from libs.settings import SettingsError, load_settings
from services.inference.admission import AdmissionGate
from services.inference.anthropic_http import AnthropicHttpEngine
from services.inference.core import InferenceCore
from services.inference.engine import Engine, ServedModel
from services.inference.openai_http import OpenAIHttpEngine
from services.inference.servicer import InferenceServicer
from services.inference.settings import InferenceSettings
from services.inference.tokenizer import counter_for

log = logging.getLogger(__name__)


def served_models(settings: InferenceSettings) -> list[ServedModel]:
    return [ServedModel(name=public, provider=settings.provider, context_window=settings.context_window,
                        upstream=upstream)
            for public, upstream in settings.model_map.items()]


def make_engine(settings: InferenceSettings) -> Engine:
    api_key = settings.api_key.get_secret_value()
    models = served_models(settings)
    # Every admitted generation gets a pooled connection without queueing for one.
    pool = settings.max_concurrency
    counter = counter_for(settings.tokenizer_path)
    if settings.engine == "openai":
        return OpenAIHttpEngine(base_url=settings.base_url, api_key=api_key, models=models,
                                provider=settings.provider, connect_timeout_s=settings.connect_timeout_s,
                                stream_idle_timeout_s=settings.stream_idle_timeout_s,
                                deadline_margin_s=settings.deadline_margin_s, max_connections=pool,
                                counter=counter)
    if settings.engine == "anthropic":
        return AnthropicHttpEngine(base_url=settings.base_url, api_key=api_key, models=models,
                                   provider=settings.provider, anthropic_version=settings.anthropic_version,
                                   default_max_output_tokens=settings.default_max_output_tokens,
                                   connect_timeout_s=settings.connect_timeout_s,
                                   stream_idle_timeout_s=settings.stream_idle_timeout_s,
                                   deadline_margin_s=settings.deadline_margin_s, max_connections=pool,
                                counter=counter)
    return start_vllm(settings)


def start_vllm(settings: InferenceSettings) -> Engine:
    from services.inference.model_setup import DEFAULT_DIR
    from services.inference.vllm_engine import VllmEngine, VllmOptions

    path = Path(settings.vllm_model_path) if settings.vllm_model_path else DEFAULT_DIR
    if not (path / "config.json").exists():
        print(f"TOLLGATE_INFERENCE_ENGINE=vllm: no model at {path}; run `make setup` "
              "(python -m services.inference.model_setup) or set TOLLGATE_INFERENCE_VLLM_MODEL_PATH", file=sys.stderr)
        raise SettingsError(2)
    return VllmEngine.start(VllmOptions(
        model_path=path, served_name=next(iter(settings.model_map)), device=settings.vllm_device,
        dtype=settings.vllm_dtype, max_model_len=settings.vllm_max_model_len,
        max_num_seqs=settings.vllm_max_num_seqs, max_num_batched_tokens=settings.vllm_max_num_batched_tokens,
        enable_prefix_caching=settings.vllm_enable_prefix_caching,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        cpu_kv_cache_bytes=settings.vllm_cpu_kv_cache_mib << 20, enforce_eager=settings.vllm_enforce_eager,
        default_max_output_tokens=settings.default_max_output_tokens))


async def build(settings: InferenceSettings, engine: Engine | None = None,
                ) -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
    """Wire engine, gate, domain and servicer; returns the bindings and an async close."""
    engine = engine or make_engine(settings)
    # vLLM batches up to max_num_seqs sequences itself; more admitted at once would only queue inside the
    # engine, out of reach of the waiting-depth limit. HTTP engines use the configured concurrency.
    concurrency = settings.vllm_max_num_seqs if settings.engine == "vllm" else settings.max_concurrency
    gate = AdmissionGate(concurrency, settings.max_waiting, retry_after_s=settings.overload_retry_after_s)
    servicer = InferenceServicer(InferenceCore(engine, gate), settings)
    log.info("engine %s (provider %s) serving %s; concurrency %d, queue %d", settings.engine, settings.provider,
             ", ".join(settings.model_map), settings.max_concurrency, settings.max_waiting)
    return [servicer.binding()], engine.aclose


async def serve(settings: InferenceSettings) -> None:
    await serve_until_stopped(settings, "inference", lambda: build(settings))


def main() -> None:
    settings = load_settings(InferenceSettings)
    run(lambda: serve(settings), service="inference", log_level=settings.log_level)
