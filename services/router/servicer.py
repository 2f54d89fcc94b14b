"""RouterService and AdminService: protobuf <-> domain translation only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from libs.chat import (
    finish_to_proto,
    messages_from_proto,
    params_from_proto,
    usage_to_proto,
    validate_messages,
    validate_params,
)
from libs.clients import CLIENT_IP_METADATA
from libs.deadlines import Deadline
from libs.errors import Unavailable, Violations
from libs.validation import check_labels, check_name, check_timestamp
from services.router import limits as lim
from services.router.control import ControlPlane
from services.router.dead_letter_rpc import DeadLetterAdmin
from services.router.experiments import (
    DEFAULT_ALPHA,
    DOWN,
    UP,
    Experiment,
    ExperimentBook,
    ExperimentStore,
    Variant,
)
from services.router.gateway import AUTO_MODEL, CachePolicy, Gateway, GenerateCommand, RetrievalPolicy, Summary
from services.router.keys import HASH_ALGORITHM, HASH_RATIONALE, Authenticator, KeyRecord, require_admin
from services.router.registry import Registry
from services.router.usage import GUARD_LABEL

_TIER = {"miss": common_pb2.CACHE_TIER_MISS, "exact": common_pb2.CACHE_TIER_EXACT,
         "semantic": common_pb2.CACHE_TIER_SEMANTIC}
_DEGRADED = {
    "no_backend": router_pb2.DEGRADED_REASON_NO_BACKEND,
    "stale_cache": router_pb2.DEGRADED_REASON_STALE_CACHE,
    "backend_errors": router_pb2.DEGRADED_REASON_BACKEND_ERRORS,
    "budget": router_pb2.DEGRADED_REASON_BUDGET,
    "load": router_pb2.DEGRADED_REASON_LOAD,
    "retrieval_unavailable": router_pb2.DEGRADED_REASON_RETRIEVAL_UNAVAILABLE,
    "ratelimit_unavailable": router_pb2.DEGRADED_REASON_RATELIMIT_UNAVAILABLE,
}
_LEVEL = {"full": router_pb2.DEGRADATION_LEVEL_FULL, "reduced": router_pb2.DEGRADATION_LEVEL_REDUCED,
          "cache_only": router_pb2.DEGRADATION_LEVEL_CACHE_ONLY}
_PRIORITY = {router_pb2.PRIORITY_UNSPECIFIED: "normal", router_pb2.PRIORITY_LOW: "low",
             router_pb2.PRIORITY_NORMAL: "normal", router_pb2.PRIORITY_HIGH: "high"}
_SCOPE = {common_pb2.LIMIT_SCOPE_GLOBAL: "global", common_pb2.LIMIT_SCOPE_ORG: "org",
          common_pb2.LIMIT_SCOPE_TEAM: "team", common_pb2.LIMIT_SCOPE_KEY: "key",
          common_pb2.LIMIT_SCOPE_CLIENT_IP: "client_ip"}
_SCOPE_PROTO = {v: k for k, v in _SCOPE.items()}
_ROLE = {admin_pb2.KEY_ROLE_ADMIN: "admin", admin_pb2.KEY_ROLE_MEMBER: "member"}
_ROLE_PROTO = {v: k for k, v in _ROLE.items()}
_KEY_TIER = {admin_pb2.KEY_TIER_UNSPECIFIED: "pro", admin_pb2.KEY_TIER_FREE: "free", admin_pb2.KEY_TIER_PRO: "pro",
             admin_pb2.KEY_TIER_ENTERPRISE: "enterprise"}
_KEY_TIER_PROTO = {"free": admin_pb2.KEY_TIER_FREE, "pro": admin_pb2.KEY_TIER_PRO,
                   "enterprise": admin_pb2.KEY_TIER_ENTERPRISE}
_COST_TIER = {admin_pb2.COST_TIER_CHEAP: "cheap", admin_pb2.COST_TIER_STRONG: "strong"}
_COST_TIER_PROTO = {v: k for k, v in _COST_TIER.items()}
_GROUP = {admin_pb2.USAGE_GROUP_BY_ORG: "org", admin_pb2.USAGE_GROUP_BY_TEAM: "team",
          admin_pb2.USAGE_GROUP_BY_KEY: "key", admin_pb2.USAGE_GROUP_BY_MODEL: "model",
          admin_pb2.USAGE_GROUP_BY_DAY: "day"}

_FEEDBACK = {router_pb2.FEEDBACK_SCORE_UP: UP, router_pb2.FEEDBACK_SCORE_DOWN: DOWN}
_METRIC = {"latency_ms": admin_pb2.EXPERIMENT_METRIC_LATENCY, "cost_nano_usd": admin_pb2.EXPERIMENT_METRIC_COST,
           "error_rate": admin_pb2.EXPERIMENT_METRIC_ERROR_RATE,
           "feedback_up_rate": admin_pb2.EXPERIMENT_METRIC_FEEDBACK_UP_RATE}


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def _peer_ip(context: grpc.aio.ServicerContext) -> str:
    # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555"
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""


def _client_ip(context: grpc.aio.ServicerContext, trusted_proxies: frozenset[str]) -> str:
    """The peer's address; for a trusted proxy (the HTTP edge), the client address it forwards."""
    peer = _peer_ip(context)
    if peer in trusted_proxies:
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_IP_METADATA and isinstance(value, str) and 0 < len(value) <= 64:
                return value
    return peer


def _when(v: Violations, msg: Any, field_name: str) -> datetime | None:
    """An optional Timestamp field as an aware datetime; a value datetime/PostgreSQL cannot hold is a violation."""
    if not msg.HasField(field_name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, field_name)
    if not check_timestamp(v, ts.seconds, ts.nanos, field_name):
        return None
    return ts.ToDatetime(UTC)


def _ts(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def _experiment_store(store: ExperimentStore | None) -> ExperimentStore:
    if store is None:
        raise Unavailable("A/B experiments are not enabled on this router", reason="EXPERIMENTS_DISABLED")
    return store


def experiment_to_proto(e: Experiment) -> admin_pb2.ExperimentInfo:
    return admin_pb2.ExperimentInfo(
        name=e.name, model=e.model, active=e.active, created_at=_ts(e.created_at), created_by=e.created_by,
        ended_at=_ts(e.ended_at) if e.ended_at else None,
        variants=[admin_pb2.ExperimentVariant(name=v.name, model=v.model, weight=v.weight) for v in e.variants])


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
    v.check(inp.priority in _PRIORITY, "input.priority", "must be a Priority value")
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
        priority=_PRIORITY[inp.priority])


def summary_to_proto(s: Summary) -> router_pb2.GenerationSummary:
    latency = duration_pb2.Duration()
    latency.FromNanoseconds(int(s.latency_s * 1e9))
    return router_pb2.GenerationSummary(
        request_id=s.request_id, model=s.model, provider=s.provider, usage=usage_to_proto(s.usage),
        cost_nano_usd=s.cost_nano_usd, saved_nano_usd=s.saved_nano_usd,
        cache_tier=_TIER.get(s.cache_tier, common_pb2.CACHE_TIER_UNSPECIFIED), degraded=s.degraded,
        degraded_reasons=sorted({_DEGRADED[r] for r in s.degraded_reasons if r in _DEGRADED}),
        finish_reason=finish_to_proto(s.finish_reason), latency=latency, price_version=s.price_version,
        cited_chunk_ids=s.cited_chunk_ids, variant=s.variant,
        degradation_level=_LEVEL.get(s.degradation_level, router_pb2.DEGRADATION_LEVEL_UNSPECIFIED),
        degraded_detail=s.degraded_detail, route_reason=s.route_reason, attempts=s.attempts)


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, gateway: Gateway, auth: Authenticator, *, default_timeout_s: float, max_timeout_s: float,
                 experiments: ExperimentStore | None = None, trusted_proxies: frozenset[str] = frozenset()):
        self._experiments = experiments
        self._trusted_proxies = trusted_proxies
        self._gateway = gateway
        self._auth = auth
        self._default_timeout = default_timeout_s
        self._max_timeout = max_timeout_s

    async def _key(self, context: grpc.aio.ServicerContext) -> KeyRecord:
        return await self._auth.authenticate(_authorization(context), _client_ip(context, self._trusted_proxies))

    async def _begin(self, inp: router_pb2.GenerationInput,
                     context: grpc.aio.ServicerContext) -> tuple[KeyRecord, GenerateCommand, Deadline]:
        client_ip = _client_ip(context, self._trusted_proxies)
        key = await self._auth.authenticate(_authorization(context), client_ip)
        cmd = _command(inp, client_ip)
        deadline = Deadline.from_remaining(context.time_remaining(), default_s=self._default_timeout,
                                           max_s=self._max_timeout)
        return key, cmd, deadline

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> router_pb2.GenerateResponse:
        key, cmd, deadline = await self._begin(request.input, context)
        parts: list[str] = []
        summary: Summary | None = None
        async for event in self._gateway.generate(key, cmd, deadline):
            if isinstance(event, Summary):
                summary = event
            else:
                parts.append(event)
        assert summary is not None
        return router_pb2.GenerateResponse(content="".join(parts), summary=summary_to_proto(summary))

    async def GenerateStream(self, request: router_pb2.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        key, cmd, deadline = await self._begin(request.input, context)
        events = self._gateway.generate(key, cmd, deadline)
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
        v.check(request.score in _FEEDBACK, "score", "must be FEEDBACK_SCORE_UP or FEEDBACK_SCORE_DOWN")
        v.raise_if_any()
        # Re-submitting replaces the score (last one wins); another org's request is NOT_FOUND.
        await _experiment_store(self._experiments).record_feedback(key.principal, request.request_id,
                                                                   _FEEDBACK[request.score])
        return router_pb2.SubmitFeedbackResponse()

    async def ListAvailableModels(self, request: router_pb2.ListAvailableModelsRequest,
                                  context: grpc.aio.ServicerContext) -> router_pb2.ListAvailableModelsResponse:
        key = await self._key(context)
        models = self._gateway.available_models(key)
        listed = [router_pb2.AvailableModel(name=AUTO_MODEL, provider="tollgate")] if models else []
        listed += [router_pb2.AvailableModel(name=m.name, provider=m.provider, context_window=m.context_window,
                                             cost_tier=m.cost_tier) for m in models]
        return router_pb2.ListAvailableModelsResponse(models=listed)


def _check_id(v: Violations, value: str, field_path: str, *, required: bool = False) -> None:
    check_name(v, value, field_path, max_chars=lim.MAX_ID_CHARS, required=required)


def _check_model_name(v: Violations, value: str, field_path: str, *, required: bool = False) -> None:
    check_name(v, value, field_path, max_chars=lim.MAX_MODEL_NAME_CHARS, required=required)


def _check_scope(v: Violations, scope: int, scope_id: str) -> None:
    v.check(scope in _SCOPE, "scope", "must be a LimitScope value other than LIMIT_SCOPE_UNSPECIFIED")
    _check_id(v, scope_id, "scope_id")


class AdminServicer(DeadLetterAdmin, admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, control: ControlPlane, auth: Authenticator, registry: Registry, *,
                 experiments: ExperimentStore | None = None, experiment_book: ExperimentBook | None = None,
                 trusted_proxies: frozenset[str] = frozenset()):
        self._experiments, self._experiment_book = experiments, experiment_book
        self._control = control
        self._auth = auth
        self._registry = registry
        self._trusted_proxies = trusted_proxies

    async def _admin(self, context: grpc.aio.ServicerContext) -> str:
        key = await self._auth.authenticate(_authorization(context), _client_ip(context, self._trusted_proxies))
        require_admin(key)
        return key.key_id

    async def CreateOrg(self, request: admin_pb2.CreateOrgRequest, context: Any) -> admin_pb2.CreateOrgResponse:
        actor = await self._admin(context)
        v = Violations()
        check_name(v, request.name, "name", max_chars=lim.MAX_DISPLAY_NAME_CHARS, required=True)
        v.raise_if_any()
        return admin_pb2.CreateOrgResponse(org_id=await self._control.create_org(actor, request.name))

    async def CreateTeam(self, request: admin_pb2.CreateTeamRequest, context: Any) -> admin_pb2.CreateTeamResponse:
        actor = await self._admin(context)
        v = Violations()
        _check_id(v, request.org_id, "org_id", required=True)
        check_name(v, request.name, "name", max_chars=lim.MAX_DISPLAY_NAME_CHARS, required=True)
        v.raise_if_any()
        return admin_pb2.CreateTeamResponse(team_id=await self._control.create_team(actor, request.org_id,
                                                                                     request.name))

    async def CreateKey(self, request: admin_pb2.CreateKeyRequest, context: Any) -> admin_pb2.CreateKeyResponse:
        actor = await self._admin(context)
        v = Violations()
        _check_id(v, request.org_id, "org_id", required=True)
        _check_id(v, request.team_id, "team_id", required=True)
        check_name(v, request.name, "name", max_chars=lim.MAX_DISPLAY_NAME_CHARS, required=True)
        v.check(request.role in _ROLE, "role", "must be KEY_ROLE_MEMBER or KEY_ROLE_ADMIN")
        v.check(request.tier in _KEY_TIER, "tier", "must be a KeyTier value")
        if len(request.allowed_models) > lim.MAX_ALLOWED_MODELS:
            v.add("allowed_models", f"at most {lim.MAX_ALLOWED_MODELS} models")
        else:
            for i, name in enumerate(request.allowed_models):
                _check_model_name(v, name, f"allowed_models[{i}]", required=True)
        expires_at = _when(v, request, "expires_at")
        v.raise_if_any()
        created = await self._control.create_key(
            actor, org_id=request.org_id, team_id=request.team_id, name=request.name, role=_ROLE[request.role],
            allowed_models=list(request.allowed_models), tier=_KEY_TIER[request.tier], expires_at=expires_at)
        return admin_pb2.CreateKeyResponse(key_id=created.key_id, key=created.secret, hash_algorithm=HASH_ALGORITHM,
                                           hash_rationale=HASH_RATIONALE)

    async def RevokeKey(self, request: admin_pb2.RevokeKeyRequest, context: Any) -> admin_pb2.RevokeKeyResponse:
        actor = await self._admin(context)
        v = Violations()
        _check_id(v, request.key_id, "key_id", required=True)
        v.raise_if_any()
        await self._control.revoke_key(actor, request.key_id)
        # This router at once; the others through the revocation broadcast (or their 1 s cache TTL).
        self._auth.revoked(request.key_id)
        return admin_pb2.RevokeKeyResponse()

    async def ListKeys(self, request: admin_pb2.ListKeysRequest, context: Any) -> admin_pb2.ListKeysResponse:
        await self._admin(context)
        v = Violations()
        _check_id(v, request.org_id, "org_id")
        _check_id(v, request.team_id, "team_id")
        v.raise_if_any()
        keys = await self._control.list_keys(request.org_id, request.team_id)
        return admin_pb2.ListKeysResponse(keys=[admin_pb2.KeyInfo(
            key_id=k.record.key_id,
            principal=common_pb2.Principal(org_id=k.record.principal.org_id, team_id=k.record.principal.team_id,
                                           key_id=k.record.key_id),
            name=k.name, role=_ROLE_PROTO[k.record.role], allowed_models=list(k.record.allowed_models),
            display_prefix=k.display_prefix, revoked=k.record.revoked, created_at=_ts(k.created_at),
            expires_at=_ts(k.record.expires_at) if k.record.expires_at else None,
            revoked_at=_ts(k.revoked_at) if k.revoked_at else None, tier=_KEY_TIER_PROTO[k.record.tier])
            for k in keys])

    async def SetLimits(self, request: admin_pb2.SetLimitsRequest, context: Any) -> admin_pb2.SetLimitsResponse:
        actor = await self._admin(context)
        v = Violations()
        _check_scope(v, request.scope, request.scope_id)
        for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day"):
            v.check(getattr(request, name) <= lim.MAX_LIMIT_VALUE, name, f"at most {lim.MAX_LIMIT_VALUE}")
        v.raise_if_any()
        await self._control.set_limits(actor, _SCOPE[request.scope], request.scope_id,
                                       request.requests_per_minute, request.tokens_per_minute,
                                       request.tokens_per_day)
        return admin_pb2.SetLimitsResponse()

    async def SetBudget(self, request: admin_pb2.SetBudgetRequest, context: Any) -> admin_pb2.SetBudgetResponse:
        actor = await self._admin(context)
        v = Violations()
        _check_scope(v, request.scope, request.scope_id)
        v.check(request.daily_nano_usd >= 0, "daily_nano_usd", "must not be negative")
        v.check(request.monthly_nano_usd >= 0, "monthly_nano_usd", "must not be negative")
        v.raise_if_any()
        await self._control.set_budget(actor, _SCOPE[request.scope], request.scope_id,
                                       request.daily_nano_usd, request.monthly_nano_usd)
        return admin_pb2.SetBudgetResponse()

    async def RegisterModel(self, request: admin_pb2.RegisterModelRequest,
                            context: Any) -> admin_pb2.RegisterModelResponse:
        actor = await self._admin(context)
        m = request.model
        v = Violations()
        _check_model_name(v, m.name, "model.name", required=True)
        v.check(m.name != AUTO_MODEL, "model.name", "'auto' is reserved for the complexity router")
        check_name(v, m.provider, "model.provider", max_chars=lim.MAX_PROVIDER_CHARS, required=True)
        check_name(v, m.inference_target, "model.inference_target", max_chars=lim.MAX_TARGET_CHARS, required=True)
        v.check(0 < m.context_window <= lim.MAX_CONTEXT_WINDOW, "model.context_window",
                f"must be between 1 and {lim.MAX_CONTEXT_WINDOW}")
        v.check(m.cost_tier in _COST_TIER, "model.cost_tier", "must be COST_TIER_CHEAP or COST_TIER_STRONG")
        v.raise_if_any()
        await self._control.register_model(actor, name=m.name, provider=m.provider,
                                           inference_target=m.inference_target, context_window=m.context_window,
                                           cost_tier=_COST_TIER[m.cost_tier])
        await self._registry.load()
        return admin_pb2.RegisterModelResponse()

    async def ListModels(self, request: admin_pb2.ListModelsRequest, context: Any) -> admin_pb2.ListModelsResponse:
        await self._admin(context)
        return admin_pb2.ListModelsResponse(models=[admin_pb2.ModelInfo(
            name=m.name, provider=m.provider, inference_target=m.inference_target, context_window=m.context_window,
            cost_tier=_COST_TIER_PROTO[m.cost_tier]) for m in self._registry.models()])

    async def SetPrice(self, request: admin_pb2.SetPriceRequest, context: Any) -> admin_pb2.SetPriceResponse:
        actor = await self._admin(context)
        v = Violations()
        for name in ("input_nano_usd_per_mtok", "output_nano_usd_per_mtok", "cached_input_nano_usd_per_mtok"):
            v.check(0 <= getattr(request, name) <= lim.MAX_PRICE_NANO_USD_PER_MTOK, name,
                    f"must be between 0 and {lim.MAX_PRICE_NANO_USD_PER_MTOK}")
        _check_model_name(v, request.model, "model", required=True)
        effective_from = _when(v, request, "effective_from")
        v.raise_if_any()
        version = await self._control.set_price(
            actor, model=request.model, input_per_mtok=request.input_nano_usd_per_mtok,
            output_per_mtok=request.output_nano_usd_per_mtok,
            cached_input_per_mtok=request.cached_input_nano_usd_per_mtok, effective_from=effective_from)
        await self._registry.load()
        return admin_pb2.SetPriceResponse(price_version=version)

    async def GetUsageReport(self, request: admin_pb2.GetUsageReportRequest,
                             context: Any) -> admin_pb2.GetUsageReportResponse:
        await self._admin(context)
        v = Violations()
        v.check(request.HasField("start_time"), "start_time", "required")
        v.check(request.HasField("end_time"), "end_time", "required")
        start, end = _when(v, request, "start_time"), _when(v, request, "end_time")
        v.check(all(g in _GROUP for g in request.group_by), "group_by", "unknown dimension")
        v.check(len(request.group_by) <= len(_GROUP), "group_by", f"at most {len(_GROUP)} dimensions")
        if start is not None and end is not None:
            v.check(end > start, "end_time", "must be after start_time")
        v.raise_if_any()
        assert start is not None and end is not None
        rows = await self._control.usage_report(start, end, [_GROUP[g] for g in request.group_by])
        return admin_pb2.GetUsageReportResponse(rows=[admin_pb2.UsageReportRow(
            group_values=list(r.group_values), requests=r.requests, input_tokens=r.input_tokens,
            output_tokens=r.output_tokens, cached_input_tokens=r.cached_input_tokens, cost_nano_usd=r.cost_nano_usd,
            saved_nano_usd=r.saved_nano_usd, cache_hits=r.cache_hits, errors=r.errors, cancelled=r.cancelled)
            for r in rows])

    async def ListAuditEvents(self, request: admin_pb2.ListAuditEventsRequest,
                              context: Any) -> admin_pb2.ListAuditEventsResponse:
        await self._admin(context)
        v = Violations()
        check_name(v, request.target, "target", max_chars=lim.MAX_AUDIT_TARGET_CHARS)
        check_name(v, request.action, "action", max_chars=lim.MAX_AUDIT_ACTION_CHARS)
        v.raise_if_any()
        events = await self._control.audit_events(min(request.limit or 100, lim.MAX_AUDIT_EVENTS),
                                                  target=request.target,
                                                  action=request.action)
        return admin_pb2.ListAuditEventsResponse(events=[admin_pb2.AuditEvent(
            id=e.id, actor_key_id=e.actor_key_id, action=e.action, target=e.target, before_json=e.before_json,
            after_json=e.after_json, time=_ts(e.at)) for e in events])

    async def ListOrgs(self, request: admin_pb2.ListOrgsRequest, context: Any) -> admin_pb2.ListOrgsResponse:
        await self._admin(context)
        return admin_pb2.ListOrgsResponse(orgs=[admin_pb2.OrgInfo(org_id=o.org_id, name=o.name,
                                                                  created_at=_ts(o.created_at))
                                                for o in await self._control.list_orgs()])

    async def ListTeams(self, request: admin_pb2.ListTeamsRequest, context: Any) -> admin_pb2.ListTeamsResponse:
        await self._admin(context)
        v = Violations()
        _check_id(v, request.org_id, "org_id")
        v.raise_if_any()
        return admin_pb2.ListTeamsResponse(teams=[admin_pb2.TeamInfo(
            team_id=t.team_id, org_id=t.org_id, name=t.name, created_at=_ts(t.created_at))
            for t in await self._control.list_teams(request.org_id)])

    async def ListLimits(self, request: admin_pb2.ListLimitsRequest, context: Any) -> admin_pb2.ListLimitsResponse:
        await self._admin(context)
        v = Violations()
        v.check(request.scope == common_pb2.LIMIT_SCOPE_UNSPECIFIED or request.scope in _SCOPE, "scope",
                "unknown scope")
        _check_id(v, request.scope_id, "scope_id")
        v.raise_if_any()
        limits, budgets = await self._control.list_limits(_SCOPE.get(request.scope, ""), request.scope_id)
        return admin_pb2.ListLimitsResponse(
            limits=[admin_pb2.ScopeLimits(scope=_SCOPE_PROTO[x.scope], scope_id=x.scope_id,
                                          requests_per_minute=x.requests_per_minute,
                                          tokens_per_minute=x.tokens_per_minute, tokens_per_day=x.tokens_per_day,
                                          updated_at=_ts(x.updated_at)) for x in limits],
            budgets=[admin_pb2.ScopeBudget(scope=_SCOPE_PROTO[b.scope], scope_id=b.scope_id,
                                           daily_nano_usd=b.daily_nano_usd, monthly_nano_usd=b.monthly_nano_usd,
                                           updated_at=_ts(b.updated_at)) for b in budgets])

    async def ListPrices(self, request: admin_pb2.ListPricesRequest, context: Any) -> admin_pb2.ListPricesResponse:
        await self._admin(context)
        v = Violations()
        _check_model_name(v, request.model, "model")
        v.raise_if_any()
        return admin_pb2.ListPricesResponse(prices=[admin_pb2.PriceVersion(
            price_version=p.price_version, model=p.model, input_nano_usd_per_mtok=p.input_per_mtok,
            output_nano_usd_per_mtok=p.output_per_mtok, cached_input_nano_usd_per_mtok=p.cached_input_per_mtok,
            effective_from=_ts(p.effective_from), created_at=_ts(p.created_at))
            for p in await self._control.list_prices(request.model)])

    async def CreateExperiment(self, request: admin_pb2.CreateExperimentRequest,
                               context: Any) -> admin_pb2.CreateExperimentResponse:
        actor = await self._admin(context)
        # Validated by the domain (experiments.validate): names, models, weights, all violations at once.
        created = await _experiment_store(self._experiments).create(
            actor, request.name, request.model, [Variant(v.name, v.model, v.weight) for v in request.variants])
        if self._experiment_book is not None:  # this router at once; the others within their refresh period
            await self._experiment_book.load()
        return admin_pb2.CreateExperimentResponse(experiment=experiment_to_proto(created))

    async def EndExperiment(self, request: admin_pb2.EndExperimentRequest,
                            context: Any) -> admin_pb2.EndExperimentResponse:
        actor = await self._admin(context)
        v = Violations()
        check_name(v, request.name, "name", max_chars=lim.MAX_EXPERIMENT_NAME_CHARS, required=True)
        v.raise_if_any()
        ended = await _experiment_store(self._experiments).end(actor, request.name)
        if self._experiment_book is not None:
            await self._experiment_book.load()
        return admin_pb2.EndExperimentResponse(experiment=experiment_to_proto(ended))

    async def ListExperiments(self, request: admin_pb2.ListExperimentsRequest,
                              context: Any) -> admin_pb2.ListExperimentsResponse:
        await self._admin(context)
        experiments = await _experiment_store(self._experiments).list_experiments(
            active_only=request.active_only)
        return admin_pb2.ListExperimentsResponse(experiments=[experiment_to_proto(e) for e in experiments])

    async def GetExperimentReport(self, request: admin_pb2.GetExperimentReportRequest,
                                  context: Any) -> admin_pb2.GetExperimentReportResponse:
        await self._admin(context)
        v = Violations()
        check_name(v, request.name, "name", max_chars=lim.MAX_EXPERIMENT_NAME_CHARS, required=True)
        v.check(request.alpha == 0 or 0 < request.alpha < 1, "alpha", "must be between 0 and 1 (0: 0.05)")
        v.raise_if_any()
        report = await _experiment_store(self._experiments).report(request.name, request.alpha or DEFAULT_ALPHA)
        return admin_pb2.GetExperimentReportResponse(
            experiment=experiment_to_proto(report.experiment), alpha=report.alpha,
            corrected_alpha=report.corrected_alpha,
            variants=[admin_pb2.ExperimentVariantMetrics(
                variant=m.variant.name, model=m.variant.model, requests=m.stats.requests,
                ok_requests=m.stats.ok_requests, latency_p50_ms=m.stats.latency_p50_ms,
                latency_mean_ms=m.stats.latency_mean_ms, cost_mean_nano_usd=m.stats.cost_mean_nano_usd,
                errors=m.stats.errors, error_rate=m.stats.error_rate, feedback_up=m.stats.feedback_up,
                feedback_down=m.stats.feedback_down, feedback_up_rate=m.stats.feedback_up_rate)
                for m in report.variants],
            comparisons=[admin_pb2.ExperimentComparison(
                variant=c.variant, metric=_METRIC[c.metric], test=c.test, control_value=c.control_value,
                variant_value=c.variant_value, statistic=c.statistic, p_value=c.p_value, significant=c.significant)
                for c in report.comparisons])
