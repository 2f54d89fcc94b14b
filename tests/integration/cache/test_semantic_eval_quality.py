"""Semantic-cache precision on real paraphrase data, cross-validated, against the naive cosine cache.

Runs tests/bench/eval_cache.py's evaluation (no pair is scored by a model trained on it) and holds
the verified tier to the issue's false-positive targets at the shipped default operating point.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cache.embedding import StaticEmbedder
from services.cache.verifier import Verifier
from tests.bench.eval_cache import DATA, Row, evaluate
from tests.unit.cache.cache_test_support import static_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], Row]:
    if not (DATA / "paws_wiki" / "dev.tsv").is_file():
        pytest.fail(f"evaluation data missing at {DATA} (CI always has ../shared/data)")
    result = evaluate(Path(DATA), StaticEmbedder(static_model_dir()), Verifier.load(), log=lambda _s: None)
    return {(r.data, r.method if "own" in r.method else r.method.split(" (")[0]): r for r in result}


def test_paws_fpr_at_most_5_percent(rows: dict[tuple[str, str], Row]) -> None:
    v, naive = rows[("paws", "verified")], rows[("paws", "cosine@0.92")]
    same = rows[("paws", "cosine@same-FPR")]
    assert v.fpr <= 0.05 and v.recall >= 0.30, v
    assert naive.fpr > 0.5  # the naive cache serves most PAWS near-duplicates: the test data is the hard kind
    assert v.recall >= 3 * same.recall, (v, same)  # the cosine alone serves next to nothing at this FPR
    # A namespace configured at PAWS's own target reaches the recall there.
    own = rows[("paws", "verified (own op-point, FPR<=5%)")]
    assert own.fpr <= 0.05 and own.recall >= 0.50, own


def test_banking77_fpr_at_most_1_percent(rows: dict[tuple[str, str], Row]) -> None:
    v = rows[("banking77", "verified")]
    same = rows[("banking77", "cosine@same-FPR")]
    assert v.fpr <= 0.01, v
    # The target is recall >= 50% here and is NOT met (14.5% cross-validated at the default, 21.7% at a
    # 1% operating point); these bounds hold what is reached, so a regression fails. At the default point the
    # verifier is only on a par with the cosine at the same FPR on BANKING77 (14.5% vs 14.9% with the embedding
    # distilled under build-constraints.txt); its gain is on PAWS, where the cosine serves nothing.
    assert v.recall >= 0.12, v
    assert v.recall >= same.recall - 0.01, (v, same)
    own = rows[("banking77", "verified (own op-point, FPR<=1%)")]
    assert own.fpr <= 0.01 and own.recall >= 0.18, own
