"""The router's one map between proto enums and domain strings (nothing else in the router writes one).

Domain code speaks plain strings ("exact", "admin", "team", …); the servicers translate at the edge with
these tables. Enums every service shares (role, finish reason) are mapped once in ``libs/chat.py``.
"""

from __future__ import annotations

from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, router_pb2

from services.router.control.experiments import DOWN, UP
from services.router.ledger.dead_letters import ReplayOutcome

CACHE_TIER_PROTO = {"miss": common_pb2.CACHE_TIER_MISS, "exact": common_pb2.CACHE_TIER_EXACT,
         "semantic": common_pb2.CACHE_TIER_SEMANTIC}
DEGRADED_REASON_PROTO = {
    "no_backend": router_pb2.DEGRADED_REASON_NO_BACKEND,
    "stale_cache": router_pb2.DEGRADED_REASON_STALE_CACHE,
    "backend_errors": router_pb2.DEGRADED_REASON_BACKEND_ERRORS,
    "budget": router_pb2.DEGRADED_REASON_BUDGET,
    "load": router_pb2.DEGRADED_REASON_LOAD,
    "retrieval_unavailable": router_pb2.DEGRADED_REASON_RETRIEVAL_UNAVAILABLE,
    "ratelimit_unavailable": router_pb2.DEGRADED_REASON_RATELIMIT_UNAVAILABLE,
}
DEGRADATION_LEVEL_PROTO = {"full": router_pb2.DEGRADATION_LEVEL_FULL, "reduced": router_pb2.DEGRADATION_LEVEL_REDUCED,
          "cache_only": router_pb2.DEGRADATION_LEVEL_CACHE_ONLY}
PRIORITY = {router_pb2.PRIORITY_UNSPECIFIED: "normal", router_pb2.PRIORITY_LOW: "low",
             router_pb2.PRIORITY_NORMAL: "normal", router_pb2.PRIORITY_HIGH: "high"}
LIMIT_SCOPE = {common_pb2.LIMIT_SCOPE_GLOBAL: "global", common_pb2.LIMIT_SCOPE_ORG: "org",
          common_pb2.LIMIT_SCOPE_TEAM: "team", common_pb2.LIMIT_SCOPE_KEY: "key",
          common_pb2.LIMIT_SCOPE_CLIENT_IP: "client_ip"}
LIMIT_SCOPE_PROTO = {v: k for k, v in LIMIT_SCOPE.items()}
KEY_ROLE = {admin_pb2.KEY_ROLE_ADMIN: "admin", admin_pb2.KEY_ROLE_MEMBER: "member"}
KEY_ROLE_PROTO = {v: k for k, v in KEY_ROLE.items()}
KEY_TIER = {admin_pb2.KEY_TIER_UNSPECIFIED: "pro", admin_pb2.KEY_TIER_FREE: "free", admin_pb2.KEY_TIER_PRO: "pro",
             admin_pb2.KEY_TIER_ENTERPRISE: "enterprise"}
KEY_TIER_PROTO = {"free": admin_pb2.KEY_TIER_FREE, "pro": admin_pb2.KEY_TIER_PRO,
                   "enterprise": admin_pb2.KEY_TIER_ENTERPRISE}
COST_TIER = {admin_pb2.COST_TIER_CHEAP: "cheap", admin_pb2.COST_TIER_STRONG: "strong"}
COST_TIER_PROTO = {v: k for k, v in COST_TIER.items()}
USAGE_GROUP = {admin_pb2.USAGE_GROUP_BY_ORG: "org", admin_pb2.USAGE_GROUP_BY_TEAM: "team",
          admin_pb2.USAGE_GROUP_BY_KEY: "key", admin_pb2.USAGE_GROUP_BY_MODEL: "model",
          admin_pb2.USAGE_GROUP_BY_DAY: "day"}

FEEDBACK_SCORE = {router_pb2.FEEDBACK_SCORE_UP: UP, router_pb2.FEEDBACK_SCORE_DOWN: DOWN}
EXPERIMENT_METRIC_PROTO = {"latency_ms": admin_pb2.EXPERIMENT_METRIC_LATENCY,
                           "cost_nano_usd": admin_pb2.EXPERIMENT_METRIC_COST,
           "error_rate": admin_pb2.EXPERIMENT_METRIC_ERROR_RATE,
           "feedback_up_rate": admin_pb2.EXPERIMENT_METRIC_FEEDBACK_UP_RATE}
CACHE_TIER_FROM_PROTO = {common_pb2.CACHE_TIER_EXACT: "exact", common_pb2.CACHE_TIER_SEMANTIC: "semantic"}
REPLAY_OUTCOME_PROTO = {
    ReplayOutcome.INSERTED: admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_INSERTED,
    ReplayOutcome.ALREADY_IN_LEDGER: admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_ALREADY_IN_LEDGER,
    ReplayOutcome.REFUSED: admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_REFUSED,
    ReplayOutcome.NOT_FOUND: admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_NOT_FOUND,
}
