"""Stage 6, generate: stream the answer from the first healthy member of the chain, with retries and hedging.

Candidates are (model, replica) pairs in chain order, each model's replicas least busy first. A
retryable failure (backend down, overloaded, a provider's 429) moves on to the next candidate at once;
when a whole round has failed, the next round waits an exponential backoff with jitter (or the
backends' retry-after, if longer) and only starts if that leaves time before the caller's deadline. All
attempts of a request share ``RetryPolicy.max_attempts``. A prompt too long for a model skips it for one
with a larger context window. Once a delta has reached the client the request cannot switch backends,
so a failure then is final. When every candidate failed, ``state.finish`` stays None and the gateway
falls back to the cache.

A hung backend is a failure too (issue 24): no first delta within the route's first-token timeout
(``RetryPolicy.first_token_timeout``), or no chunk for its stall timeout after one, cancels the call, counts a
fault against the replica's breaker and the degradation controller, and is ``Unavailable(BACKEND_TIMEOUT)``:
before any delta reached the client the next candidate is tried, after one the request ends UNAVAILABLE (what
was counted is billed).

Hedging (``hedging.py``): an attempt that has sent no first chunk after the hedge delay gets a second attempt
on the next live candidate (another replica of the same model first), within the hedge budget and the attempt
budget. The first of the two to send a chunk wins; the other is cancelled (its gRPC call too, so the replica
aborts it; no breaker fault unless its own first-token timeout had passed) and, had it sent no first chunk, its
replica is tried after its peers for a while. Only the winner's chunks reach the request's state, so the
request is billed and ledgered once, for the winner's usage. One hedge per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field

from libs.breaker import is_backend_fault
from libs.chat import GenerationChunk, GenerationParams
from libs.deadlines import Deadline
from libs.errors import Overloaded, QuotaExceeded, TollgateError, Unavailable
from services.router.control.registry import ModelEntry, Registry
from services.router.pipeline.admit import AdmitStage
from services.router.pipeline.failover import RetryPolicy, is_context_overflow, is_retryable, retry_after
from services.router.pipeline.hedging import Hedger
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


class _Candidates:
    """The round's (model, replica) candidates in order, produced lazily (a model's replicas are ordered when the
    round reaches it), with a look ahead for the hedge. A model dropped from the round's chain by a context
    overflow yields no further replica."""

    def __init__(self, pairs: Iterator[tuple[ModelEntry, str]]) -> None:
        self._pairs = pairs
        self._ahead: tuple[ModelEntry, str] | None = None

    def peek(self) -> tuple[ModelEntry, str] | None:
        if self._ahead is None:
            self._ahead = next(self._pairs, None)
        return self._ahead

    def take(self) -> tuple[ModelEntry, str] | None:
        picked = self.peek()
        self._ahead = None
        return picked


@dataclass(eq=False)
class _Attempt:
    """One call to one replica: its chunks (timeouts applied) and the task reading the first of them."""

    model: ModelEntry
    target: str
    backend: AsyncIterator[GenerationChunk]
    chunks: AsyncGenerator[GenerationChunk, None]
    started: float
    first: asyncio.Task[GenerationChunk | None]


class GenerateStage:
    def __init__(self, inference: InferenceClient, registry: Registry, route: RouteStage, admit: AdmitStage, *,
                 retry: RetryPolicy, default_max_output_tokens: int, hedger: Hedger | None = None):
        self._inference = inference
        self._registry = registry
        self._route = route
        self._admit = admit
        self._retry = retry
        self._default_max_output = default_max_output_tokens
        # None: no hedging (each attempt waits for its own first-token timeout).
        self._hedger = hedger

    async def through_chain(self, state: RequestState, chain: list[ModelEntry],
                            deadline: Deadline) -> AsyncGenerator[str, None]:
        params = state.cmd.params
        if not params.max_output_tokens:
            params = GenerationParams(params.temperature, params.top_p, self._default_max_output, params.stop,
                                      params.seed)
        prompt_tokens = state.prompt_tokens()
        chain = self._route.fit_context(state, chain, prompt_tokens)
        if self._hedger is not None:
            self._hedger.note_request()
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

    def _pairs(self, state: RequestState, this_round: _Round) -> Iterator[tuple[ModelEntry, str]]:
        for model in list(this_round.chain):
            if model not in this_round.chain:
                continue  # dropped by a context-window overflow this round
            targets = self._inference.order(model.targets)
            for target in self._hedger.prefer(targets) if self._hedger is not None else targets:
                if model not in this_round.chain or state.attempts >= self._retry.max_attempts:
                    break
                yield model, target

    async def _round(self, state: RequestState, this_round: _Round, params: GenerationParams, prompt_tokens: int,
                     deadline: Deadline) -> AsyncGenerator[str, None]:
        candidates = _Candidates(self._pairs(state, this_round))
        while state.attempts < self._retry.max_attempts and (picked := candidates.take()) is not None:
            won = await self._race(state, this_round, candidates, picked, params, prompt_tokens, deadline)
            if won is None:
                continue  # every attempt of the race failed (each handled): on to the next candidate
            attempt, first = won
            try:
                async with aclosing(self._stream(state, attempt, first)) as deltas:
                    async for delta in deltas:
                        yield delta
            except TollgateError as exc:
                self._failed(state, this_round, attempt, exc, prompt_tokens)
                continue
            self._admit.observe(failed=False)
            this_round.done = True
            return

    # --- one attempt, and the race of an attempt with its hedge -------------------------------------

    def _start(self, state: RequestState, this_round: _Round, model: ModelEntry, target: str,
               params: GenerationParams, deadline: Deadline) -> _Attempt:
        state.attempts += 1
        this_round.tried += 1
        state.use_model(model, self._registry)
        backend = self._inference.generate(target, state.request_id, model.name, state.cmd.messages, params,
                                           deadline)
        chunks = self._chunks(state, target, model, backend)
        first = asyncio.get_running_loop().create_task(_first_chunk(chunks), name=f"attempt@{target}")
        return _Attempt(model, target, backend, chunks, time.monotonic(), first)

    async def _race(self, state: RequestState, this_round: _Round, candidates: _Candidates,
                    picked: tuple[ModelEntry, str], params: GenerationParams, prompt_tokens: int,
                    deadline: Deadline) -> tuple[_Attempt, GenerationChunk | None] | None:
        """Start ``picked`` and, if it sends no first chunk within the hedge delay, a hedge; the first to send a
        chunk wins (returned with that chunk), the other is cancelled. None when every attempt failed."""
        primary = self._start(state, this_round, *picked, params, deadline)
        racing = [primary]
        hedge_at, hedged = self._hedge_at(primary), False
        try:
            while racing:
                timeout = None if hedge_at is None else max(0.0, hedge_at - time.monotonic())
                done, _ = await asyncio.wait([a.first for a in racing], timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    hedge_at = None
                    hedge = self._hedge(state, this_round, candidates, primary, params, deadline)
                    if hedge is not None:
                        racing.append(hedge)
                        hedged = True
                    continue
                finished = [a for a in racing if a.first in done]
                winner = next((a for a in finished if not a.first.cancelled() and a.first.exception() is None),
                              None)
                if winner is not None:
                    racing.remove(winner)  # the others are losers, closed below
                    self._won(state, winner, racing, hedged=hedged)
                    return winner, winner.first.result()
                for attempt in finished:
                    racing.remove(attempt)
                    await self._close(attempt)
                for attempt in finished:
                    self._failed(state, this_round, attempt, _raised(attempt), prompt_tokens)
            return None
        finally:
            for loser in racing:  # cancelled: the winner's chunk came first, or the request ended
                await self._close(loser)

    def _hedge_at(self, attempt: _Attempt) -> float | None:
        if self._hedger is None:
            return None
        return attempt.started + self._hedger.delay(attempt.model.name, self._retry.hedge_floor(attempt.model.name))

    def _hedge(self, state: RequestState, this_round: _Round, candidates: _Candidates, primary: _Attempt,
               params: GenerationParams, deadline: Deadline) -> _Attempt | None:
        """A second attempt on the next live candidate, if there is one and the budgets allow it."""
        assert self._hedger is not None
        if (state.attempts >= self._retry.max_attempts or candidates.peek() is None
                or deadline.remaining() < self._retry.min_attempt_s or not self._hedger.try_spend()):
            return None
        picked = candidates.take()
        assert picked is not None
        waited = time.monotonic() - primary.started
        hedge = self._start(state, this_round, *picked, params, deadline)
        state.use_model(primary.model, self._registry)  # the primary's until the race is decided
        log.info("request %s: model %s at %s sent no first token in %.3fs; hedged to model %s at %s "
                 "(attempt %d of %d)", state.request_id, primary.model.name, primary.target, waited,
                 hedge.model.name, hedge.target, state.attempts, self._retry.max_attempts)
        state.add_route_reason(f"hedged: {primary.model.name} sent no first token in {waited:.3g}s, "
                               f"{hedge.model.name} asked too")
        return hedge

    def _won(self, state: RequestState, winner: _Attempt, losers: list[_Attempt], *, hedged: bool) -> None:
        state.use_model(winner.model, self._registry)
        if self._hedger is None:
            return
        self._hedger.observe_first_token(winner.model.name, time.monotonic() - winner.started)
        if hedged:
            for loser in losers:
                if loser.started < winner.started and not loser.first.done():
                    self._hedger.demote(loser.target)  # the older attempt lost: its replica is slow right now
            log.info("request %s: hedge race won by model %s at %s; %d cancelled", state.request_id,
                     winner.model.name, winner.target, len(losers))

    async def _close(self, attempt: _Attempt) -> None:
        """Cancel the attempt's call if it is still waiting for its first chunk, then close its streams."""
        if not attempt.first.done():
            attempt.first.cancel()
            await asyncio.wait([attempt.first])
        if not attempt.first.cancelled():
            attempt.first.exception()  # retrieved: a loser's error is nobody's business
        await attempt.chunks.aclose()
        aclose = getattr(attempt.backend, "aclose", None)
        if aclose is not None:
            await aclose()

    async def _stream(self, state: RequestState, attempt: _Attempt,
                      first: GenerationChunk | None) -> AsyncGenerator[str, None]:
        """The winner's chunks into the request's state, from its first one on."""
        try:
            chunk = first
            while chunk is not None:
                state.counted_output_tokens += chunk.output_tokens
                if chunk.delta:
                    state.text.append(chunk.delta)
                    yield chunk.delta
                if chunk.finish_reason is not None:
                    state.finish = chunk.finish_reason
                    state.usage = chunk.usage
                    state.provider = chunk.provider
                chunk = await anext(attempt.chunks, None)
        finally:
            # Whatever ended the call (done, a timeout, the client gone), the backend's stream is closed now.
            await self._close(attempt)

    async def _chunks(self, state: RequestState, target: str, model: ModelEntry,
                      chunks: AsyncIterator[GenerationChunk]) -> AsyncGenerator[GenerationChunk, None]:
        """The backend's chunks, each awaited at most the route's first-token (until a delta came) or stall
        timeout. On expiry the pending read is cancelled, which cancels the backend call."""
        first = True
        while True:
            limit = self._retry.first_token_timeout(model.name) if first else self._retry.stall_timeout(model.name)
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

    def _failed(self, state: RequestState, this_round: _Round, attempt: _Attempt, exc: TollgateError,
                prompt_tokens: int) -> None:
        """Book a failed attempt; raises when the request cannot go on to another candidate."""
        if self._after_failure(state, exc, attempt.target, this_round) == "overflow":
            this_round.chain = self._route.after_overflow(state, this_round.chain, attempt.model, prompt_tokens)
            if not this_round.chain:
                # The backend's own count says no model with a larger window is left.
                raise too_long_for_every_model(prompt_tokens) from exc
            return
        log.warning("request %s: model %s at %s failed (%s), attempt %d of %d", state.request_id,
                    attempt.model.name, attempt.target, exc.reason, state.attempts, self._retry.max_attempts)

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


async def _first_chunk(chunks: AsyncGenerator[GenerationChunk, None]) -> GenerationChunk | None:
    """The first chunk of an attempt (None: its stream ended without one)."""
    return await anext(chunks, None)


def _raised(attempt: _Attempt) -> TollgateError:
    """The error that ended an attempt before its first chunk; anything else goes on up unchanged."""
    if attempt.first.cancelled():
        raise asyncio.CancelledError()
    exc = attempt.first.exception()
    if not isinstance(exc, TollgateError):
        assert exc is not None
        raise exc
    return exc
