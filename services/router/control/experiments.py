"""A/B experiments: sticky variant assignment, feedback, and a per-variant report with significance tests.

An experiment applies to requests that ask for one model name (``"chat-default"``, ``"auto"``, ...)
and splits them between variants; each variant names the model that serves it and a weight.

- Assignment is stateless and sticky: ``sha256("{experiment}:{user}")`` read as a number in [0, 1)
  picks the variant by cumulative weight, so a user sees the same variant on every router, across
  restarts, without a lookup. Changing the weights of a running experiment would move users, so an
  experiment is immutable: end it and create another.
- The router reads the active experiments from an in-memory ``ExperimentBook`` (refreshed from
  PostgreSQL in the background, like the model registry): choosing a variant is a dictionary lookup.
- Each request served under a variant carries ``variant_label(experiment, variant)``
  (``"<experiment>/<variant>"``) in the usage ledger, so the report reads the ledger directly.
- Feedback (thumbs up/down) is keyed by (request id, org id). A key may rate only its own org's
  requests: a request the ledger holds for another org is NOT_FOUND; a request the ledger does not
  hold yet (the ledger is written asynchronously, seconds behind) is stored under the caller's org and
  counted only if the ledger row turns out to belong to that org. Re-submitting replaces the score
  (idempotent, last one wins).
- The report compares each variant with the control (the first variant) on four metrics: latency and
  cost (Welch's t-test), error rate and feedback up-rate (two-proportion z-test), and decides with a
  Bonferroni correction: a difference is significant when p < alpha / number of comparisons.

No gRPC here; statistics are implemented with ``math`` (no scipy at run time).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg

from libs.chat import Principal
from libs.errors import AlreadyExists, NotFound, Unavailable, Violations
from libs.validation import check_name
from services.router import limits
from services.router.control.experiment_stats import (
    DEFAULT_ALPHA,
    ExperimentReport,
    VariantStats,
    build_report,
    check_alpha,
)
from services.router.control.plane import _audit
from services.router.control.registry import AUTO_MODEL
from services.router.db import acquire
from services.router.tasks import reload_forever

# fullmatch, not match: "$" would also accept a trailing newline.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
VARIANT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
MAX_VARIANTS = limits.MAX_VARIANTS
MAX_MODEL_NAME = limits.MAX_MODEL_NAME_CHARS
MAX_REQUEST_ID = limits.MAX_REQUEST_ID_CHARS

UP, DOWN = 1, -1


# --- the experiment and its assignment ------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    model: str
    weight: float


@dataclass(frozen=True)
class Experiment:
    name: str
    model: str  # the requested model name the experiment applies to
    variants: tuple[Variant, ...]  # the first is the control
    active: bool
    created_at: datetime
    ended_at: datetime | None = None
    created_by: str = ""

    @property
    def control(self) -> Variant:
        return self.variants[0]

    def labels(self) -> list[str]:
        return [variant_label(self, v) for v in self.variants]


def variant_label(experiment: Experiment, variant: Variant) -> str:
    """What the ledger (``UsageEvent.variant``) and the summary (``Summary.variant``) record."""
    return f"{experiment.name}/{variant.name}"


def bucket(experiment_name: str, user_id: str) -> float:
    """A uniform number in [0, 1) from sha256("{experiment}:{user}") (64 bits of it)."""
    digest = hashlib.sha256(f"{experiment_name}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(experiment: Experiment, user_id: str) -> Variant:
    """The user's variant: sticky (same inputs, same variant) and stateless."""
    u = bucket(experiment.name, user_id) * sum(v.weight for v in experiment.variants)
    cumulative = 0.0
    for variant in experiment.variants:
        cumulative += variant.weight
        if u < cumulative:
            return variant
    return experiment.variants[-1]  # u rounded up to the total


def validate(name: str, model: str, variants: Sequence[Variant]) -> None:
    """Field violations of a new experiment (InvalidArgument)."""
    v = Violations()
    v.check(bool(NAME_RE.fullmatch(name)), "name", "1-64 characters: lowercase letters, digits, '_', '.', '-'")
    check_name(v, model, "model", max_chars=MAX_MODEL_NAME, required=True)
    v.check(2 <= len(variants) <= MAX_VARIANTS, "variants", f"between 2 and {MAX_VARIANTS} variants")
    seen: set[str] = set()
    for i, var in enumerate(variants[:MAX_VARIANTS + 1]):
        v.check(bool(VARIANT_NAME_RE.fullmatch(var.name)), f"variants[{i}].name",
                "1-32 characters: lowercase letters, digits, '_', '.', '-'")
        v.check(var.name not in seen, f"variants[{i}].name", "duplicate variant name")
        seen.add(var.name)
        check_name(v, var.model, f"variants[{i}].model", max_chars=MAX_MODEL_NAME, required=True)
        v.check(math.isfinite(var.weight) and var.weight > 0, f"variants[{i}].weight", "must be a positive number")
    v.raise_if_any()


# --- the router's in-memory view ------------------------------------------------------------

class ExperimentSource(Protocol):
    async def active_experiments(self) -> list[Experiment]: ...


class ExperimentBook:
    """Active experiments by requested model name, refreshed in the background (see ``Registry``)."""

    def __init__(self, source: ExperimentSource | None, refresh_s: float):
        self._source = source
        self._refresh_s = refresh_s
        self._by_model: dict[str, Experiment] = {}

    async def load(self) -> None:
        if self._source is None:
            return
        self.replace(await self._source.active_experiments())

    def replace(self, experiments: Sequence[Experiment]) -> None:
        """Swap in a set of experiments (tests, and callers that already hold fresh data)."""
        self._by_model = {e.model: e for e in experiments if e.active}

    async def refresh_forever(self) -> None:
        await reload_forever(self.load, self._refresh_s, "experiment")

    def active(self) -> list[Experiment]:
        return sorted(self._by_model.values(), key=lambda e: e.name)

    def for_request(self, model_name: str, user_id: str) -> tuple[Experiment, Variant] | None:
        """The experiment on ``model_name`` and this user's variant, or None when none runs on it."""
        experiment = self._by_model.get(model_name)
        if experiment is None:
            return None
        return experiment, assign(experiment, user_id)


# --- statistics -----------------------------------------------------------------------------


def _experiment_from_row(r: asyncpg.Record) -> Experiment:
    raw: list[dict[str, Any]] = json.loads(r["variants"])
    return Experiment(name=r["name"], model=r["model"],
                      variants=tuple(Variant(str(v["name"]), str(v["model"]), float(v["weight"])) for v in raw),
                      active=r["active"], created_at=r["created_at"], ended_at=r["ended_at"],
                      created_by=r["created_by"])


def _experiment_json(e: Experiment) -> dict[str, Any]:
    return {"model": e.model, "variants": [v.__dict__ for v in e.variants], "active": e.active,
            "ended_at": e.ended_at}


_COLUMNS = "name, model, variants::text AS variants, active, created_at, ended_at, created_by"

_METRICS_SQL = """
SELECT l.variant,
       count(*) AS requests,
       count(*) FILTER (WHERE l.status = 'ok') AS ok_requests,
       coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY l.latency_ms) FILTER (WHERE l.status = 'ok'), 0)
           AS latency_p50,
       coalesce(avg(l.latency_ms) FILTER (WHERE l.status = 'ok'), 0)::float8 AS latency_mean,
       coalesce(var_samp(l.latency_ms) FILTER (WHERE l.status = 'ok'), 0)::float8 AS latency_var,
       coalesce(avg(l.cost_nano_usd) FILTER (WHERE l.status = 'ok'), 0)::float8 AS cost_mean,
       coalesce(var_samp(l.cost_nano_usd) FILTER (WHERE l.status = 'ok'), 0)::float8 AS cost_var,
       count(*) FILTER (WHERE l.status <> 'ok') AS errors,
       count(f.score) FILTER (WHERE f.score = 1) AS up,
       count(f.score) FILTER (WHERE f.score = -1) AS down
FROM usage_ledger l
LEFT JOIN experiment_feedback f ON f.request_id = l.request_id AND f.org_id = l.org_id
WHERE l.variant = ANY($1::text[])
GROUP BY l.variant
"""


class ExperimentStore:
    """Experiments and feedback in PostgreSQL; also the ``ExperimentBook``'s source."""

    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    async def create(self, actor: str, name: str, model: str, variants: Sequence[Variant]) -> Experiment:
        """Start an experiment. ALREADY_EXISTS for a used name (ended ones included: names label ledger
        rows for good) or when another experiment is active on the same model."""
        validate(name, model, variants)
        wanted = sorted({v.model for v in variants} - {AUTO_MODEL})
        async with acquire(self._pool) as conn, conn.transaction():
            known = {r["name"] for r in await conn.fetch("SELECT name FROM models WHERE name = ANY($1::text[])",
                                                         wanted)}
            v = Violations()
            for i, var in enumerate(variants):
                v.check(var.model == AUTO_MODEL or var.model in known, f"variants[{i}].model",
                        f"model {var.model!r} is not registered")
            v.raise_if_any()
            payload = json.dumps([{"name": x.name, "model": x.model, "weight": x.weight} for x in variants])
            try:
                row = await conn.fetchrow(
                    f"INSERT INTO experiments (name, model, variants, created_by) VALUES ($1, $2, $3::jsonb, $4) "
                    f"RETURNING {_COLUMNS}", name, model, payload, actor)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "experiments_one_active_per_model":
                    raise AlreadyExists(f"an experiment is already active on model {model!r}; end it first",
                                        reason="EXPERIMENT_ACTIVE") from None
                raise AlreadyExists(f"an experiment named {name!r} exists") from None
            experiment = _experiment_from_row(row)
            await _audit(conn, actor, "create_experiment", f"experiment:{name}", None, _experiment_json(experiment))
        return experiment

    async def end(self, actor: str, name: str) -> Experiment:
        """Stop assigning variants (idempotent: ending an ended experiment changes nothing). Its ledger
        rows and feedback stay, so its report can still be read."""
        async with acquire(self._pool) as conn, conn.transaction():
            before = await conn.fetchrow(f"SELECT {_COLUMNS} FROM experiments WHERE name = $1 FOR UPDATE", name)
            if before is None:
                raise NotFound(f"experiment {name!r} not found")
            if not before["active"]:
                return _experiment_from_row(before)
            row = await conn.fetchrow(f"UPDATE experiments SET active = false, ended_at = now() WHERE name = $1 "
                                      f"RETURNING {_COLUMNS}", name)
            experiment = _experiment_from_row(row)
            await _audit(conn, actor, "end_experiment", f"experiment:{name}",
                         _experiment_json(_experiment_from_row(before)), _experiment_json(experiment))
        return experiment

    async def get(self, name: str) -> Experiment:
        async with acquire(self._pool) as conn:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM experiments WHERE name = $1", name)
        if row is None:
            raise NotFound(f"experiment {name!r} not found")
        return _experiment_from_row(row)

    async def list_experiments(self, *, active_only: bool = False) -> list[Experiment]:
        """Newest first."""
        async with acquire(self._pool) as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM experiments WHERE active OR NOT $1 "
                                    "ORDER BY created_at DESC, name", active_only)
        return [_experiment_from_row(r) for r in rows]

    async def active_experiments(self) -> list[Experiment]:
        return await self.list_experiments(active_only=True)

    async def record_feedback(self, principal: Principal, request_id: str, score: int) -> None:
        """Thumbs up (1) or down (-1) for one request of the caller's org; the last submission wins.

        NOT_FOUND when the ledger holds the request for another org (the same answer as for a request
        that does not exist, so a key learns nothing about other tenants)."""
        v = Violations()
        v.check(0 < len(request_id) <= MAX_REQUEST_ID, "request_id", f"required, at most {MAX_REQUEST_ID} characters")
        v.check(score in (UP, DOWN), "score", "must be 1 (up) or -1 (down)")
        v.raise_if_any()
        async with acquire(self._pool) as conn:
            owner = await conn.fetchval("SELECT org_id FROM usage_ledger WHERE request_id = $1", request_id)
            if owner is not None and owner != principal.org_id:
                raise NotFound(f"request {request_id} not found")
            await conn.execute(
                "INSERT INTO experiment_feedback (request_id, org_id, key_id, score) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (request_id, org_id) DO UPDATE SET key_id = EXCLUDED.key_id, score = EXCLUDED.score, "
                "recorded_at = now()", request_id, principal.org_id, principal.key_id, score)

    async def variant_stats(self, experiment: Experiment) -> dict[str, VariantStats]:
        """Per variant name, from the ledger rows labelled with the variant and their feedback."""
        by_label = {variant_label(experiment, v): v.name for v in experiment.variants}
        async with acquire(self._pool) as conn:
            rows = await conn.fetch(_METRICS_SQL, list(by_label))
        return {by_label[r["variant"]]: VariantStats(
            requests=r["requests"], ok_requests=r["ok_requests"], latency_p50_ms=float(r["latency_p50"]),
            latency_mean_ms=r["latency_mean"], latency_var=r["latency_var"], cost_mean_nano_usd=r["cost_mean"],
            cost_var=r["cost_var"], errors=r["errors"], feedback_up=r["up"], feedback_down=r["down"])
            for r in rows}

    async def report(self, name: str, alpha: float = DEFAULT_ALPHA) -> ExperimentReport:
        check_alpha(alpha)
        experiment = await self.get(name)
        return build_report(experiment, await self.variant_stats(experiment), alpha)


def enabled_experiments(store: ExperimentStore | None) -> ExperimentStore:
    """The experiment store, or UNAVAILABLE when this router runs without experiments."""
    if store is None:
        raise Unavailable("A/B experiments are not enabled on this router", reason="EXPERIMENTS_DISABLED")
    return store
