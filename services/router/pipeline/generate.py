"""Stage 6, generate: stream the answer from the first healthy member of the chain, with retries.

Candidates are (model, replica) pairs in chain order, each model's replicas least busy first. A
retryable failure (backend down, overloaded, a provider's 429) moves on to the next candidate at once;
when a whole round has failed, the next round waits an exponential backoff with jitter (or the
backends' retry-after, if longer) and only starts if that leaves time before the caller's deadline. All
attempts of a request share ``RetryPolicy.max_attempts``. A prompt too long for a model skips it for one
with a larger context window. Once a delta has reached the client the request cannot switch backends,
so a failure then is final. When every candidate failed, ``state.finish`` stays None and the gateway
falls back to the cache.

A hung backend is a failure too (issue 24): no first delta within ``RetryPolicy.first_token_timeout_s``,
or no chunk for ``stall_timeout_s`` after one, cancels the call, counts a fault against the replica's
breaker and the degradation controller, and is ``Unavailable(BACKEND_TIMEOUT)``: before any delta reached
the client the next candidate is tried, after one the request ends UNAVAILABLE (what was counted is billed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from libs.breaker import is_backend_fault
from libs.chat import GenerationChunk, GenerationParams
from libs.deadlines import Deadline
from libs.errors import Overloaded, QuotaExceeded, TollgateError, Unavailable
from services.router.control.registry import ModelEntry, Registry
from services.router.pipeline.admit import AdmitStage
from services.router.pipeline.failover import RetryPolicy, is_context_overflow, is_retryable, retry_after
from services.router.pipeline.ports import InferenceClient
from services.router.pipeline.request import RequestState
from services.router.pipeline.route import RouteStage, too_long_for_every_model

log = logging.getLogger(__name__)


@dataclass
class _Round:
    """What one pass over the chain found."""

    chain: list[ModelEntry]
    done: bool = False
    tried: int = 0
    hints: list[float] = field(default_factory=list)
    last_error: TollgateError | None = None


class GenerateStage:
    def __init__(self, inference: InferenceClient, registry: Registry, route: RouteStage, admit: AdmitStage, *,
                 retry: RetryPolicy, default_max_output_tokens: int):
        self._inference = inference
        self._registry = registry
        self._route = route
        self._admit = admit
        self._retry = retry
        self._default_max_output = default_max_output_tokens

    async def through_chain(self, state: RequestState, chain: list[ModelEntry],
                            deadline: Deadline) -> AsyncGenerator[str, None]:
        params = state.cmd.params
        if not params.max_output_tokens:
            params = GenerationParams(params.temperature, params.top_p, self._default_max_output, params.stop,
                                      params.seed)
        prompt_tokens = state.prompt_tokens()
        chain = self._route.fit_context(state, chain, prompt_tokens)
        last_error: TollgateError | None = None
        round_no = 0
        while True:
            this_round = _Round(chain)
            async with aclosing(self._round(state, this_round, params, prompt_tokens, deadline)) as deltas:
                async for delta in deltas:
                    yield delta
            if this_round.done:
                return
            chain, last_error = this_round.chain, this_round.last_error or last_error
            round_no += 1
            wait = self._wait_before(round_no, this_round, deadline, attempts=state.attempts)
            if wait is None:
                break
            await asyncio.sleep(wait)
        if last_error is not None:
            log.warning("every backend failed for request %s after %d attempts: %s", state.request_id,
                        state.attempts, last_error.reason)

    async def _round(self, state: RequestState, this_round: _Round, params: GenerationParams, prompt_tokens: int,
                     deadline: Deadline) -> AsyncGenerator[str, None]:
        for model in list(this_round.chain):
            if model not in this_round.chain:
                continue  # dropped by a context-window overflow this round
            for target in self._inference.order(model.targets):
                if state.attempts >= self._retry.max_attempts:
                    break
                state.attempts += 1
                this_round.tried += 1
                state.use_model(model, self._registry)
                try:
                    async with aclosing(self._call(state, target, model, params, deadline)) as deltas:
                        async for delta in deltas:
                            yield delta
                    self._admit.observe(failed=False)
                    this_round.done = True
                    return
                except TollgateError as exc:
                    if self._after_failure(state, exc, target, this_round) == "overflow":
                        this_round.chain = self._route.after_overflow(state, this_round.chain, model, prompt_tokens)
                        if not this_round.chain:
                            # The backend's own count says no model with a larger window is left.
                            raise too_long_for_every_model(prompt_tokens) from exc
                        break
                    log.warning("request %s: model %s at %s failed (%s), attempt %d of %d", state.request_id,
                                model.name, target, exc.reason, state.attempts, self._retry.max_attempts)

    async def _chunks(self, state: RequestState, target: str, model: ModelEntry,
                      chunks: AsyncIterator[GenerationChunk]) -> AsyncGenerator[GenerationChunk, None]:
        """The backend's chunks, each awaited at most the first-token (until a delta came) or stall timeout.
        On expiry the pending read is cancelled, which cancels the backend call."""
        first = True
        while True:
            limit = self._retry.first_token_timeout_s if first else self._retry.stall_timeout_s
            try:
                async with asyncio.timeout(limit):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                what = "sent no first token" if first else "stalled"
                exc = Unavailable(f"{model.name} {what} in {limit:g}s", reason="BACKEND_TIMEOUT")
                log.warning("request %s: model %s at %s %s in %gs; call cancelled", state.request_id, model.name,
                            target, what, limit)
                state.add_route_reason(f"timeout: {model.name} {what} in {limit:g}s")
                self._inference.record_fault(target, exc)
                raise exc from None
            first = first and not chunk.delta
            yield chunk

    async def _call(self, state: RequestState, target: str, model: ModelEntry, params: GenerationParams,
                    deadline: Deadline) -> AsyncGenerator[str, None]:
        backend = self._inference.generate(target, state.request_id, model.name, state.cmd.messages, params,
                                           deadline)
        try:
            async for chunk in self._chunks(state, target, model, backend):
                state.counted_output_tokens += chunk.output_tokens
                if chunk.delta:
                    state.text.append(chunk.delta)
                    yield chunk.delta
                if chunk.finish_reason is not None:
                    state.finish = chunk.finish_reason
                    state.usage = chunk.usage
                    state.provider = chunk.provider
        finally:
            # Whatever ended the call (done, a timeout, the client gone), the backend's stream is closed now.
            aclose = getattr(backend, "aclose", None)
            if aclose is not None:
                await aclose()

    def _after_failure(self, state: RequestState, exc: TollgateError, target: str, this_round: _Round) -> str:
        """"overflow" or "retry"; raises ``exc`` when the request cannot go on to another candidate."""
        if is_backend_fault(exc):
            self._admit.observe(failed=True)
        if state.text:
            raise exc  # tokens already reached the client: cannot switch models mid-answer
        if is_context_overflow(exc):
            return "overflow"
        if not is_retryable(exc):
            raise exc
        hint = retry_after(exc)
        if hint is not None:
            this_round.hints.append(hint)
            if isinstance(exc, QuotaExceeded | Overloaded):
                # A provider's 429 or a full replica: not a breaker failure; honour its retry-after.
                self._inference.cool_down(target, hint)
        this_round.last_error = exc
        return "retry"

    def _wait_before(self, round_no: int, done: _Round, deadline: Deadline, *, attempts: int) -> float | None:
        """Seconds to wait before round ``round_no``; None when there is no point in another round."""
        if attempts >= self._retry.max_attempts or not done.chain:
            return None
        wait = self._retry.backoff(round_no)
        if done.tried == 0:
            # Nothing was callable this round: wait for a cooling replica, if any will come back.
            cooling = [c for m in done.chain if (c := self._inference.cooling_for(m.targets)) is not None]
            if not cooling:
                return None
            wait = max(wait, min(cooling))
        elif done.hints and len(done.hints) == done.tried:
            wait = max(wait, min(done.hints))
        if deadline.remaining() < wait + self._retry.min_attempt_s:
            return None  # never retry past the caller's deadline
        return wait
