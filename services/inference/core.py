"""The inference domain: admission, the context-window rule, and the engine stream, with logs of ids and counts.

No gRPC here; :mod:`services.inference.servicer` translates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

from libs.chat import ChatMessage, GenerationChunk, GenerationParams
from libs.deadlines import Deadline
from libs.errors import TollgateError
from services.inference.admission import AdmissionGate
from services.inference.engine import USAGE_ESTIMATED, Engine, ServedModel, context_window_exceeded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Load:
    running: int
    waiting: int
    kv_cache_usage: float
    max_waiting: int


class InferenceCore:
    def __init__(self, engine: Engine, gate: AdmissionGate):
        self.engine = engine
        self.gate = gate

    def models(self) -> list[ServedModel]:
        return self.engine.models()

    def model(self, name: str) -> ServedModel | None:
        return next((m for m in self.engine.models() if m.name == name), None)

    def load(self) -> Load:
        engine = self.engine.load()
        # Admitted requests the engine itself still queues (vLLM's scheduler) count as waiting.
        return Load(running=max(0, self.gate.running - engine.waiting), waiting=self.gate.waiting + engine.waiting,
                    kv_cache_usage=engine.kv_cache_usage, max_waiting=self.gate.max_waiting)

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        return await self.engine.count_tokens(model, messages)

    async def generate(self, request_id: str, model: str, messages: Sequence[ChatMessage], params: GenerationParams,
                       deadline: Deadline) -> AsyncGenerator[GenerationChunk, None]:
        """Admit, then stream the engine's chunks; closing this iterator stops the engine's work."""
        served = self.model(model)
        if served is not None:
            input_tokens = await self.engine.count_tokens(model, messages)
            if input_tokens > served.context_window:
                raise context_window_exceeded(input_tokens, served.context_window)
        started = time.monotonic()
        await self.gate.acquire(deadline)
        first_token_ms: float | None = None
        deltas = 0
        outcome = "cancelled"
        stream = self.engine.generate(request_id, model, messages, params, deadline)
        try:
            async for chunk in stream:
                if chunk.delta:
                    deltas += 1
                    if first_token_ms is None:
                        first_token_ms = (time.monotonic() - started) * 1000
                if chunk.usage is not None:
                    outcome = "ok"
                    log.info("generated request_id=%s model=%s provider=%s finish=%s input_tokens=%d "
                             "output_tokens=%d cached_tokens=%d deltas=%d ttft_ms=%.0f total_ms=%.0f%s",
                             request_id, model, chunk.provider, chunk.finish_reason, chunk.usage.input_tokens,
                             chunk.usage.output_tokens, chunk.usage.cached_input_tokens, deltas,
                             first_token_ms or 0.0, (time.monotonic() - started) * 1000,
                             " usage_estimated" if chunk.extra.get(USAGE_ESTIMATED) else "")
                yield chunk
        except TollgateError as exc:
            outcome = exc.reason
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            try:
                await _aclose(stream)
            finally:
                self.gate.release()
            if outcome != "ok":
                log.info("generation ended request_id=%s model=%s outcome=%s deltas=%d total_ms=%.0f",
                         request_id, model, outcome, deltas, (time.monotonic() - started) * 1000)


async def _aclose(stream: AsyncIterator[GenerationChunk]) -> None:
    """Close the engine's stream now (not whenever it is garbage-collected): that is what stops the work."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
