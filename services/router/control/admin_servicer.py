"""AdminService: protobuf <-> domain translation only (the control plane's admin RPCs)."""

from __future__ import annotations

from typing import Any

import grpc
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc

from libs.errors import Violations
from libs.validation import check_name
from services.router import limits as lim
from services.router import rpc
from services.router import vocabulary as vocab
from services.router.control.dead_letter_rpc import DeadLetterAdmin
from services.router.control.experiment_stats import DEFAULT_ALPHA
from services.router.control.experiments import (
    Experiment,
    ExperimentBook,
    ExperimentStore,
    Variant,
    enabled_experiments,
)
from services.router.control.keys import HASH_ALGORITHM, HASH_RATIONALE, KeyAuthenticator, require_admin
from services.router.control.plane import ControlPlane
from services.router.control.registry import AUTO_MODEL, Registry


def experiment_to_proto(e: Experiment) -> admin_pb2.ExperimentInfo:
    return admin_pb2.ExperimentInfo(
        name=e.name, model=e.model, active=e.active, created_at=rpc.to_timestamp(e.created_at), created_by=e.created_by,
        ended_at=rpc.to_timestamp(e.ended_at) if e.ended_at else None,
        variants=[admin_pb2.ExperimentVariant(name=v.name, model=v.model, weight=v.weight) for v in e.variants])


def _check_id(v: Violations, value: str, field_path: str, *, required: bool = False) -> None:
    check_name(v, value, field_path, max_chars=lim.MAX_ID_CHARS, required=required)


def _check_model_name(v: Violations, value: str, field_path: str, *, required: bool = False) -> None:
    check_name(v, value, field_path, max_chars=lim.MAX_MODEL_NAME_CHARS, required=required)


def _check_scope(v: Violations, scope: int, scope_id: str) -> None:
    v.check(scope in vocab.LIMIT_SCOPE, "scope", "must be a LimitScope value other than LIMIT_SCOPE_UNSPECIFIED")
    _check_id(v, scope_id, "scope_id")


class AdminServicer(DeadLetterAdmin, admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, control: ControlPlane, auth: KeyAuthenticator, registry: Registry, *,
                 experiments: ExperimentStore | None = None, experiment_book: ExperimentBook | None = None,
                 trusted_proxies: frozenset[str] = frozenset()):
        self._experiments, self._experiment_book = experiments, experiment_book
        self._control = control
        self._auth = auth
        self._registry = registry
        self._trusted_proxies = trusted_proxies

    async def _admin(self, context: grpc.aio.ServicerContext) -> str:
        key = await self._auth.authenticate(rpc.authorization(context), rpc.client_ip(context, self._trusted_proxies))
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
        v.check(request.role in vocab.KEY_ROLE, "role", "must be KEY_ROLE_MEMBER or KEY_ROLE_ADMIN")
        v.check(request.tier in vocab.KEY_TIER, "tier", "must be a KeyTier value")
        if len(request.allowed_models) > lim.MAX_ALLOWED_MODELS:
            v.add("allowed_models", f"at most {lim.MAX_ALLOWED_MODELS} models")
        else:
            for i, name in enumerate(request.allowed_models):
                _check_model_name(v, name, f"allowed_models[{i}]", required=True)
        expires_at = rpc.timestamp_field(v, request, "expires_at")
        v.raise_if_any()
        created = await self._control.create_key(
            actor, org_id=request.org_id, team_id=request.team_id, name=request.name, role=vocab.KEY_ROLE[request.role],
            allowed_models=list(request.allowed_models), tier=vocab.KEY_TIER[request.tier], expires_at=expires_at)
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
            name=k.name, role=vocab.KEY_ROLE_PROTO[k.record.role], allowed_models=list(k.record.allowed_models),
            display_prefix=k.display_prefix, revoked=k.record.revoked, created_at=rpc.to_timestamp(k.created_at),
            expires_at=rpc.to_timestamp(k.record.expires_at) if k.record.expires_at else None,
            revoked_at=rpc.to_timestamp(k.revoked_at) if k.revoked_at else None,
            tier=vocab.KEY_TIER_PROTO[k.record.tier])
            for k in keys])

    async def SetLimits(self, request: admin_pb2.SetLimitsRequest, context: Any) -> admin_pb2.SetLimitsResponse:
        actor = await self._admin(context)
        v = Violations()
        _check_scope(v, request.scope, request.scope_id)
        for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day"):
            v.check(getattr(request, name) <= lim.MAX_LIMIT_VALUE, name, f"at most {lim.MAX_LIMIT_VALUE}")
        v.raise_if_any()
        await self._control.set_limits(actor, vocab.LIMIT_SCOPE[request.scope], request.scope_id,
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
        await self._control.set_budget(actor, vocab.LIMIT_SCOPE[request.scope], request.scope_id,
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
        v.check(m.cost_tier in vocab.COST_TIER, "model.cost_tier", "must be COST_TIER_CHEAP or COST_TIER_STRONG")
        v.raise_if_any()
        await self._control.register_model(actor, name=m.name, provider=m.provider,
                                           inference_target=m.inference_target, context_window=m.context_window,
                                           cost_tier=vocab.COST_TIER[m.cost_tier])
        await self._registry.load()
        return admin_pb2.RegisterModelResponse()

    async def ListModels(self, request: admin_pb2.ListModelsRequest, context: Any) -> admin_pb2.ListModelsResponse:
        await self._admin(context)
        return admin_pb2.ListModelsResponse(models=[admin_pb2.ModelInfo(
            name=m.name, provider=m.provider, inference_target=m.inference_target, context_window=m.context_window,
            cost_tier=vocab.COST_TIER_PROTO[m.cost_tier]) for m in self._registry.models()])

    async def SetPrice(self, request: admin_pb2.SetPriceRequest, context: Any) -> admin_pb2.SetPriceResponse:
        actor = await self._admin(context)
        v = Violations()
        for name in ("input_nano_usd_per_mtok", "output_nano_usd_per_mtok", "cached_input_nano_usd_per_mtok"):
            v.check(0 <= getattr(request, name) <= lim.MAX_PRICE_NANO_USD_PER_MTOK, name,
                    f"must be between 0 and {lim.MAX_PRICE_NANO_USD_PER_MTOK}")
        _check_model_name(v, request.model, "model", required=True)
        effective_from = rpc.timestamp_field(v, request, "effective_from")
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
        start, end = rpc.timestamp_field(v, request, "start_time"), rpc.timestamp_field(v, request, "end_time")
        v.check(all(g in vocab.USAGE_GROUP for g in request.group_by), "group_by", "unknown dimension")
        v.check(len(request.group_by) <= len(vocab.USAGE_GROUP), "group_by",
                f"at most {len(vocab.USAGE_GROUP)} dimensions")
        if start is not None and end is not None:
            v.check(end > start, "end_time", "must be after start_time")
        v.raise_if_any()
        assert start is not None and end is not None
        rows = await self._control.usage_report(start, end, [vocab.USAGE_GROUP[g] for g in request.group_by])
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
            after_json=e.after_json, time=rpc.to_timestamp(e.at)) for e in events])

    async def ListOrgs(self, request: admin_pb2.ListOrgsRequest, context: Any) -> admin_pb2.ListOrgsResponse:
        await self._admin(context)
        return admin_pb2.ListOrgsResponse(orgs=[admin_pb2.OrgInfo(org_id=o.org_id, name=o.name,
                                                                  created_at=rpc.to_timestamp(o.created_at))
                                                for o in await self._control.list_orgs()])

    async def ListTeams(self, request: admin_pb2.ListTeamsRequest, context: Any) -> admin_pb2.ListTeamsResponse:
        await self._admin(context)
        v = Violations()
        _check_id(v, request.org_id, "org_id")
        v.raise_if_any()
        return admin_pb2.ListTeamsResponse(teams=[admin_pb2.TeamInfo(
            team_id=t.team_id, org_id=t.org_id, name=t.name, created_at=rpc.to_timestamp(t.created_at))
            for t in await self._control.list_teams(request.org_id)])

    async def ListLimits(self, request: admin_pb2.ListLimitsRequest, context: Any) -> admin_pb2.ListLimitsResponse:
        await self._admin(context)
        v = Violations()
        v.check(request.scope == common_pb2.LIMIT_SCOPE_UNSPECIFIED or request.scope in vocab.LIMIT_SCOPE, "scope",
                "unknown scope")
        _check_id(v, request.scope_id, "scope_id")
        v.raise_if_any()
        limits, budgets = await self._control.list_limits(vocab.LIMIT_SCOPE.get(request.scope, ""), request.scope_id)
        return admin_pb2.ListLimitsResponse(
            limits=[admin_pb2.ScopeLimits(scope=vocab.LIMIT_SCOPE_PROTO[x.scope], scope_id=x.scope_id,
                                          requests_per_minute=x.requests_per_minute,
                                          tokens_per_minute=x.tokens_per_minute, tokens_per_day=x.tokens_per_day,
                                          updated_at=rpc.to_timestamp(x.updated_at)) for x in limits],
            budgets=[admin_pb2.ScopeBudget(scope=vocab.LIMIT_SCOPE_PROTO[b.scope], scope_id=b.scope_id,
                                           daily_nano_usd=b.daily_nano_usd, monthly_nano_usd=b.monthly_nano_usd,
                                           updated_at=rpc.to_timestamp(b.updated_at)) for b in budgets])

    async def ListPrices(self, request: admin_pb2.ListPricesRequest, context: Any) -> admin_pb2.ListPricesResponse:
        await self._admin(context)
        v = Violations()
        _check_model_name(v, request.model, "model")
        v.raise_if_any()
        return admin_pb2.ListPricesResponse(prices=[admin_pb2.PriceVersion(
            price_version=p.price_version, model=p.model, input_nano_usd_per_mtok=p.input_per_mtok,
            output_nano_usd_per_mtok=p.output_per_mtok, cached_input_nano_usd_per_mtok=p.cached_input_per_mtok,
            effective_from=rpc.to_timestamp(p.effective_from), created_at=rpc.to_timestamp(p.created_at))
            for p in await self._control.list_prices(request.model)])

    async def CreateExperiment(self, request: admin_pb2.CreateExperimentRequest,
                               context: Any) -> admin_pb2.CreateExperimentResponse:
        actor = await self._admin(context)
        # Validated by the domain (experiments.validate): names, models, weights, all violations at once.
        created = await enabled_experiments(self._experiments).create(
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
        ended = await enabled_experiments(self._experiments).end(actor, request.name)
        if self._experiment_book is not None:
            await self._experiment_book.load()
        return admin_pb2.EndExperimentResponse(experiment=experiment_to_proto(ended))

    async def ListExperiments(self, request: admin_pb2.ListExperimentsRequest,
                              context: Any) -> admin_pb2.ListExperimentsResponse:
        await self._admin(context)
        experiments = await enabled_experiments(self._experiments).list_experiments(
            active_only=request.active_only)
        return admin_pb2.ListExperimentsResponse(experiments=[experiment_to_proto(e) for e in experiments])

    async def GetExperimentReport(self, request: admin_pb2.GetExperimentReportRequest,
                                  context: Any) -> admin_pb2.GetExperimentReportResponse:
        await self._admin(context)
        v = Violations()
        check_name(v, request.name, "name", max_chars=lim.MAX_EXPERIMENT_NAME_CHARS, required=True)
        v.check(request.alpha == 0 or 0 < request.alpha < 1, "alpha", "must be between 0 and 1 (0: 0.05)")
        v.raise_if_any()
        report = await enabled_experiments(self._experiments).report(request.name, request.alpha or DEFAULT_ALPHA)
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
                variant=c.variant, metric=vocab.EXPERIMENT_METRIC_PROTO[c.metric], test=c.test,
                control_value=c.control_value,
                variant_value=c.variant_value, statistic=c.statistic, p_value=c.p_value, significant=c.significant)
                for c in report.comparisons])
