"""The admin CLI's parsing and its enum labels, derived from the generated descriptors (no hand-written maps)."""

from __future__ import annotations

import argparse

import pytest
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2
from tollgate.router.v1 import admin_pb2

from ops import enums
from ops.admin_cli import _metric_name, _outcome_name, parse_variant
from ops.demo import _tier


def test_cli_variant_syntax() -> None:
    v = parse_variant("treatment=m-large:3")
    assert (v.name, v.model, v.weight) == ("treatment", "m-large", 3.0)
    v = parse_variant("control=llama3:8b")  # not a weight: part of the model name
    assert (v.name, v.model, v.weight) == ("control", "llama3:8b", 1.0)
    v = parse_variant("x=ollama:llama3:0.5")
    assert (v.name, v.model, v.weight) == ("x", "ollama:llama3", 0.5)

    with pytest.raises(argparse.ArgumentTypeError):
        parse_variant("no-equals-sign")


def test_labels_are_the_enum_names_without_their_prefix() -> None:
    assert enums.label(admin_pb2.KeyRole, admin_pb2.KEY_ROLE_ADMIN) == "admin"
    assert enums.label(common_pb2.LimitScope, common_pb2.LIMIT_SCOPE_CLIENT_IP) == "client_ip"
    assert enums.label(ratelimit_pb2.LimitKind, ratelimit_pb2.LIMIT_KIND_BUDGET_DAILY_NANO_USD) == \
        "budget_daily_nano_usd"
    assert enums.label(admin_pb2.KeyRole, 99) == "?"
    assert enums.labels(admin_pb2.KeyTier) == ["free", "pro", "enterprise"]  # declaration order, no UNSPECIFIED


@pytest.mark.parametrize("enum", [admin_pb2.KeyRole, admin_pb2.KeyTier, admin_pb2.UsageGroupBy, admin_pb2.CostTier,
                                  admin_pb2.ExperimentMetric, admin_pb2.DeadLetterReplayOutcome,
                                  common_pb2.LimitScope, common_pb2.CacheTier, ratelimit_pb2.LimitKind])
def test_every_value_round_trips(enum: object) -> None:
    for name, number in enum.items():  # type: ignore[attr-defined]
        text = enums.label(enum, number)  # type: ignore[arg-type]
        assert text != "?" and not text.startswith(name.split("_")[0].lower() + "_"), name
        assert enums.value(enum, text) == number  # type: ignore[arg-type]


def test_group_by_names_the_cli_sends() -> None:
    assert [enums.value(admin_pb2.UsageGroupBy, g) for g in ("org", "team", "key", "model", "day")] == [
        admin_pb2.USAGE_GROUP_BY_ORG, admin_pb2.USAGE_GROUP_BY_TEAM, admin_pb2.USAGE_GROUP_BY_KEY,
        admin_pb2.USAGE_GROUP_BY_MODEL, admin_pb2.USAGE_GROUP_BY_DAY]


def test_display_names() -> None:
    assert [_outcome_name(o) for o in (admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_INSERTED,
                                       admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_ALREADY_IN_LEDGER,
                                       admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_REFUSED,
                                       admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_NOT_FOUND)] == [
        "inserted", "already in ledger", "REFUSED", "NOT FOUND"]
    assert [_metric_name(m) for m in (admin_pb2.EXPERIMENT_METRIC_LATENCY, admin_pb2.EXPERIMENT_METRIC_COST,
                                      admin_pb2.EXPERIMENT_METRIC_ERROR_RATE)] == [
        "latency ms", "cost nano-USD", "error rate"]
    assert [_tier(t) for t in (common_pb2.CACHE_TIER_MISS, common_pb2.CACHE_TIER_EXACT,
                               common_pb2.CACHE_TIER_SEMANTIC, common_pb2.CACHE_TIER_UNSPECIFIED)] == [
        "miss", "exact hit", "semantic hit", "?"]


def test_ops_imports_no_service() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    code = ("import sys, ops.cli, ops.admin_cli, ops.demo, ops.launcher, ops.report, ops.reconcile, ops.enums; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('services', 'tests')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": f"{root}:{root / 'gen'}", "PATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
