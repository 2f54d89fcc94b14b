"""A/B experiments without a database: sticky assignment, the split, the statistics, Bonferroni."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from datetime import UTC, datetime

import pytest

from libs.errors import InvalidArgument
from services.router.control.experiment_stats import (
    METRICS,
    VariantStats,
    betainc,
    build_report,
    t_two_sided_p,
    two_proportion_z_test,
    welch_t_test,
)
from services.router.control.experiments import (
    Experiment,
    ExperimentBook,
    Variant,
    assign,
    bucket,
    validate,
    variant_label,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _exp(name: str = "exp1", weights: tuple[float, ...] = (50, 50), model: str = "chat-default") -> Experiment:
    variants = tuple(Variant(f"v{i}", f"model-{i}", w) for i, w in enumerate(weights))
    return Experiment(name, model, variants, True, T0)


# --- assignment -----------------------------------------------------------------------------

def test_assignment_is_sticky_and_stateless() -> None:
    e = _exp(weights=(1, 1, 1))
    first = {u: assign(e, u).name for u in (f"user-{i}" for i in range(500))}
    # A fresh, equal experiment object (another router, after a restart) assigns the same way.
    again = _exp(weights=(1, 1, 1))
    assert all(assign(again, u).name == v for u, v in first.items())
    assert set(first.values()) == {"v0", "v1", "v2"}


def test_bucket_is_the_documented_sha256() -> None:
    import hashlib

    digest = hashlib.sha256(b"exp1:alice").digest()
    assert bucket("exp1", "alice") == int.from_bytes(digest[:8], "big") / 2**64
    assert 0.0 <= bucket("exp1", "alice") < 1.0


def test_different_experiments_shuffle_users_independently() -> None:
    a, b = _exp("exp-a"), _exp("exp-b")
    users = [f"u{i}" for i in range(2000)]
    same = sum(assign(a, u).name == assign(b, u).name for u in users)
    # Independent 50/50 splits agree about half the time; identical hashing would agree always.
    assert 850 < same < 1150


@pytest.mark.parametrize("weights", [(50, 50), (90, 10), (1, 2, 7), (0.2, 0.3, 0.5)])
def test_split_over_10k_users_is_within_tolerance(weights: tuple[float, ...]) -> None:
    e = _exp(weights=weights)
    n = 10_000
    counts = Counter(assign(e, f"user-{i}").name for i in range(n))
    total = sum(weights)
    for i, w in enumerate(weights):
        p = w / total
        # 4.5 standard deviations of a binomial: fails by chance about once in 150,000 runs.
        tolerance = 4.5 * math.sqrt(n * p * (1 - p))
        assert abs(counts[f"v{i}"] - n * p) < tolerance, (weights, counts)


def test_weights_are_respected_at_the_boundaries() -> None:
    # Cumulative weights cut [0, 1): the variant is the first whose cumulative share exceeds the bucket.
    e = _exp(weights=(1, 3))
    for i in range(300):
        u = f"user-{i}"
        expected = "v0" if bucket(e.name, u) < 0.25 else "v1"
        assert assign(e, u).name == expected
    tiny = _exp(weights=(1e-9, 1))
    assert Counter(assign(tiny, f"u{i}").name for i in range(1000))["v0"] == 0


def test_book_serves_only_active_experiments_by_requested_model() -> None:
    book = ExperimentBook(None, refresh_s=60)
    live = _exp("live", model="chat-default")
    ended = Experiment("old", "auto", live.variants, False, T0, ended_at=T0)
    book.replace([live, ended])
    assert book.for_request("auto", "alice") is None
    assert book.for_request("other", "alice") is None
    found = book.for_request("chat-default", "alice")
    assert found is not None
    experiment, variant = found
    assert experiment is live and variant == assign(live, "alice")
    assert variant_label(experiment, variant) == f"live/{variant.name}"
    assert [e.name for e in book.active()] == ["live"]


async def test_book_loads_from_its_source() -> None:
    class Source:
        def __init__(self) -> None:
            self.experiments = [_exp("a", model="m1")]

        async def active_experiments(self) -> list[Experiment]:
            return self.experiments

    src = Source()
    book = ExperimentBook(src, refresh_s=60)
    assert book.for_request("m1", "u") is None
    await book.load()
    assert book.for_request("m1", "u") is not None
    src.experiments = []
    await book.load()
    assert book.for_request("m1", "u") is None


def test_validation_names_each_bad_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate("Bad Name", "", [Variant("a", "m", 1), Variant("a", "", 0), Variant("c", "m", math.nan)])
    fields = {v.field for v in err.value.violations}
    assert fields == {"name", "model", "variants[1].name", "variants[1].model", "variants[1].weight",
                      "variants[2].weight"}
    with pytest.raises(InvalidArgument) as err:
        validate("ok", "m", [Variant("only", "m", 1)])
    assert [v.field for v in err.value.violations] == ["variants"]
    validate("ok-1.b_c", "auto", [Variant("control", "m1", 1), Variant("treatment", "m2", 0.5)])


# --- statistics against known values (from scipy.stats, hard-coded so scipy is not required) --

A = [12.1, 13.4, 11.8, 12.9, 14.2, 13.1, 12.5, 13.8]
B = [14.0, 15.2, 13.9, 16.1, 14.8, 15.5, 15.0]


def test_welch_t_test_matches_scipy() -> None:
    r = welch_t_test(statistics.mean(A), statistics.variance(A), len(A),
                     statistics.mean(B), statistics.variance(B), len(B))
    # scipy.stats.ttest_ind(A, B, equal_var=False): t = -4.692154154856346, p = 0.0004318652035059224
    assert r.statistic == pytest.approx(4.692154154856346, rel=1e-12)  # ours is variant minus control
    assert r.p_value == pytest.approx(0.0004318652035059224, rel=1e-9)


@pytest.mark.parametrize(("t", "df", "p"), [
    (2.0, 3, 0.13932596855884305),  # 2 * scipy.stats.t.sf(2.0, 3)
    (1.0, 1, 0.5),
    (3.5, 50.5, 0.00098169890519692),
    (0.3, 1e6, 0.7641772179789942),
    (0.0, 7, 1.0),
])
def test_t_distribution_p_values(t: float, df: float, p: float) -> None:
    assert t_two_sided_p(t, df) == pytest.approx(p, rel=1e-8)
    assert t_two_sided_p(-t, df) == pytest.approx(p, rel=1e-8)


def test_incomplete_beta_known_values() -> None:
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, rel=1e-12)  # 1 - (1-x)^4 - 4x(1-x)^3
    assert betainc(1, 1, 0.3) == pytest.approx(0.3, rel=1e-12)
    assert betainc(5, 5, 0.5) == pytest.approx(0.5, rel=1e-12)


def test_statistics_against_scipy_when_installed() -> None:
    stats = pytest.importorskip("scipy.stats")
    import random

    rng = random.Random(7)
    for _ in range(50):
        n1, n2 = rng.randint(2, 400), rng.randint(2, 400)
        a = [rng.gauss(100, rng.uniform(1, 30)) for _ in range(n1)]
        b = [rng.gauss(100 + rng.uniform(-10, 10), rng.uniform(1, 30)) for _ in range(n2)]
        ours = welch_t_test(statistics.mean(a), statistics.variance(a), n1, statistics.mean(b),
                            statistics.variance(b), n2)
        theirs = stats.ttest_ind(b, a, equal_var=False)
        assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-9)
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-6, abs=1e-300)
        x1, x2 = rng.randint(0, n1), rng.randint(0, n2)
        z = two_proportion_z_test(x1, n1, x2, n2)
        if z.statistic:
            assert z.p_value == pytest.approx(2 * stats.norm.sf(abs(z.statistic)), rel=1e-9)


def test_two_proportion_z_test_known_value() -> None:
    # 45/500 vs 70/500: pooled 0.115, se 0.020176, z = 2.4781, p = 0.013208
    r = two_proportion_z_test(45, 500, 70, 500)
    assert r.statistic == pytest.approx(2.4781035688528417, rel=1e-12)
    assert r.p_value == pytest.approx(0.013208279888430454, rel=1e-9)


def test_degenerate_inputs() -> None:
    assert welch_t_test(1.0, 0.0, 1, 2.0, 1.0, 10).p_value is None  # too few samples
    assert welch_t_test(5.0, 0.0, 10, 5.0, 0.0, 10).p_value == 1.0
    assert welch_t_test(5.0, 0.0, 10, 6.0, 0.0, 10).p_value == 0.0
    assert two_proportion_z_test(0, 0, 3, 10).p_value is None
    assert two_proportion_z_test(0, 10, 0, 20).p_value == 1.0


# --- the report and Bonferroni --------------------------------------------------------------

def _stats(n: int, latency: float, latency_var: float, errors: int = 0, up: int = 0, down: int = 0,
           cost: float = 1000.0, cost_var: float = 100.0) -> VariantStats:
    return VariantStats(requests=n, ok_requests=n - errors, latency_p50_ms=latency, latency_mean_ms=latency,
                        latency_var=latency_var, cost_mean_nano_usd=cost, cost_var=cost_var, errors=errors,
                        feedback_up=up, feedback_down=down)


def test_report_compares_every_variant_with_the_control_on_every_metric() -> None:
    e = _exp(weights=(1, 1, 1))
    report = build_report(e, {"v0": _stats(400, 100, 400), "v1": _stats(400, 100, 400)})
    assert report.comparisons_count == 2 * len(METRICS) == 8
    assert report.corrected_alpha == pytest.approx(0.05 / 8)
    assert [(c.variant, c.metric) for c in report.comparisons][:4] == [(
        "v1", m) for m, _ in METRICS]
    assert [m.variant.name for m in report.variants] == ["v0", "v1", "v2"]
    v2 = [c for c in report.comparisons if c.variant == "v2"]
    assert all(c.p_value is None and not c.significant for c in v2)  # no traffic: nothing to test
    v1_latency = report.comparisons[0]
    assert v1_latency.p_value == pytest.approx(1.0) and not v1_latency.significant


def test_bonferroni_changes_a_decision() -> None:
    # Latency 100 vs 103 ms, sd 20, n 400 each: t = 2.12, p = 0.034 -- significant at 0.05 alone,
    # not after dividing alpha by the 4 comparisons of a two-variant experiment (0.0125).
    control, variant = _stats(400, 100, 400), _stats(400, 103, 400)
    report = build_report(_exp(), {"v0": control, "v1": variant})
    latency = next(c for c in report.comparisons if c.metric == "latency_ms")
    assert latency.p_value is not None and 0.0125 < latency.p_value < 0.05
    assert not latency.significant
    uncorrected = welch_t_test(100, 400, 400, 103, 400, 400)
    assert uncorrected.p_value is not None and uncorrected.p_value < report.alpha  # would have been "significant"
    # A clear effect stays significant after the correction.
    big = build_report(_exp(), {"v0": control, "v1": _stats(400, 110, 400)})
    assert next(c for c in big.comparisons if c.metric == "latency_ms").significant


def test_report_tests_error_rate_and_feedback_as_proportions() -> None:
    control = _stats(1000, 100, 400, errors=10, up=80, down=20)
    variant = _stats(1000, 100, 400, errors=60, up=50, down=50)
    report = build_report(_exp(), {"v0": control, "v1": variant}, alpha=0.05)
    by_metric = {c.metric: c for c in report.comparisons}
    err = by_metric["error_rate"]
    assert (err.control_value, err.variant_value) == (0.01, 0.06)
    assert err.test == "two_proportion_z" and err.significant and err.statistic > 0
    fb = by_metric["feedback_up_rate"]
    assert (fb.control_value, fb.variant_value) == (0.8, 0.5)
    assert fb.significant and fb.statistic < 0
    assert fb.p_value == pytest.approx(two_proportion_z_test(80, 100, 50, 100).p_value)
    assert not by_metric["cost_nano_usd"].significant


def test_alpha_must_be_a_probability() -> None:
    with pytest.raises(InvalidArgument) as err:
        build_report(_exp(), {}, alpha=1.5)
    assert [v.field for v in err.value.violations] == ["alpha"]
