from datetime import UTC, datetime, timedelta

from libs.chat import TokenUsage
from services.router.control.pricing import Price, price_at

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _price(version: int, start: datetime, inp: int = 150_000_000, out: int = 600_000_000,
           cached: int = 75_000_000) -> Price:
    return Price(version, "m", inp, out, cached, start)


def test_cost_is_exact_integer_nano_usd() -> None:
    # 1,000 input tokens at $0.15/M = $0.00015 = 150,000 nano-USD; 500 output at $0.60/M = 300,000.
    assert _price(1, T0).cost(TokenUsage(1_000, 500, 0)) == 450_000


def test_cached_input_billed_once_at_the_cached_rate() -> None:
    p = _price(1, T0)
    # 400 of the 1,000 input tokens were cached: 600 * 0.15 + 400 * 0.075 per M.
    assert p.cost(TokenUsage(1_000, 0, 400)) == 600 * 150 + 400 * 75
    # Cached tokens beyond the input count are clamped rather than billed twice.
    assert p.cost(TokenUsage(100, 0, 1_000)) == 100 * 75


def test_rounding_half_up_to_a_nano_usd() -> None:
    p = _price(1, T0, inp=1_500_000, out=0, cached=0)  # $0.0015 per million tokens
    assert p.cost(TokenUsage(1, 0, 0)) == 2  # 1.5 nano rounds up
    assert p.cost(TokenUsage(0, 0, 0)) == 0


def test_price_at_picks_the_version_in_force() -> None:
    versions = [_price(1, T0), _price(2, T0 + timedelta(days=10)), _price(3, T0 + timedelta(days=20))]
    assert price_at(versions, T0 - timedelta(seconds=1)) is None
    assert price_at(versions, T0)
    assert price_at(versions, T0 + timedelta(days=15)).version == 2  # type: ignore[union-attr]
    assert price_at(versions, T0 + timedelta(days=30)).version == 3  # type: ignore[union-attr]
