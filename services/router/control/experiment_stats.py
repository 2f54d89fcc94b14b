"""The statistics of an A/B experiment report: per-variant metrics, Welch's t-test for means and a
two-proportion z-test for rates, written with the standard library (the regularised incomplete beta
function by continued fractions) so the router needs no scipy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from libs.errors import Violations

if TYPE_CHECKING:
    from services.router.control.experiments import Experiment, Variant

DEFAULT_ALPHA = 0.05
# The metrics every non-control variant is compared on, and the test each uses.
METRICS: tuple[tuple[str, str], ...] = (
    ("latency_ms", "welch_t"),
    ("cost_nano_usd", "welch_t"),
    ("error_rate", "two_proportion_z"),
    ("feedback_up_rate", "two_proportion_z"),
)


@dataclass(frozen=True)
class TestResult:
    statistic: float
    p_value: float | None  # None: not enough data to test


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    if df > 1e7:  # indistinguishable from the normal distribution
        return normal_two_sided_p(t)
    return min(1.0, betainc(df / 2.0, 0.5, df / (df + t * t)))


def normal_two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


def welch_t_test(mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int) -> TestResult:
    """Welch's unequal-variances t-test, two-sided, from summary statistics (sample variances)."""
    if n1 < 2 or n2 < 2:
        return TestResult(0.0, None)
    s1, s2 = var1 / n1, var2 / n2
    se2 = s1 + s2
    if se2 <= 0.0:  # no spread at all: the means are the answer
        return TestResult(0.0, 1.0) if mean1 == mean2 else TestResult(math.copysign(math.inf, mean2 - mean1), 0.0)
    t = (mean2 - mean1) / math.sqrt(se2)
    df = se2 * se2 / (s1 * s1 / (n1 - 1) + s2 * s2 / (n2 - 1))
    return TestResult(t, t_two_sided_p(t, df))


def two_proportion_z_test(x1: int, n1: int, x2: int, n2: int) -> TestResult:
    """Two-sided z-test of p1 = p2 with the pooled proportion."""
    if n1 == 0 or n2 == 0:
        return TestResult(0.0, None)
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    if se == 0.0:  # both all successes or all failures: identical
        return TestResult(0.0, 1.0)
    z = (x2 / n2 - x1 / n1) / se
    return TestResult(z, normal_two_sided_p(z))


# --- the report -----------------------------------------------------------------------------

@dataclass(frozen=True)
class VariantStats:
    """What the ledger says about one variant. Latency and cost are over successful requests
    (status ok), so a variant that fails fast looks neither fast nor cheap; failures are the error rate."""

    requests: int = 0
    ok_requests: int = 0
    latency_p50_ms: float = 0.0
    latency_mean_ms: float = 0.0
    latency_var: float = 0.0  # sample variance
    cost_mean_nano_usd: float = 0.0
    cost_var: float = 0.0  # sample variance
    errors: int = 0  # status != 'ok'
    feedback_up: int = 0
    feedback_down: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def feedback(self) -> int:
        return self.feedback_up + self.feedback_down

    @property
    def feedback_up_rate(self) -> float:
        return self.feedback_up / self.feedback if self.feedback else 0.0


@dataclass(frozen=True)
class VariantMetrics:
    variant: Variant
    stats: VariantStats


@dataclass(frozen=True)
class Comparison:
    variant: str
    metric: str  # one of METRICS
    test: str  # "welch_t" | "two_proportion_z"
    control_value: float
    variant_value: float
    statistic: float
    p_value: float | None
    significant: bool  # p_value < corrected alpha


@dataclass(frozen=True)
class ExperimentReport:
    experiment: Experiment
    variants: list[VariantMetrics]
    comparisons: list[Comparison]
    alpha: float
    corrected_alpha: float  # alpha / number of comparisons (Bonferroni)

    @property
    def comparisons_count(self) -> int:
        return len(self.comparisons)


def check_alpha(alpha: float) -> None:
    v = Violations()
    v.check(0.0 < alpha < 1.0, "alpha", "must be between 0 and 1 (exclusive)")
    v.raise_if_any()


def _compare(metric: str, c: VariantStats, v: VariantStats) -> tuple[float, float, TestResult]:
    if metric == "latency_ms":
        return c.latency_mean_ms, v.latency_mean_ms, welch_t_test(
            c.latency_mean_ms, c.latency_var, c.ok_requests, v.latency_mean_ms, v.latency_var, v.ok_requests)
    if metric == "cost_nano_usd":
        return c.cost_mean_nano_usd, v.cost_mean_nano_usd, welch_t_test(
            c.cost_mean_nano_usd, c.cost_var, c.ok_requests, v.cost_mean_nano_usd, v.cost_var, v.ok_requests)
    if metric == "error_rate":
        return c.error_rate, v.error_rate, two_proportion_z_test(c.errors, c.requests, v.errors, v.requests)
    if metric == "feedback_up_rate":
        return c.feedback_up_rate, v.feedback_up_rate, two_proportion_z_test(
            c.feedback_up, c.feedback, v.feedback_up, v.feedback)
    raise ValueError(f"unknown metric {metric}")


def build_report(experiment: Experiment, stats: dict[str, VariantStats],
                 alpha: float = DEFAULT_ALPHA) -> ExperimentReport:
    """Compare every variant with the control on every metric; Bonferroni over all of those comparisons.

    ``stats`` is keyed by variant name; a variant without traffic counts as empty. The number of
    comparisons is planned, not observed ((variants - 1) x metrics), so a test that had too little
    data to run still counts: the correction never gets looser because data is missing.
    """
    check_alpha(alpha)
    metrics = [VariantMetrics(v, stats.get(v.name, VariantStats())) for v in experiment.variants]
    control = metrics[0].stats
    planned = (len(metrics) - 1) * len(METRICS)
    corrected = alpha / planned if planned else alpha
    comparisons = []
    for vm in metrics[1:]:
        for metric, test in METRICS:
            cv, vv, result = _compare(metric, control, vm.stats)
            comparisons.append(Comparison(vm.variant.name, metric, test, cv, vv, result.statistic, result.p_value,
                                          result.p_value is not None and result.p_value < corrected))
    return ExperimentReport(experiment, metrics, comparisons, alpha, corrected)


# --- PostgreSQL -----------------------------------------------------------------------------
