"""The fault suite, shortened (``harness.SHORT``: a 4 s hang, load until 7 s after the fault ended): each row
of issue 24's table against a mesh with two inference replicas, and a kill of the only replica on a mesh of
its own. ``make faults`` runs the same rows at full length and records the table."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import (
    FAULTS,
    SHORT,
    SINGLE_REPLICA_FAULT,
    Fault,
    FaultMesh,
    RowResult,
    baseline_p99,
    describe,
    fault_mesh,
    run_row,
    verdict,
    verdict_single_replica,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultMesh]:
    with fault_mesh(tmp_path_factory.mktemp("faults") / "mesh", replicas=2) as fm:
        yield fm


@pytest.fixture(scope="module")
def results() -> dict[str, RowResult]:
    return {}


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_row(fault: Fault, two_replicas: FaultMesh, results: dict[str, RowResult]) -> None:
    row = asyncio.run(run_row(two_replicas, fault, SHORT))
    results[fault.name] = row
    print(describe(row))
    assert row.requests > 100, "the load generator sent too little to judge"
    problems = verdict(row, baseline_p99(list(results.values())))
    if problems and all(_is_timing(p) for p in problems):
        # Latency on a shared 2-core machine is noisy: a row that failed on timing alone runs once more and is
        # judged on that run. Served share, the limit and the ledger are never given a second chance.
        print(f"timing only ({problems}); running the row again")
        row = asyncio.run(run_row(two_replicas, fault, SHORT))
        print(describe(row))
        problems = verdict(row, baseline_p99(list(results.values())))
    assert problems == []


def _is_timing(problem: str) -> bool:
    return problem.startswith("p99")


def test_single_replica_killed_answers_or_refuses_fast(tmp_path: Path) -> None:
    with fault_mesh(tmp_path / "mesh", replicas=1) as fm:
        row = asyncio.run(run_row(fm, SINGLE_REPLICA_FAULT, SHORT))
    print(describe(row))
    assert row.requests > 100
    assert verdict_single_replica(row) == []
