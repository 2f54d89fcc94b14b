"""The ``auto`` router's complexity classifier: decisions, the threshold knob, load errors.

Uses the shipped model (services/router/models/complexity.json) and the static embedding model that
``make setup`` prepares; no training library.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from libs import static_model
from libs.chat import ChatMessage, Role
from services.router.pipeline.complexity import (
    CHEAP,
    DEFAULT_MODEL_PATH,
    FEATURE_NAMES,
    STRONG,
    ComplexityModelError,
    ComplexityRouter,
    PromptView,
    heuristic_features,
)

WORD_PROBLEM = ("A baker makes 3 batches of 24 cookies a day and sells them for $2.50 each. He gives away a "
                "quarter of them and eats 5. After 2 weeks, how much money has he made?")
HAIKU = "Write a haiku about the sea."


def _user(*turns: str) -> list[ChatMessage]:
    return [ChatMessage(Role.USER, t) for t in turns]


@pytest.fixture(scope="module")
def embedding_dir() -> Path:
    if not static_model.is_prepared(static_model.DEFAULT_DIR):
        pytest.skip(f"static embedding model not prepared at {static_model.DEFAULT_DIR} (run `make setup`)")
    return static_model.DEFAULT_DIR


@pytest.fixture(scope="module")
def router(embedding_dir: Path) -> ComplexityRouter:
    return ComplexityRouter.load(embedding_dir=embedding_dir)


@pytest.fixture()
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DEFAULT_MODEL_PATH.read_text())
    return loaded


def test_shipped_model_records_how_it_was_made(doc: dict[str, Any]) -> None:
    assert doc["format"] == "tollgate-complexity/1"
    assert tuple(doc["features"]) == FEATURE_NAMES
    assert 0.0 < doc["default_threshold"] < 1.0
    training = doc["training"]
    assert training["data_fingerprint"] and training["params"] and training["cv"]
    assert training["contaminated_dropped"] == {"gsm8k": 12, "mt_bench": 8}
    assert doc["embedding"]["fingerprint"].startswith("m2v-256-") and len(doc["embedding"]["probes"]) >= 3
    assert DEFAULT_MODEL_PATH.stat().st_size < 100_000  # a small artifact


def test_decide_returns_a_tier_a_probability_and_a_reason(router: ComplexityRouter) -> None:
    for messages in (_user(WORD_PROBLEM), _user(HAIKU)):
        d = router.decide(messages)
        assert d.tier in (CHEAP, STRONG)
        assert 0.0 <= d.p_cheap_ok <= 1.0
        assert d.reason.startswith("classifier p=")
        assert (d.tier == CHEAP) == (d.p_cheap_ok >= router.threshold)
        assert d == router.decide(messages)  # deterministic


def test_default_threshold_comes_from_the_model_file(router: ComplexityRouter, doc: dict[str, Any]) -> None:
    assert router.threshold == doc["default_threshold"] == router.default_threshold


def test_threshold_is_the_cost_quality_knob(router: ComplexityRouter, embedding_dir: Path) -> None:
    prompts = [_user(WORD_PROBLEM), _user(HAIKU), _user("Explain quantum entanglement to a child."),
               _user("Prove that there are infinitely many primes."), _user("hi")]
    all_cheap = ComplexityRouter.load(threshold=0.0, embedding_dir=embedding_dir)
    all_strong = router.with_threshold(1.0)
    assert all_cheap.threshold == 0.0 and all_strong.threshold == 1.0
    assert all(all_cheap.decide(m).tier == CHEAP for m in prompts)
    assert all(all_strong.decide(m).tier == STRONG for m in prompts)
    # Monotone: raising the threshold never sends a request from strong back to cheap.
    p = [router.decide(m).p_cheap_ok for m in prompts]
    for lo, hi in ((0.2, 0.5), (0.5, 0.7), (0.7, 0.9)):
        cheap_lo = {i for i, m in enumerate(prompts) if router.with_threshold(lo).decide(m).tier == CHEAP}
        cheap_hi = {i for i, m in enumerate(prompts) if router.with_threshold(hi).decide(m).tier == CHEAP}
        assert cheap_hi <= cheap_lo
        assert cheap_lo == {i for i, v in enumerate(p) if v >= lo}
    # A cut between two prompts' probabilities splits them.
    a, b = sorted(p)[1], sorted(p)[2]
    if a < b:
        mid = router.with_threshold((a + b) / 2)
        assert sum(mid.decide(m).tier == STRONG for m in prompts) == 2
    assert router.with_threshold(None).threshold == router.default_threshold
    with pytest.raises(ValueError):
        router.with_threshold(1.5)
    with pytest.raises(ValueError):
        ComplexityRouter.load(threshold=-0.1, embedding_dir=embedding_dir)


def test_reason_names_the_comparison(router: ComplexityRouter) -> None:
    d = router.with_threshold(0.0).decide(_user(HAIKU))
    assert d.reason == f"classifier p={d.p_cheap_ok:.2f} >= 0.00"
    d = router.with_threshold(1.0).decide(_user(HAIKU))
    assert d.reason == f"classifier p={d.p_cheap_ok:.2f} < 1.00"


def test_rules_come_before_the_classifier(router: ComplexityRouter) -> None:
    code = router.with_threshold(0.0).decide(_user("Why does this fail?\n```python\nprint(1/0)\n```"))
    assert code.tier == STRONG and code.reason == "heuristic: code block" and 0.0 <= code.p_cheap_ok <= 1.0
    for messages in ([], _user("   "), [ChatMessage(Role.SYSTEM, "You are terse.")]):
        empty = router.with_threshold(1.0).decide(messages)
        assert empty == empty.__class__(CHEAP, 1.0, "heuristic: empty prompt")


def test_only_user_turns_are_read(router: ComplexityRouter) -> None:
    plain = router.decide(_user(WORD_PROBLEM))
    with_system = router.decide([ChatMessage(Role.SYSTEM, "You are a pirate. Write long poems. " * 20),
                                 ChatMessage(Role.USER, WORD_PROBLEM)])
    assert with_system.p_cheap_ok == pytest.approx(plain.p_cheap_ok)
    # Answers are never read: the same conversation with another answer routes the same.
    a = router.decide([*_user(HAIKU), ChatMessage(Role.ASSISTANT, "Waves fold into foam"), *_user("Now a limerick.")])
    b = router.decide([*_user(HAIKU), ChatMessage(Role.ASSISTANT, "x" * 5000), *_user("Now a limerick.")])
    assert a == b


def test_word_problems_are_scored_by_difficulty(router: ComplexityRouter) -> None:
    easy = router.decide(_user("Tom has 3 apples and buys 2 more. How many apples does he have?"))
    hard = router.decide(_user(
        "A store sells pencils at 3 for $0.75 and pens at $1.20 each. On Monday it sold 240 pencils and 35% "
        "more pens than the number of pencil packs. On Tuesday sales of both fell by a fifth, and then the "
        "store raised every price by 10%. If the store's costs are 40% of revenue, what was the total profit "
        "over the two days, in dollars, rounded to the nearest cent?"))
    assert easy.p_cheap_ok > hard.p_cheap_ok


def test_heuristics_are_named_and_count_what_they_say() -> None:
    f = dict(zip(FEATURE_NAMES, heuristic_features(PromptView(
        "It costs $5. She sold half of the 12 pies and 12 tarts, then 3/4 of the rest. What percent is left? 20%")),
        strict=True))
    assert f["numbers"] == 6 and f["distinct_numbers"] == 5  # 5, 12, 12, 3, 4, 20
    assert f["question_marks"] == 1
    assert f["kw_fraction"] == 2  # "half", "3/4"
    assert f["kw_percent"] == 2  # "percent", "%"
    assert f["kw_money"] == 3  # "$", "costs", "sold"
    assert f["kw_remaining"] == 2  # "rest", "left"
    assert f["earlier_turns"] == 0
    g = dict(zip(FEATURE_NAMES, heuristic_features(PromptView("Now as a list.", ("Write a poem.", "Shorter."))),
                 strict=True))
    assert g["earlier_turns"] == 2 and g["kw_followup"] == 1 and g["kw_constraint"] == 1


def test_decide_is_fast(router: ComplexityRouter) -> None:
    prompts = [_user(WORD_PROBLEM), _user(HAIKU), _user("Compare Python and Rust for a CLI tool. " * 5)]
    for m in prompts:
        router.decide(m)
    times = []
    for _ in range(100):
        for m in prompts:
            t0 = time.perf_counter()
            router.decide(m)
            times.append(time.perf_counter() - t0)
    # < 1 ms typical on an idle core; the bound leaves room for a loaded CI machine.
    assert statistics.median(times) < 0.005, statistics.median(times)


def _write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "complexity.json"
    path.write_text(json.dumps(doc))
    return path


def test_load_fails_clearly_without_the_model_file(tmp_path: Path, embedding_dir: Path) -> None:
    with pytest.raises(ComplexityModelError, match="not found"):
        ComplexityRouter.load(tmp_path / "missing.json", embedding_dir=embedding_dir)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ComplexityModelError, match="unreadable"):
        ComplexityRouter.load(tmp_path / "bad.json", embedding_dir=embedding_dir)


def test_load_fails_clearly_without_the_embedding_model(tmp_path: Path) -> None:
    with pytest.raises(ComplexityModelError, match="static embedding model not found"):
        ComplexityRouter.load(embedding_dir=tmp_path / "no-model")


def test_load_rejects_other_formats_and_features(tmp_path: Path, doc: dict[str, Any], embedding_dir: Path) -> None:
    with pytest.raises(ComplexityModelError, match="not a tollgate-complexity/1"):
        ComplexityRouter.load(_write(tmp_path, {**doc, "format": "other/1"}), embedding_dir=embedding_dir)
    with pytest.raises(ComplexityModelError, match="other heuristics"):
        ComplexityRouter.load(_write(tmp_path, {**doc, "features": doc["features"][:-1]}),
                              embedding_dir=embedding_dir)
    with pytest.raises(ComplexityModelError, match="malformed"):
        ComplexityRouter.load(_write(tmp_path, {k: v for k, v in doc.items() if k != "model"}),
                              embedding_dir=embedding_dir)
    short = json.loads(json.dumps(doc))
    for part in short["model"].values():
        for key in ("mean", "scale", "coef"):
            part[key] = part[key][:-1]
    with pytest.raises(ComplexityModelError, match="features"):
        ComplexityRouter.load(_write(tmp_path, short), embedding_dir=embedding_dir)


def test_another_distillation_is_accepted_only_if_the_probes_agree(tmp_path: Path, doc: dict[str, Any],
                                                                  embedding_dir: Path) -> None:
    # Same vectors, other recorded fingerprint: the probes agree, so it loads.
    other = {**doc, "embedding": {**doc["embedding"], "fingerprint": "m2v-256-elsewhere"}}
    loaded = ComplexityRouter.load(_write(tmp_path, other), embedding_dir=embedding_dir)
    assert loaded.metadata["probe_max_abs_diff"] < 1e-4
    # Probes that no longer agree mean the embedding space moved: refuse.
    moved = json.loads(json.dumps(other))
    for probe in moved["embedding"]["probes"]:
        probe["p"] = 1.0 - probe["p"]
    with pytest.raises(ComplexityModelError, match="differs from the training one"):
        ComplexityRouter.load(_write(tmp_path, moved), embedding_dir=embedding_dir)
    no_probes = {**other, "embedding": {**other["embedding"], "probes": []}}
    with pytest.raises(ComplexityModelError, match="not the one it was trained on"):
        ComplexityRouter.load(_write(tmp_path, no_probes), embedding_dir=embedding_dir)
