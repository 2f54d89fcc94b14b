"""Train the ``auto`` router's complexity classifier (``services/router/models/complexity.json``).

    .venv/bin/python -m tools.train_complexity --data ../shared/data \\
        --out services/router/models/complexity.json

Data (RouteLLM's evaluation sets, read from ``--data``; never copied into the project):

- ``routellm/gsm8k/gsm8k_responses.csv``: per GSM8K prompt, whether the weak model
  (Mixtral-8x7B-Instruct) and the strong one (GPT-4-1106-preview) answered correctly;
- ``routellm/mt_bench/judgements.jsonl`` + ``question.jsonl``: GPT-4 judge scores (1-10)
  of both models on each MT-Bench question and turn (the second turn is routed with the first in context).

Prompts listed in each folder's ``contaminated_prompts.jsonl`` are dropped before anything else.
Label: the weak model did as well as the strong one (correct, or both wrong; judge score >= the strong
one's). Only prompt text is read at routing time; answers and scores are labels.

Learner: L2-regularised logistic regression (Newton's method, numpy; deterministic) over the
heuristics of :mod:`services.router.pipeline.complexity` and the static-embedding sentence vector, every
column standardised; the two blocks have their own L2 strength. The default threshold is the
one that keeps >= 95% of strong-only quality on *both* data sets in 10-fold grouped cross-validation
(the larger of the two per-data-set thresholds). ``tests/bench/eval_routing.py`` reports the same
cross-validation against a random router.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from libs import static_model
from libs.chat import ChatMessage, Role
from libs.static_embedding import StaticVectors
from libs.tokens import estimate_prompt_tokens
from services.router.pipeline.complexity import (
    CHEAP,
    DEFAULT_MODEL_PATH,
    FEATURE_NAMES,
    MODEL_FORMAT,
    ComplexityRouter,
    LinearModel,
    MixtureModel,
    PromptView,
    features,
    hard_rule,
)

F64 = npt.NDArray[np.float64]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEAK_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG_MODEL = "gpt-4-1106-preview"
DATASETS = ("gsm8k", "mt_bench")
# Prices per million tokens, blended input/output, as RouteLLM (Ong et al. 2024, sec. 5) uses them for
# these two models: the saving target (35% on GSM8K at 95% quality) is theirs.
PRICE_PER_MTOK = {"strong": 24.7, "cheap": 0.24}
QUALITY_TARGET = 0.95  # share of strong-only quality to keep
CV_FOLDS = 10

# The learner's settings: (L2 on the heuristic columns, L2 on the embedding columns) of each part, on
# standardised columns; chosen once by grouped cross-validation on the open data (see models/README.md).
L2 = {"gate": (10.0, 10.0), "word_problem": (30.0, 1000.0), "general": (10000.0, 300.0)}
WORD_PROBLEM_DATASET = "gsm8k"  # the word-problem expert's data; the general expert gets the others
NEWTON_ITERATIONS = 50

# Probe prompts (ours, not from any data set): their p_cheap_ok is stored with the model so that a
# differently distilled embedding model is checked before use (complexity.py, _check_probes).
PROBES = (
    "Write a haiku about autumn leaves.",
    "A train travels 120 miles in 2 hours and then 180 miles in 3 hours. What is its average speed?",
    "Implement a function in Python that returns the longest palindromic substring of a string.",
    "What is the capital of Australia?",
    "Compose a persuasive email asking my manager for a day off next Friday.",
    "Solve for x: 3x^2 - 12x + 9 = 0, and explain each step.",
    "Summarise the causes of the First World War in three bullet points.",
    "Tom has twice as many marbles as Sara, who has 14 fewer than Ken. Ken has 40. How many do they have in all?",
    "Pretend you are a pirate and describe your ship.",
    "Extract every date and company name from the following text and return them as JSON.",
    "Prove that the square root of 2 is irrational.",
    "Give me three tips for sleeping better.",
)


@dataclass(frozen=True)
class Example:
    """One routing decision with what each model's answer was worth."""

    dataset: str  # "gsm8k" | "mt_bench"
    group: str  # cross-validation group: one prompt (GSM8K), one question with both its turns (MT-Bench)
    messages: tuple[ChatMessage, ...]
    weak: float  # quality of the cheap tier's answer: correct (1/0) or judge score (1-10)
    strong: float

    @property
    def cheap_ok(self) -> bool:
        return self.weak >= self.strong

    @property
    def prompt_tokens(self) -> int:
        return estimate_prompt_tokens(m.content for m in self.messages)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def read_contaminated(path: Path) -> tuple[set[str], set[int]]:
    """Normalised ``eval_prompt`` texts and ``eval_idx`` values of a ``contaminated_prompts.jsonl``."""
    texts: set[str] = set()
    idxs: set[int] = set()
    if not path.exists():
        return texts, idxs
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            texts.add(_norm(str(row["eval_prompt"])))
            if "eval_idx" in row:
                idxs.add(int(row["eval_idx"]))
    return texts, idxs


def _truthy(value: str) -> float:
    return 1.0 if value.strip().lower() in ("true", "1", "1.0", "yes") else 0.0


def read_gsm8k(data: Path) -> tuple[list[Example], int]:
    """GSM8K examples without the contaminated prompts, and how many were dropped."""
    folder = data / "routellm" / "gsm8k"
    bad_texts, _ = read_contaminated(folder / "contaminated_prompts.jsonl")
    out: list[Example] = []
    dropped = 0
    with (folder / "gsm8k_responses.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            prompt = row["prompt"]
            if _norm(prompt) in bad_texts:
                dropped += 1
                continue
            out.append(Example("gsm8k", "gsm8k:" + _norm(prompt), (ChatMessage(Role.USER, prompt),),
                               _truthy(row[WEAK_MODEL]), _truthy(row[STRONG_MODEL])))
    return out, dropped


def read_mt_bench(data: Path) -> tuple[list[Example], int]:
    """MT-Bench examples (one per question and turn) without contaminated questions, and how many were dropped.

    A contaminated first turn drops the whole question. The second turn is routed with the first in
    context: [user turn 1, assistant (its answer; not read by the router), user turn 2].
    """
    folder = data / "routellm" / "mt_bench"
    bad_texts, _ = read_contaminated(folder / "contaminated_prompts.jsonl")
    questions: dict[int, list[str]] = {}
    question_file = folder / "question.jsonl"
    if not question_file.exists():
        question_file = data / "mt_bench" / "question.jsonl"
    for line in question_file.read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            questions[int(q["question_id"])] = [str(t) for t in q["turns"]]
    scores: dict[tuple[int, int, str], float] = {}
    for line in (folder / "judgements.jsonl").read_text().splitlines():
        if line.strip():
            j = json.loads(line)
            scores[(int(j["question_id"]), int(j["turn"]), str(j["model"]))] = float(j["score"])
    out: list[Example] = []
    dropped = 0
    for qid, turns in sorted(questions.items()):
        if any(_norm(t) in bad_texts for t in turns):
            dropped += 1
            continue
        messages: list[ChatMessage] = []
        for turn, text in enumerate(turns, start=1):
            if turn > 1:
                messages.append(ChatMessage(Role.ASSISTANT, ""))
            messages.append(ChatMessage(Role.USER, text))
            weak, strong = scores.get((qid, turn, WEAK_MODEL)), scores.get((qid, turn, STRONG_MODEL))
            if weak is None or strong is None:
                continue
            out.append(Example("mt_bench", f"mt_bench:{qid}", tuple(messages), weak, strong))
    return out, dropped


def read_all(data: Path) -> tuple[list[Example], dict[str, int]]:
    """Both data sets (GSM8K first) and, per data set, how many contaminated prompts were dropped."""
    gsm, gsm_dropped = read_gsm8k(data)
    mt, mt_dropped = read_mt_bench(data)
    return gsm + mt, {"gsm8k": gsm_dropped, "mt_bench": mt_dropped}


def data_fingerprint(data: Path) -> str:
    h = hashlib.sha256()
    for rel in ("routellm/gsm8k/gsm8k_responses.csv", "routellm/gsm8k/contaminated_prompts.jsonl",
                "routellm/mt_bench/judgements.jsonl", "routellm/mt_bench/contaminated_prompts.jsonl",
                "routellm/mt_bench/question.jsonl"):
        path = data / rel
        h.update(rel.encode())
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Features:
    x: F64  # (n, len(FEATURE_NAMES) + dim)
    forced: npt.NDArray[np.int8]  # +1: a rule sends it cheap, -1: strong, 0: the classifier decides


def featurize(examples: Sequence[Example], vectors: StaticVectors) -> Features:
    rows: list[F64] = []
    forced = np.zeros(len(examples), dtype=np.int8)
    for i, e in enumerate(examples):
        view = PromptView.of(e.messages)
        rule = hard_rule(view)
        if rule is not None:
            forced[i] = 1 if rule[0] == CHEAP else -1
        rows.append(features(view, vectors))
    return Features(np.stack(rows), forced)


def _round(values: F64, digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in values]


@dataclass(frozen=True)
class Standardised:
    mean: F64
    scale: F64
    coef: F64
    intercept: float

    def linear(self) -> LinearModel:
        return LinearModel.from_standardised(self.mean.tolist(), self.scale.tolist(), self.coef.tolist(),
                                             self.intercept)

    def doc(self) -> dict[str, Any]:
        return {"mean": _round(self.mean), "scale": _round(self.scale), "coef": _round(self.coef, 8),
                "intercept": round(self.intercept, 8)}


def fit_logistic(x: F64, y: F64, weight: F64 | None = None, *, l2: tuple[float, float],
                 iterations: int = NEWTON_ITERATIONS) -> Standardised:
    """Weighted L2 logistic regression on standardised columns by Newton's method (deterministic).

    ``l2`` = (strength on the heuristic columns, strength on the embedding columns); none on the intercept.
    """
    weight = np.ones(len(x)) if weight is None else weight
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])
    penalty = np.zeros(z.shape[1])
    penalty[1:1 + len(FEATURE_NAMES)] = l2[0]
    penalty[1 + len(FEATURE_NAMES):] = l2[1]
    beta = np.zeros(z.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -30, 30)))
        grad = z.T @ (weight * (p - y)) + penalty * beta
        hess = (z * (weight * p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if float(np.abs(step).max()) < 1e-9:
            break
    return Standardised(mean, scale, beta[1:].copy(), float(beta[0]))


def balanced_weights(y: F64) -> F64:
    """Each class weighs half: the gate must not learn merely which data set is bigger."""
    pos = y > 0.5
    n = len(y)
    out: F64 = np.where(pos, n / (2.0 * max(int(pos.sum()), 1)), n / (2.0 * max(int((~pos).sum()), 1)))
    return out


@dataclass(frozen=True)
class FittedMixture:
    parts: dict[str, Standardised]

    def model(self) -> MixtureModel:
        return MixtureModel(self.parts["gate"].linear(), self.parts["word_problem"].linear(),
                            self.parts["general"].linear())


def fit_mixture(x: F64, examples: Sequence[Example]) -> FittedMixture:
    """The gate on every example (word-problem data set or not), each expert on its own data set's labels."""
    y = np.asarray([1.0 if e.cheap_ok else 0.0 for e in examples])
    wp = np.asarray([e.dataset == WORD_PROBLEM_DATASET for e in examples])
    if wp.all() or not wp.any():
        raise ValueError("the mixture needs examples of both kinds (word problems and general prompts)")
    gate_y = wp.astype(np.float64)
    return FittedMixture({
        "gate": fit_logistic(x, gate_y, balanced_weights(gate_y), l2=L2["gate"]),
        "word_problem": fit_logistic(x[wp], y[wp], l2=L2["word_problem"]),
        "general": fit_logistic(x[~wp], y[~wp], l2=L2["general"]),
    })


def fold_of(group: str, k: int = CV_FOLDS, salt: str = "") -> int:
    """Deterministic fold of a group (the same prompt always lands in the same fold)."""
    return int(hashlib.sha256((salt + group).encode()).hexdigest()[:8], 16) % k


def cross_validate(examples: Sequence[Example], feats: Features, k: int = CV_FOLDS, salt: str = "") -> F64:
    """Out-of-fold ``p_cheap_ok`` for every example: each scored by a model trained without its group."""
    folds = np.asarray([fold_of(e.group, k, salt) for e in examples])
    oof = np.zeros(len(examples))
    for f in range(k):
        test = folds == f
        if not test.any():
            continue
        train_idx = np.flatnonzero(~test)
        fitted = fit_mixture(feats.x[train_idx], [examples[i] for i in train_idx])
        oof[test] = fitted.model().p(feats.x[test])
    return oof


def effective_scores(p: F64, forced: npt.NDArray[np.int8]) -> F64:
    """Scores whose thresholding is the router's decision: rules beat the classifier."""
    out = p.copy()
    out[forced > 0] = np.inf
    out[forced < 0] = -np.inf
    return out


@dataclass(frozen=True)
class Outcome:
    """One router's result on one data set."""

    quality: float  # mean correctness (GSM8K) or mean judge score (MT-Bench)
    strong_share: float  # share of requests sent to the strong tier
    saving: float  # cost saved against strong-only, per-call prices
    saving_tokens: float  # cost saved against strong-only, priced by each prompt's tokens
    threshold: float = float("nan")


@dataclass(frozen=True)
class Costs:
    """Per-request cost of each tier, as a share of the strong-only total."""

    call_strong: F64
    call_cheap: F64
    tok_strong: F64
    tok_cheap: F64

    @classmethod
    def of(cls, examples: Sequence[Example]) -> Costs:
        n = len(examples)
        ratio = PRICE_PER_MTOK["cheap"] / PRICE_PER_MTOK["strong"]
        tokens = np.asarray([e.prompt_tokens for e in examples], dtype=np.float64)
        call = np.full(n, 1.0 / n)
        tok = tokens / tokens.sum()
        return cls(call, call * ratio, tok, tok * ratio)

    def outcome(self, cheap: npt.NDArray[np.bool_], weak: F64, strong: F64, threshold: float = float("nan")
                ) -> Outcome:
        quality = float(np.where(cheap, weak, strong).mean())
        call = float(np.where(cheap, self.call_cheap, self.call_strong).sum())
        tok = float(np.where(cheap, self.tok_cheap, self.tok_strong).sum())
        return Outcome(quality, 1.0 - float(cheap.mean()), 1.0 - call, 1.0 - tok, threshold)


def sweep(scores: F64, weak: F64, strong: F64, costs: Costs) -> list[Outcome]:
    """The router at every distinct threshold (cheap when score >= threshold), from all-cheap to all-strong."""
    finite = np.unique(scores[np.isfinite(scores)])
    thresholds = [float("-inf"), *finite.tolist(), float("inf")]
    return [costs.outcome(scores >= t, weak, strong, t) for t in thresholds]


def best_at_quality(points: Iterable[Outcome], strong_quality: float, target: float = QUALITY_TARGET
                    ) -> Outcome | None:
    """The largest (per-call) saving among operating points with quality >= target x strong-only."""
    ok = [o for o in points if o.quality >= target * strong_quality - 1e-12]
    return max(ok, key=lambda o: (o.saving, o.quality)) if ok else None


def auc(scores: F64, labels: F64) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (ties count half)."""
    pos = labels > 0.5
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def dataset_slices(examples: Sequence[Example]) -> dict[str, npt.NDArray[np.int64]]:
    return {name: np.flatnonzero([e.dataset == name for e in examples]) for name in DATASETS}


def train(data: Path, out: Path, embedding_dir: Path | None = None, log: Callable[[str], None] = print
          ) -> dict[str, Any]:
    t0 = time.perf_counter()
    examples, dropped = read_all(data)
    vectors = StaticVectors(embedding_dir or static_model.DEFAULT_DIR)
    feats = featurize(examples, vectors)
    log(f"{len(examples)} examples ({dropped} contaminated prompts dropped), features in "
        f"{time.perf_counter() - t0:.1f}s; cross-validating ...")
    oof = cross_validate(examples, feats)
    scores = effective_scores(oof, feats.forced)
    cv: dict[str, Any] = {}
    for name, idx in dataset_slices(examples).items():
        sub = [examples[i] for i in idx]
        weak = np.asarray([e.weak for e in sub])
        strong = np.asarray([e.strong for e in sub])
        labels = np.asarray([1.0 if e.cheap_ok else 0.0 for e in sub])
        best = best_at_quality(sweep(scores[idx], weak, strong, Costs.of(sub)), float(strong.mean()))
        if best is None:
            raise SystemExit(f"{name}: no threshold keeps {QUALITY_TARGET:.0%} of strong-only quality")
        cv[name] = {"examples": len(sub), "auc": round(auc(oof[idx], labels), 4),
                    "threshold_at_95": round(best.threshold, 6), "saving_at_95": round(best.saving, 4),
                    "strong_share_at_95": round(best.strong_share, 4)}
        log(f"  {name}: {cv[name]}")
    # Cheap when p >= threshold: the larger per-data-set threshold keeps the quality target on both.
    default_threshold = round(max(cv[name]["threshold_at_95"] for name in DATASETS), 4)
    fitted = fit_mixture(feats.x, examples)
    router = ComplexityRouter(fitted.model(), vectors, default_threshold=default_threshold)
    probes = [{"text": text, "p": round(router.p_cheap_ok(PromptView(text)), 6)} for text in PROBES]
    doc: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "features": list(FEATURE_NAMES),
        "embedding": {"model": static_model.MODEL_NAME, "dim": vectors.dim, "fingerprint": vectors.fingerprint,
                      "input": "user turns, last first, joined by newlines", "probes": probes},
        "default_threshold": default_threshold,
        "training": {
            "command": "python -m tools.train_complexity --data ../shared/data "
                       "--out services/router/models/complexity.json",
            "data": ["routellm/gsm8k/gsm8k_responses.csv", "routellm/mt_bench/judgements.jsonl",
                     "routellm/mt_bench/question.jsonl"],
            "data_fingerprint": data_fingerprint(data),
            "contaminated_dropped": dropped,
            "examples": {name: len(idx) for name, idx in dataset_slices(examples).items()},
            "models": {"cheap": WEAK_MODEL, "strong": STRONG_MODEL},
            "label": "cheap_ok = weak quality >= strong quality (GSM8K correctness; MT-Bench GPT-4 judge score)",
            "learner": "gate + 2 experts, each an L2 logistic regression (Newton, numpy) on standardised columns",
            "params": {"l2_heuristic_embedding": {k: list(v) for k, v in L2.items()},
                       "gate_label": f"dataset == {WORD_PROBLEM_DATASET} (class-balanced)",
                       "newton_iterations": NEWTON_ITERATIONS},
            "cv_folds": CV_FOLDS, "cv_grouping": "GSM8K prompt; MT-Bench question (both turns)",
            "cv": cv,
            "threshold_rule": f"max over data sets of the out-of-fold threshold with the largest saving at "
                              f">= {QUALITY_TARGET:.0%} of strong-only quality",
        },
        "model": {name: part.doc() for name, part in fitted.parts.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    log(f"wrote {out} (default threshold {default_threshold}) in {time.perf_counter() - t0:.1f}s")
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (../shared/data)")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    p.add_argument("--embedding-dir", type=Path, default=None, help=f"default {static_model.DEFAULT_DIR}")
    args = p.parse_args(argv)
    if not (args.data / "routellm").is_dir():
        print(f"no routellm data under {args.data}", file=sys.stderr)
        return 2
    train(args.data, args.out, args.embedding_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
