"""The fault suite's and the soak's judgements on made-up runs: each check fails when it should (fast; no mesh)."""

from __future__ import annotations

from tests.faults.harness import Fault, RowResult, Sample, verdict, verdict_single_replica
from tests.faults.soak import Series, judge

HANG = Fault("SIGSTOP cache", "hang", "cache")


def _row(samples: list[Sample], *, missing: list[str] | None = None, fault_end: float = 6.0) -> RowResult:
    return RowResult(HANG, samples, fault_start=2.0, fault_end=fault_end, recover_s=5.0,
                     ledger_missing=missing or [], ledger_rows=0, limit=10, restarts=[])


def _steady(n: int = 400, latency: float = 0.02, outcome: str = "200") -> list[Sample]:
    # 40 requests/s over 10 s, spanning before, during and after the fault.
    return [Sample(i / 40, i / 40 + latency, outcome, f"r{i}", "http") for i in range(n + 200)]


def test_a_clean_row_passes() -> None:
    assert verdict(_row(_steady()), baseline_p99_s=0.03) == []


def test_each_check_fails_on_its_own() -> None:
    failed = _steady()
    failed[100] = Sample(2.5, 2.6, "503", "x", "http")
    assert any("served" in p for p in verdict(_row(failed), 0.03))
    slow = _steady()
    for i in range(80, 120):  # sent during the fault, 1.5 s each
        slow[i] = Sample(slow[i].start, slow[i].start + 1.5, "200", slow[i].request_id, "http")
    assert any("p99 while faulted" in p for p in verdict(_row(slow), 0.03))
    assert any("ledger" in p for p in verdict(_row(_steady(), missing=["r1"]), 0.03))
    limited = _steady() + [Sample(i, i + 0.01, "200", f"l{i}", "http", limited_key=True) for i in range(14)]
    assert any("limited key" in p for p in verdict(_row(limited), 0.03))
    late = [Sample(s.start, s.start + (0.6 if s.start > 11 else 0.02), "200", s.request_id, "http")
            for s in _steady()]
    assert any("after the fault ended" in p for p in verdict(_row(late), 0.03))


def test_limited_key_bound_is_the_token_bucket_over_the_span() -> None:
    # 10/min over 30 s: 10 + 5 allowed.
    within = _steady() + [Sample(i * 2.0, i * 2.0 + 0.01, "200", f"l{i}", "http", limited_key=True) for i in range(16)]
    row = _row(within)
    assert row.limited_bound == 15 and row.limited_served == 16
    assert any("limited key" in p for p in verdict(row, 0.03))


def test_single_replica_refusals_must_be_clean_and_quick() -> None:
    ok = _steady()
    ok[100] = Sample(2.5, 2.6, "503", "x", "http", retry_after=True)
    ok[101] = Sample(2.5, 2.6, "UNAVAILABLE", "y", "grpc")
    assert verdict_single_replica(_row(ok)) == []
    no_header = _steady()
    no_header[100] = Sample(2.5, 2.6, "503", "x", "http")
    assert verdict_single_replica(_row(no_header))
    hung = _steady()
    hung[100] = Sample(2.5, 32.5, "timeout", "", "http")
    assert len(verdict_single_replica(_row(hung))) == 2  # not clean, and slow


def test_soak_flatness() -> None:
    flat = Series("router", [(t * 10.0, 100 * 2**20 + (t % 3) * 2**20, 40 + t % 2, 9) for t in range(60)])
    assert judge(flat, warmup_s=100) == []
    growing = Series("cache", [(t * 10.0, (100 + t) * 2**20, 40, 9) for t in range(60)])
    assert any("RSS grew" in p for p in judge(growing, warmup_s=100))
    leaking_fds = Series("edge", [(t * 10.0, 100 * 2**20, 40 + t, 9) for t in range(60)])
    assert any("open fds" in p for p in judge(leaking_fds, warmup_s=100))
    threads = Series("edge", [(t * 10.0, 100 * 2**20, 40, 9 + t // 10) for t in range(60)])
    assert any("threads" in p for p in judge(threads, warmup_s=100))
