"""Train (and cross-validate) the semantic verifier from the evaluation data.

Reproduce the shipped model::

    .venv/bin/python -m tools.train_verifier \\
        --data ../shared/data --out services/cache/models/verifier.json

Data (never copied into the repo):
- PAWS-Wiki dev (``paws_wiki/dev.tsv``): 8,000 labelled pairs; the label-0 pairs share
  nearly all words in another order and mean something else.
- BANKING77 (``banking77/train.csv``): pairs as the cache meets them. For every query, its
  nearest neighbour (by the static embedding, the way the vector search finds candidates)
  among the *same* intent is a positive, and its nearest neighbour among *other* intents a
  negative: the hardest wrong answer the cache could serve.

Cross-validation (``cross_validate``) is grouped, so no pair is scored by a model that saw it:
PAWS by connected groups of sentences (a sentence never sits on both sides of a split),
BANKING77 by intent (a fold's queries come from intents no training pair touches).
The default operating point is picked on those out-of-fold scores, with margin below the targets.

Training needs ``lightgbm`` (a development tool: the service only reads the JSON it writes).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.cache.embedding import Analysis, AnalyzingEmbedder
from services.cache.features import FEATURE_NAMES, hard_veto, pair_features
from services.cache.verifier import DEFAULT_MODEL_PATH, MODEL_FORMAT, TreeEnsemble, Verifier

N_FOLDS = 5
SEED = 20241123
# LightGBM settings: small trees, strong regularisation; the model must stay < 1 MB and generalise
# to data of the same kinds it never saw.
LGBM_PARAMS: dict[str, Any] = {
    "objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 40,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
    "verbosity": -1, "seed": SEED, "num_threads": 2, "deterministic": True, "force_row_wise": True,
}
NUM_ROUNDS = 300
# Operating-point targets with margin (issue 4: FPR <= 1% on BANKING77/Quora-style, <= 5% on PAWS).
TARGET_FPR_BANKING = 0.006
TARGET_FPR_PAWS = 0.035

F64 = npt.NDArray[np.float64]

# Our own pairs (not from the evaluation data), scored at training time and stored in the model file: a
# differently distilled embedding is trusted only if it scores them alike (Verifier.embedder_mismatch).
PROBE_PAIRS: tuple[tuple[str, str], ...] = (
    ("How do I reset my password?", "How can I change my password if I forgot it?"),
    ("How do I reset my password?", "How do I reset my username?"),
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("What is the capital of France?", "What is the capital of Spain?"),
    ("Can I get a refund for a cancelled order?", "Is a refund possible when my order was cancelled?"),
    ("Why was my card declined at the shop?", "Why did the shop decline my card payment?"),
    ("Why was my card declined at the shop?", "Why was my card not delivered yet?"),
    ("The film was released in 1998 in France.", "The film was released in France in 1998."),
    ("He was born in Paris and died in London.", "He was born in London and died in Paris."),
    ("Is the museum open on Sundays?", "Is the museum closed on Sundays?"),
    ("How long does a bank transfer take to arrive?", "When will my transfer show up in the other account?"),
    ("Translate 'good morning' into German.", "Write a poem about the sea."),
)


@dataclass
class PairSet:
    """Labelled pairs over analysed texts; ``group`` keeps related pairs in one fold."""

    name: str
    a: list[Analysis] = field(default_factory=list)
    b: list[Analysis] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    group: list[int] = field(default_factory=list)
    # Groups that a training pair must not touch when ``group`` is held out (BANKING: both intents).
    touches: list[tuple[int, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.label)

    def add(self, a: Analysis, b: Analysis, label: int, group: int, touches: tuple[int, ...] = ()) -> None:
        self.a.append(a)
        self.b.append(b)
        self.label.append(label)
        self.group.append(group)
        self.touches.append(touches or (group,))


# --- data -----------------------------------------------------------------------------------------

def read_paws(path: Path) -> list[tuple[str, str, int]]:
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for rec in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(rec) >= 4 and rec[3] in {"0", "1"}:
                rows.append((rec[1], rec[2], int(rec[3])))
    return rows


def read_pairs_tsv(path: Path) -> list[tuple[str, str, int]]:
    """Generic labelled pairs: ``sentence1<TAB>sentence2<TAB>label`` (a header row is skipped)."""
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for rec in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(rec) >= 3 and rec[-1] in {"0", "1"}:
                rows.append((rec[-3], rec[-2], int(rec[-1])))
    return rows


def read_banking(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


def _components(pairs: Sequence[tuple[str, str, int]]) -> list[int]:
    """Union-find over sentences: pairs sharing a sentence (directly or not) get one group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for s1, s2, _ in pairs:
        parent[find(s1)] = find(s2)
    ids: dict[str, int] = {}
    return [ids.setdefault(find(s1), len(ids)) for s1, _, _ in pairs]


def paws_pairs(rows: Sequence[tuple[str, str, int]], embedder: AnalyzingEmbedder, name: str = "paws") -> PairSet:
    cache: dict[str, Analysis] = {}

    def an(t: str) -> Analysis:
        if t not in cache:
            cache[t] = embedder.analyze(t)
        return cache[t]

    out = PairSet(name)
    for (s1, s2, label), g in zip(rows, _components(rows), strict=True):
        out.add(an(s1), an(s2), label, g)
    return out


def banking_pairs(rows: Sequence[tuple[str, str]], embedder: AnalyzingEmbedder, name: str = "banking77") -> PairSet:
    """Nearest same-intent neighbour (positive) and nearest other-intent neighbour (negative) per query."""
    texts = [t for t, _ in rows]
    intents = sorted({c for _, c in rows})
    intent_id = {c: i for i, c in enumerate(intents)}
    labels = np.asarray([intent_id[c] for _, c in rows])
    analyses = [embedder.analyze(t) for t in texts]
    vecs = np.stack([a.vector for a in analyses])
    norm_text = [" ".join(a.words) for a in analyses]
    out = PairSet(name)
    seen: set[tuple[int, int]] = set()
    for start in range(0, len(texts), 1024):
        sims = vecs[start:start + 1024] @ vecs.T
        for k, row in enumerate(sims):
            i = start + k
            row[i] = -2.0
            order = np.argsort(-row)
            pos = next((j for j in order[:400] if labels[j] == labels[i] and norm_text[j] != norm_text[i]), None)
            neg = next((j for j in order if labels[j] != labels[i]), None)
            for j, lab in ((pos, 1), (neg, 0)):
                if j is None:
                    continue
                key = (min(i, int(j)), max(i, int(j)))
                if key in seen:
                    continue
                seen.add(key)
                out.add(analyses[i], analyses[int(j)], lab, int(labels[i]), (int(labels[i]), int(labels[j])))
    return out


def featurize(pairs: PairSet) -> F64:
    return np.asarray([pair_features(a, b) for a, b in zip(pairs.a, pairs.b, strict=True)], dtype=np.float64)


def vetoes(pairs: PairSet) -> npt.NDArray[np.bool_]:
    return np.asarray([hard_veto(a, b) is not None for a, b in zip(pairs.a, pairs.b, strict=True)])


# --- model ----------------------------------------------------------------------------------------

def train(x: F64, y: npt.NDArray[np.int64], weight: F64 | None = None) -> list[dict[str, list[float]]]:
    import lightgbm as lgb  # type: ignore[import-untyped]  # training only

    ds = lgb.Dataset(x, label=y, weight=weight, feature_name=list(FEATURE_NAMES), free_raw_data=False)
    booster = lgb.train(LGBM_PARAMS, ds, num_boost_round=NUM_ROUNDS)
    trees = export_trees(booster.dump_model())
    # The exported trees must score exactly as LightGBM does.
    check = x[: min(len(x), 2000)]
    ours = TreeEnsemble(trees).raw(check)
    theirs = booster.predict(check, raw_score=True)
    if not np.allclose(ours, theirs, atol=1e-6):
        raise RuntimeError("exported trees disagree with lightgbm")
    return trees


def export_trees(dump: dict[str, Any]) -> list[dict[str, list[float]]]:
    trees = []
    for info in dump["tree_info"]:
        feature: list[float] = []
        threshold: list[float] = []
        left: list[float] = []
        right: list[float] = []
        value: list[float] = []
        default_left: list[float] = []

        def visit(node: dict[str, Any], feature: list[float] = feature, threshold: list[float] = threshold,
                  left: list[float] = left, right: list[float] = right, value: list[float] = value,
                  default_left: list[float] = default_left) -> int:
            i = len(feature)
            for arr in (feature, threshold, left, right, value, default_left):
                arr.append(0)
            if "leaf_value" in node:
                feature[i], value[i], left[i], right[i] = -1, float(node["leaf_value"]), -1, -1
                return i
            if node.get("decision_type", "<=") != "<=":
                raise ValueError("only numerical <= splits are supported")
            feature[i] = int(node["split_feature"])
            threshold[i] = float(node["threshold"])
            default_left[i] = 1 if node.get("default_left", True) else 0
            left[i] = visit(node["left_child"])
            right[i] = visit(node["right_child"])
            return i

        visit(info["tree_structure"])
        trees.append({"feature": feature, "threshold": threshold, "left": left, "right": right,
                      "value": value, "default_left": default_left})
    return trees


def _weights(sets: Sequence[PairSet], masks: Sequence[npt.NDArray[np.bool_]]) -> F64:
    # Each data set weighs the same in total, whatever its size: neither kind of pair drowns the other.
    parts = [np.full(int(m.sum()), 1.0 / max(1, int(m.sum()))) for m in masks]
    w: F64 = np.concatenate(parts)
    return w * (len(w) / float(w.sum()))


def fold_of(groups: Sequence[int], n_folds: int = N_FOLDS, seed: int = SEED) -> dict[int, int]:
    uniq = sorted(set(groups))
    random.Random(seed).shuffle(uniq)
    return {g: i % n_folds for i, g in enumerate(uniq)}


def cross_validate(sets: Sequence[PairSet], feats: Sequence[F64], n_folds: int = N_FOLDS,
                   log: Callable[[str], None] = lambda s: None) -> list[F64]:
    """Out-of-fold probabilities for every pair of every set (each scored by a model that never saw it)."""
    folds = [fold_of(s.group, n_folds) for s in sets]
    oof = [np.full(len(s), np.nan) for s in sets]
    for k in range(n_folds):
        t0 = time.perf_counter()
        train_masks = [np.asarray([all(f.get(g, -1) != k for g in t) for t in s.touches])
                       for s, f in zip(sets, folds, strict=True)]
        x = np.concatenate([fx[m] for fx, m in zip(feats, train_masks, strict=True)])
        y = np.concatenate([np.asarray(s.label)[m] for s, m in zip(sets, train_masks, strict=True)])
        model = TreeEnsemble(train(x, y, _weights(sets, train_masks)))
        for i, (s, f, fx) in enumerate(zip(sets, folds, feats, strict=True)):
            test = np.asarray([f[g] == k for g in s.group])
            oof[i][test] = 1.0 / (1.0 + np.exp(-model.raw(fx[test])))
        log(f"fold {k + 1}/{n_folds}: trained on {len(y)} pairs in {time.perf_counter() - t0:.1f}s")
    return oof


@dataclass(frozen=True)
class Rates:
    recall: float
    fpr: float
    positives: int
    negatives: int


def rates(accept: npt.NDArray[np.bool_], labels: Sequence[int]) -> Rates:
    y = np.asarray(labels, dtype=bool)
    return Rates(float(accept[y].mean()) if y.any() else 0.0, float(accept[~y].mean()) if (~y).any() else 0.0,
                 int(y.sum()), int((~y).sum()))


def choose_threshold(scores: Sequence[F64], veto: Sequence[npt.NDArray[np.bool_]], labels: Sequence[Sequence[int]],
                     max_fpr: Sequence[float]) -> float:
    """The lowest threshold that keeps every set's false-positive rate within its bound."""
    for t in np.arange(0.30, 0.995, 0.005):
        if all(rates((s >= t) & ~v, y).fpr <= bound
               for s, v, y, bound in zip(scores, veto, labels, max_fpr, strict=True)):
            return round(float(t), 3)
    return 0.995


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--model-dir", type=Path, default=None, help="static embedding model (default: set up one)")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    args = p.parse_args(argv)

    from services.cache.setup_models import load_static_embedder

    embedder = load_static_embedder(args.model_dir)
    t0 = time.perf_counter()
    paws = paws_pairs(read_paws(args.data / "paws_wiki" / "dev.tsv"), embedder)
    bank = banking_pairs(read_banking(args.data / "banking77" / "train.csv"), embedder)
    sets = [paws, bank]
    feats = [featurize(s) for s in sets]
    print(f"{len(paws)} PAWS pairs, {len(bank)} BANKING77 pairs, features in {time.perf_counter() - t0:.1f}s")
    oof = cross_validate(sets, feats, log=print)
    veto = [vetoes(s) for s in sets]
    threshold = choose_threshold(oof, veto, [s.label for s in sets], [TARGET_FPR_PAWS, TARGET_FPR_BANKING])
    cv = {}
    for s, o, v in zip(sets, oof, veto, strict=True):
        r = rates((o >= threshold) & ~v, s.label)
        cv[s.name] = {"recall": round(r.recall, 4), "fpr": round(r.fpr, 4), "positives": r.positives,
                      "negatives": r.negatives}
        print(f"{s.name}: recall {r.recall:.3f}  FPR {r.fpr:.4f}  at threshold {threshold}")
    all_masks = [np.ones(len(s), dtype=bool) for s in sets]
    trees = train(np.concatenate(feats), np.concatenate([np.asarray(s.label) for s in sets]),
                  _weights(sets, all_masks))
    final = Verifier(TreeEnsemble(trees), default_threshold=threshold)
    probes = [{"a": a, "b": b, "p": round(final.score(embedder.analyze(a), embedder.analyze(b)), 6)}
              for a, b in PROBE_PAIRS]
    doc = {
        "format": MODEL_FORMAT,
        "features": list(FEATURE_NAMES),
        "default_threshold": threshold,
        "embedder_fingerprint": embedder.fingerprint,
        "embedder_probes": probes,
        "training": {
            "command": "python -m tools.train_verifier",
            "data": ["paws_wiki/dev.tsv (all pairs)",
                     "banking77/train.csv (nearest same-intent / other-intent neighbour per query)"],
            "learner": "lightgbm", "params": LGBM_PARAMS, "rounds": NUM_ROUNDS,
            "cv_folds": N_FOLDS, "cv_at_default_threshold": cv,
            "threshold_rule": f"lowest with out-of-fold FPR <= {TARGET_FPR_PAWS} (PAWS) and "
                              f"<= {TARGET_FPR_BANKING} (BANKING77)",
        },
        "trees": trees,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, separators=(",", ":")))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {len(trees)} trees)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
