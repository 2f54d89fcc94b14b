"""services/router/vocabulary.py: every proto<->domain map covers its enum, inverses agree, and no other map exists."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, router_pb2

from services.router import vocabulary as vocab
from services.router.control.experiment_stats import METRICS
from services.router.control.experiments import DOWN, UP
from services.router.ledger.dead_letters import ReplayOutcome
from services.router.pipeline import degradation
from services.router.pipeline.complexity import CHEAP, STRONG
from services.router.pipeline.degradation import Level
from services.router.pipeline.shedding import TIER_RANK

ROUTER = Path(vocab.__file__).parent


@dataclass(frozen=True)
class ProtoMap:
    name: str
    enum: EnumTypeWrapper
    to_proto: bool  # domain -> proto (else proto -> domain)
    # Which proto values the map must hold: "all but unspecified", "all" (UNSPECIFIED deliberately has a
    # meaning: the field's default), or an explicit set (the map is deliberately partial).
    covers: str | frozenset[int] = "all but unspecified"


def _unspecified(enum: EnumTypeWrapper) -> int:
    [value] = [v for name, v in enum.items() if name.endswith("_UNSPECIFIED")]
    return value


MAPS = [
    ProtoMap("CACHE_TIER_PROTO", common_pb2.CacheTier, to_proto=True),
    # The cache answers a lookup with a hit's tier; anything else (MISS, UNSPECIFIED) is no hit.
    ProtoMap("CACHE_TIER_FROM_PROTO", common_pb2.CacheTier, to_proto=False,
             covers=frozenset({common_pb2.CACHE_TIER_EXACT, common_pb2.CACHE_TIER_SEMANTIC})),
    ProtoMap("DEGRADED_REASON_PROTO", router_pb2.DegradedReason, to_proto=True),
    ProtoMap("DEGRADATION_LEVEL_PROTO", router_pb2.DegradationLevel, to_proto=True),
    ProtoMap("PRIORITY", router_pb2.Priority, to_proto=False, covers="all"),  # unset: normal
    ProtoMap("LIMIT_SCOPE", common_pb2.LimitScope, to_proto=False),
    ProtoMap("LIMIT_SCOPE_PROTO", common_pb2.LimitScope, to_proto=True),
    ProtoMap("KEY_ROLE", admin_pb2.KeyRole, to_proto=False),
    ProtoMap("KEY_ROLE_PROTO", admin_pb2.KeyRole, to_proto=True),
    ProtoMap("KEY_TIER", admin_pb2.KeyTier, to_proto=False, covers="all"),  # unset: pro
    ProtoMap("KEY_TIER_PROTO", admin_pb2.KeyTier, to_proto=True),
    ProtoMap("COST_TIER", admin_pb2.CostTier, to_proto=False),
    ProtoMap("COST_TIER_PROTO", admin_pb2.CostTier, to_proto=True),
    ProtoMap("USAGE_GROUP", admin_pb2.UsageGroupBy, to_proto=False),
    ProtoMap("FEEDBACK_SCORE", router_pb2.FeedbackScore, to_proto=False),
    ProtoMap("EXPERIMENT_METRIC_PROTO", admin_pb2.ExperimentMetric, to_proto=True),
    ProtoMap("REPLAY_OUTCOME_PROTO", admin_pb2.DeadLetterReplayOutcome, to_proto=True),
]


def _table(name: str) -> dict[Any, Any]:
    table = getattr(vocab, name)
    assert isinstance(table, dict)
    return table


def test_every_map_in_the_module_is_checked_here() -> None:
    defined = {name for name, value in vars(vocab).items() if isinstance(value, dict) and name.isupper()}
    assert defined == {m.name for m in MAPS}


@pytest.mark.parametrize("spec", MAPS, ids=lambda m: m.name)
def test_each_map_covers_its_enum(spec: ProtoMap) -> None:
    table = _table(spec.name)
    proto_values = list(table.values() if spec.to_proto else table.keys())
    every = set(spec.enum.values())
    if spec.covers == "all":
        expected = every
    elif spec.covers == "all but unspecified":
        expected = every - {_unspecified(spec.enum)}
    else:
        assert isinstance(spec.covers, frozenset)
        expected = set(spec.covers)
    assert set(proto_values) == expected, {spec.enum.Name(v) for v in expected ^ set(proto_values)}
    if spec.to_proto:
        assert len(proto_values) == len(set(proto_values)), "two domain values map to one proto value"
        assert _unspecified(spec.enum) not in proto_values


@pytest.mark.parametrize(("forward", "inverse", "enum"), [
    ("LIMIT_SCOPE", "LIMIT_SCOPE_PROTO", common_pb2.LimitScope),
    ("KEY_ROLE", "KEY_ROLE_PROTO", admin_pb2.KeyRole),
    ("COST_TIER", "COST_TIER_PROTO", admin_pb2.CostTier),
    ("KEY_TIER", "KEY_TIER_PROTO", admin_pb2.KeyTier),
])
def test_inverse_maps_round_trip(forward: str, inverse: str, enum: EnumTypeWrapper) -> None:
    from_proto, to_proto = _table(forward), _table(inverse)
    assert set(to_proto) == set(from_proto.values())
    for domain, proto in to_proto.items():
        assert from_proto[proto] == domain
    for proto, domain in from_proto.items():
        if proto != _unspecified(enum):  # UNSPECIFIED reads as a default; it is never written back
            assert to_proto[domain] == proto


def test_cache_tier_maps_agree() -> None:
    for proto, tier in vocab.CACHE_TIER_FROM_PROTO.items():
        assert vocab.CACHE_TIER_PROTO[tier] == proto


# --- the domain side: each map speaks the words the domain code uses ------------------------------

def test_domain_vocabularies_match_the_code_that_uses_them() -> None:
    assert set(vocab.CACHE_TIER_PROTO) == {"miss", "exact", "semantic"}
    assert set(vocab.DEGRADATION_LEVEL_PROTO) == {level.name.lower() for level in Level}
    assert set(vocab.PRIORITY.values()) == {"low", "normal", "high"}
    assert vocab.PRIORITY[router_pb2.PRIORITY_UNSPECIFIED] == "normal"
    assert set(vocab.KEY_TIER_PROTO) == set(TIER_RANK)
    assert vocab.KEY_TIER[admin_pb2.KEY_TIER_UNSPECIFIED] == "pro"
    assert set(vocab.KEY_ROLE.values()) == {"admin", "member"}
    assert set(vocab.COST_TIER.values()) == {CHEAP, STRONG}
    assert set(vocab.LIMIT_SCOPE.values()) == {"global", "org", "team", "key", "client_ip"}
    assert set(vocab.FEEDBACK_SCORE.values()) == {UP, DOWN}
    assert set(vocab.EXPERIMENT_METRIC_PROTO) == {metric for metric, _ in METRICS}
    assert set(vocab.REPLAY_OUTCOME_PROTO) == set(ReplayOutcome)


def _degrade_reasons() -> set[str]:
    """The literal reasons the pipeline passes to ``RequestState.degrade``."""
    reasons: set[str] = set()
    for path in (ROUTER / "pipeline").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "degrade"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                reasons.add(node.args[0].value)
    return reasons


def test_every_degraded_reason_the_pipeline_gives_has_a_proto_value() -> None:
    # The servicer drops a reason it cannot map, so an unmapped one would silently vanish from the response.
    reasons = _degrade_reasons()
    assert {"budget", "stale_cache", "no_backend", "retrieval_unavailable", "ratelimit_unavailable"} <= reasons
    assert reasons | {degradation.BACKEND_ERRORS, degradation.LOAD} == set(vocab.DEGRADED_REASON_PROTO)


# --- nothing else writes such a map -------------------------------------------------------------

def _is_pb2_constant(node: ast.expr | None) -> bool:
    """``x_pb2.NAME`` or ``x_pb2.Message.NAME``: an enum constant of a generated module."""
    if not isinstance(node, ast.Attribute):
        return False
    base: ast.expr = node
    while isinstance(base, ast.Attribute):
        base = base.value
    return isinstance(base, ast.Name) and base.id.endswith("_pb2")


def _proto_maps(path: Path) -> list[int]:
    """Line numbers of dict displays in ``path`` with a generated enum constant as a key or a value."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Dict) and any(_is_pb2_constant(n) for n in [*node.keys, *node.values])]


def test_the_scan_finds_the_vocabularys_own_maps() -> None:
    assert len(_proto_maps(Path(vocab.__file__))) >= 10  # the check below can see a map when there is one


def test_no_other_router_module_writes_a_proto_enum_map() -> None:
    found = {str(path.relative_to(ROUTER)): lines for path in sorted(ROUTER.rglob("*.py"))
             if path != Path(vocab.__file__) and (lines := _proto_maps(path))}
    assert found == {}
