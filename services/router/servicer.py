"""RouterService: protobuf <-> domain translation only. Authentication is the pipeline's first stage
(``pipeline/authenticate.py``); everything after it is ``pipeline/gateway.py``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import router_pb2, router_pb2_grpc

from libs.chat import (
    finish_to_proto,
    messages_from_proto,
    params_from_proto,
    usage_to_proto,
    validate_messages,
    validate_params,
)
from libs.clients import REQUEST_ID_METADATA
from libs.deadlines import Deadline
from libs.errors import Violations
from libs.validation import check_labels, check_name
from services.router import limits as lim
from services.router import rpc
from services.router import vocabulary as vocab
from services.router.control.experiments import ExperimentStore, enabled_experiments
from services.router.control.keys import KeyAuthenticator, KeyRecord
from services.router.control.registry import AUTO_MODEL
from services.router.ledger.events import GUARD_LABEL
from services.router.pipeline.gateway import Gateway
from services.router.pipeline.request import CachePolicy, GenerateCommand, RetrievalPolicy, Summary


def _check_input(inp: router_pb2.GenerationInput) -> None:
    """Every field of a generation, before anything is reserved: whatever would reach the usage ledger must
    be storable there (see services/router/limits.py)."""
    v = Violations()
    check_name(v, inp.model, "input.model", max_chars=lim.MAX_MODEL_NAME_CHARS, required=True)
    if len(inp.fallback_models) > lim.MAX_FALLBACK_MODELS:
        v.add("input.fallback_models", f"at most {lim.MAX_FALLBACK_MODELS} fallbacks")
    else:
        for i, name in enumerate(inp.fallback_models):
            check_name(v, name, f"input.fallback_models[{i}]", max_chars=lim.MAX_MODEL_NAME_CHARS, required=True)
    validate_messages(inp.messages, v, "input.messages", max_messages=lim.MAX_MESSAGES,
                      max_chars=lim.MAX_MESSAGES_CHARS)
    # Messages (NUL in content, names) and params (finite, ranges, stop sequences): the checks every
    # service shares, in libs/chat.py.
    validate_params(inp.params, v, "input.params", max_output_tokens=lim.MAX_OUTPUT_TOKENS)
    check_labels(v, inp.labels, "input.labels", max_labels=lim.ROUTER_MAX_LABELS,
                 max_key_chars=lim.ROUTER_MAX_LABEL_KEY_CHARS, max_value_chars=lim.ROUTER_MAX_LABEL_VALUE_CHARS)
    # The ledger writer's own marker: a caller setting it could make a row look repaired (or hide one).
    v.check(GUARD_LABEL not in inp.labels, f"input.labels[{GUARD_LABEL!r}]", "is reserved by the ledger")
    check_name(v, inp.user_id, "input.user_id", max_chars=lim.MAX_USER_ID_CHARS)
    check_name(v, inp.prompt_version, "input.prompt_version", max_chars=lim.MAX_PROMPT_VERSION_CHARS)
    v.check(inp.cache_control.max_age_seconds <= lim.MAX_CACHE_AGE_S, "input.cache_control.max_age_seconds",
            "at most 30 days")
    v.check(inp.priority in vocab.PRIORITY, "input.priority", "must be a Priority value")
    v.check(inp.retrieval.top_k <= lim.MAX_RETRIEVAL_TOP_K, "input.retrieval.top_k",
            f"at most {lim.MAX_RETRIEVAL_TOP_K}")
    v.check(inp.retrieval.max_context_tokens <= lim.MAX_CONTEXT_TOKENS, "input.retrieval.max_context_tokens",
            f"at most {lim.MAX_CONTEXT_TOKENS}")
    v.raise_if_any()


def _command(inp: router_pb2.GenerationInput, client_ip: str) -> GenerateCommand:
    _check_input(inp)
    cc = inp.cache_control
    return GenerateCommand(
        model=inp.model, fallback_models=tuple(inp.fallback_models), messages=messages_from_proto(inp.messages),
        params=params_from_proto(inp.params),
        cache=CachePolicy(cc.no_cache, cc.no_store, cc.no_semantic, cc.max_age_seconds, cc.allow_nondeterministic),
        user_id=inp.user_id, prompt_version=inp.prompt_version, labels=dict(inp.labels), client_ip=client_ip,
        retrieval=RetrievalPolicy(enabled=inp.retrieval.enabled, required=inp.retrieval.required,
                                  top_k=inp.retrieval.top_k or RetrievalPolicy.top_k,
                                  max_context_tokens=inp.retrieval.max_context_tokens
                                  or RetrievalPolicy.max_context_tokens),
        priority=vocab.PRIORITY[inp.priority])


def summary_to_proto(s: Summary) -> router_pb2.GenerationSummary:
    latency = duration_pb2.Duration()
    latency.FromNanoseconds(int(s.latency_s * 1e9))
    return router_pb2.GenerationSummary(
        request_id=s.request_id, model=s.model, provider=s.provider, usage=usage_to_proto(s.usage),
        cost_nano_usd=s.cost_nano_usd, saved_nano_usd=s.saved_nano_usd,
        cache_tier=vocab.CACHE_TIER_PROTO.get(s.cache_tier, common_pb2.CACHE_TIER_UNSPECIFIED), degraded=s.degraded,
        degraded_reasons=sorted({vocab.DEGRADED_REASON_PROTO[r] for r in s.degraded_reasons
                                 if r in vocab.DEGRADED_REASON_PROTO}),
        finish_reason=finish_to_proto(s.finish_reason), latency=latency, price_version=s.price_version,
        cited_chunk_ids=s.cited_chunk_ids, variant=s.variant,
        degradation_level=vocab.DEGRADATION_LEVEL_PROTO.get(s.degradation_level,
                                                            router_pb2.DEGRADATION_LEVEL_UNSPECIFIED),
        degraded_detail=s.degraded_detail, route_reason=s.route_reason, attempts=s.attempts)


def new_request_id(context: grpc.aio.ServicerContext) -> str:
    """The id of a generation, chosen before anything can fail and set as the call's trailing metadata
    (``x-request-id``) at once, so the caller gets it whatever the call ends with; the pipeline uses the same
    id (``RequestState.request_id``), so it is the usage-ledger row's too. A caller's own id is never used."""
    request_id = uuid.uuid4().hex
    context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
    return request_id


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, gateway: Gateway, auth: KeyAuthenticator, *, default_timeout_s: float, max_timeout_s: float,
                 experiments: ExperimentStore | None = None, trusted_proxies: frozenset[str] = frozenset()):
        self._experiments = experiments
        self._trusted_proxies = trusted_proxies
        self._gateway = gateway
        self._auth = auth
        self._default_timeout = default_timeout_s
        self._max_timeout = max_timeout_s

    async def _key(self, context: grpc.aio.ServicerContext) -> KeyRecord:
        return await self._auth.authenticate(rpc.authorization(context), rpc.client_ip(context, self._trusted_proxies))

    async def _begin(self, inp: router_pb2.GenerationInput,
                     context: grpc.aio.ServicerContext) -> tuple[KeyRecord, GenerateCommand, Deadline]:
        client_ip = rpc.client_ip(context, self._trusted_proxies)
        key = await self._auth.authenticate(rpc.authorization(context), client_ip)
        cmd = _command(inp, client_ip)
        deadline = Deadline.from_remaining(context.time_remaining(), default_s=self._default_timeout,
                                           max_s=self._max_timeout)
        return key, cmd, deadline

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> router_pb2.GenerateResponse:
        request_id = new_request_id(context)
        key, cmd, deadline = await self._begin(request.input, context)
        parts: list[str] = []
        summary: Summary | None = None
        async for event in self._gateway.generate(key, cmd, deadline, request_id=request_id):
            if isinstance(event, Summary):
                summary = event
            else:
                parts.append(event)
        assert summary is not None
        return router_pb2.GenerateResponse(content="".join(parts), summary=summary_to_proto(summary))

    async def GenerateStream(self, request: router_pb2.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        request_id = new_request_id(context)
        key, cmd, deadline = await self._begin(request.input, context)
        # Before the first event, so an HTTP edge can put the id in its response headers.
        await context.send_initial_metadata(((REQUEST_ID_METADATA, request_id),))
        events = self._gateway.generate(key, cmd, deadline, request_id=request_id)
        try:
            async for event in events:
                if isinstance(event, Summary):
                    yield router_pb2.GenerateStreamResponse(summary=summary_to_proto(event))
                else:
                    yield router_pb2.GenerateStreamResponse(delta=event)
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def SubmitFeedback(self, request: router_pb2.SubmitFeedbackRequest,
                             context: grpc.aio.ServicerContext) -> router_pb2.SubmitFeedbackResponse:
        key = await self._key(context)
        v = Violations()
        check_name(v, request.request_id, "request_id", max_chars=lim.MAX_REQUEST_ID_CHARS, required=True)
        v.check(request.score in vocab.FEEDBACK_SCORE, "score", "must be FEEDBACK_SCORE_UP or FEEDBACK_SCORE_DOWN")
        v.raise_if_any()
        # Re-submitting replaces the score (last one wins); another org's request is NOT_FOUND.
        await enabled_experiments(self._experiments).record_feedback(key.principal, request.request_id,
                                                                   vocab.FEEDBACK_SCORE[request.score])
        return router_pb2.SubmitFeedbackResponse()

    async def ListAvailableModels(self, request: router_pb2.ListAvailableModelsRequest,
                                  context: grpc.aio.ServicerContext) -> router_pb2.ListAvailableModelsResponse:
        key = await self._key(context)
        models = self._gateway.available_models(key)
        listed = [router_pb2.AvailableModel(name=AUTO_MODEL, provider="tollgate")] if models else []
        listed += [router_pb2.AvailableModel(name=m.name, provider=m.provider, context_window=m.context_window,
                                             cost_tier=m.cost_tier) for m in models]
        return router_pb2.ListAvailableModelsResponse(models=listed)
