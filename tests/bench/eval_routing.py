"""The ``auto`` model's complexity router against a random router, strong-only, weak-only and an oracle.

    .venv/bin/python -m tests.bench.eval_routing [--data ../shared/data] [--write] [--json out.json]

Data: RouteLLM's GSM8K (per-model correctness) and MT-Bench (GPT-4 judge scores) sets for
Mixtral-8x7B-Instruct (cheap tier) and GPT-4-1106-preview (strong tier), without the prompts in
``contaminated_prompts.jsonl`` (dropped before training and scoring).

- learned: the complexity router **cross-validated** (10 folds grouped by prompt / MT-Bench
  question: every prompt is scored by a model trained without it), at the threshold with the largest
  cost saving whose quality is >= 95% of strong-only (RouteLLM's way of reading a router's curve);
  also at the shipped default threshold;
- random: strong with the same share of strong calls as the learned router (exactly that many strong
  calls, averaged over 1,000 seeds); and the random router at its own 95%-quality point;
- strong-only, weak-only, oracle (cheap whenever the cheap answer is as good).

``--shipped`` scores the shipped model instead of cross-validating: only honest on data it was not
trained on (e.g. a held-out set of the same kind).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from libs import static_model
from libs.static_embedding import StaticVectors
from services.router.pipeline.complexity import DEFAULT_MODEL_PATH, ComplexityRouter
from tools.train_complexity import (
    CV_FOLDS,
    PRICE_PER_MTOK,
    QUALITY_TARGET,
    STRONG_MODEL,
    WEAK_MODEL,
    Costs,
    Example,
    Features,
    Outcome,
    auc,
    best_at_quality,
    cross_validate,
    dataset_slices,
    effective_scores,
    featurize,
    fold_of,
    read_all,
    sweep,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
TARGET_SAVING = {"gsm8k": 0.35}  # RouteLLM's published figure: >= 35% saved on GSM8K at 95% quality
RANDOM_SEEDS = 1000
COMMAND = ".venv/bin/python -m tests.bench.eval_routing --data ../shared/data --write"
TITLES = {"gsm8k": "GSM8K", "mt_bench": "MT-Bench"}
QUALITY_UNIT = {"gsm8k": "accuracy", "mt_bench": "judge score (1-10)"}


@dataclass(frozen=True)
class Row:
    data: str
    router: str
    quality: float
    quality_share: float  # of strong-only quality
    strong_share: float
    saving: float  # per call
    saving_tokens: float  # by prompt tokens
    threshold: float | None = None


@dataclass(frozen=True)
class DatasetResult:
    data: str
    examples: int
    auc: float
    rows: list[Row]

    def row(self, router: str) -> Row:
        return next(r for r in self.rows if r.router == router)


@dataclass(frozen=True)
class Evaluation:
    mode: str  # "cross-validated" or "shipped model"
    dropped: dict[str, int]
    results: list[DatasetResult]
    seconds: float
    spread: dict[str, list[float]]  # per data set: the 95%-quality saving on each fold split (first = the table's)

    def result(self, data: str) -> DatasetResult:
        return next(r for r in self.results if r.data == data)


def _row(data: str, router: str, o: Outcome, strong_quality: float, threshold: float | None = None) -> Row:
    return Row(data, router, o.quality, o.quality / strong_quality, o.strong_share, o.saving, o.saving_tokens,
               threshold)


def random_router(weak: np.ndarray, strong: np.ndarray, costs: Costs, seeds: int = RANDOM_SEEDS
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mean quality and mean token-priced cost share over ``seeds`` random orders, for every count of
    strong calls k = 0..n (exactly k requests, drawn at random, go strong)."""
    n = len(weak)
    rng = np.random.default_rng(20241123)
    quality = np.zeros(n + 1)
    tok_cost = np.zeros(n + 1)
    base_q = float(weak.sum())
    base_t = float(costs.tok_cheap.sum())
    for _ in range(seeds):
        order = rng.permutation(n)
        quality += np.concatenate([[base_q], base_q + np.cumsum(strong[order] - weak[order])]) / n
        tok_cost += np.concatenate([[base_t], base_t + np.cumsum(costs.tok_strong[order] - costs.tok_cheap[order])])
    return quality / seeds, tok_cost / seeds


def _random_outcome(k: int, n: int, quality: np.ndarray, tok_cost: np.ndarray, costs: Costs) -> Outcome:
    call = k * float(costs.call_strong[0]) + (n - k) * float(costs.call_cheap[0])
    return Outcome(float(quality[k]), k / n, 1.0 - call, 1.0 - float(tok_cost[k]))


def score_dataset(name: str, examples: Sequence[Example], p: np.ndarray, scores: np.ndarray,
                  default_threshold: float, seeds: int = RANDOM_SEEDS) -> DatasetResult:
    weak = np.asarray([e.weak for e in examples])
    strong = np.asarray([e.strong for e in examples])
    labels = np.asarray([1.0 if e.cheap_ok else 0.0 for e in examples])
    costs = Costs.of(examples)
    n = len(examples)
    s_q = float(strong.mean())
    rows: list[Row] = []
    best = best_at_quality(sweep(scores, weak, strong, costs), s_q)
    if best is None:  # cannot happen: all-strong is on the curve
        raise RuntimeError(f"{name}: no operating point reaches {QUALITY_TARGET:.0%} of strong-only quality")
    rows.append(_row(name, "learned @ 95% quality", best, s_q, best.threshold))
    at_default = costs.outcome(scores >= default_threshold, weak, strong, default_threshold)
    rows.append(_row(name, "learned @ default threshold", at_default, s_q, default_threshold))
    q_rand, t_rand = random_router(weak, strong, costs, seeds)
    k_same = round(best.strong_share * n)
    rows.append(_row(name, "random, same strong share", _random_outcome(k_same, n, q_rand, t_rand, costs), s_q))
    k_95 = next(k for k in range(n + 1) if q_rand[k] >= QUALITY_TARGET * s_q - 1e-12)
    rows.append(_row(name, "random @ 95% quality", _random_outcome(k_95, n, q_rand, t_rand, costs), s_q))
    rows.append(_row(name, "strong only", costs.outcome(np.zeros(n, dtype=bool), weak, strong), s_q))
    rows.append(_row(name, "weak only", costs.outcome(np.ones(n, dtype=bool), weak, strong), s_q))
    rows.append(_row(name, "oracle", costs.outcome(weak >= strong, weak, strong), s_q))
    return DatasetResult(name, n, auc(p, labels), rows)


def nested_threshold_cheap(examples: Sequence[Example], feats: Features, p: np.ndarray, *, salt: str = "",
                           inner_folds: int = 5) -> np.ndarray:
    """Cheap/strong of every example when each outer fold's threshold (one per data set) is picked on its
    training folds alone (their own inner cross-validation): a threshold never chosen on the prompts it
    routes. ``p`` is the outer out-of-fold probability."""
    folds = np.asarray([fold_of(e.group, CV_FOLDS, salt) for e in examples])
    cheap = np.zeros(len(examples), dtype=bool)
    for f in range(CV_FOLDS):
        test = folds == f
        if not test.any():
            continue
        train_idx = np.flatnonzero(~test)
        train_ex = [examples[i] for i in train_idx]
        inner_feats = Features(feats.x[train_idx], feats.forced[train_idx])
        inner = effective_scores(cross_validate(train_ex, inner_feats, inner_folds, salt=salt + "inner"),
                                 inner_feats.forced)
        outer = effective_scores(p, feats.forced)
        for name, idx in dataset_slices(train_ex).items():
            sub = [train_ex[i] for i in idx]
            weak = np.asarray([e.weak for e in sub])
            strong = np.asarray([e.strong for e in sub])
            best = best_at_quality(sweep(inner[idx], weak, strong, Costs.of(sub)), float(strong.mean()))
            threshold = best.threshold if best is not None else float("inf")
            mask = test & np.asarray([e.dataset == name for e in examples])
            cheap[mask] = outer[mask] >= threshold
    return cheap


def evaluate(data: Path, *, shipped: bool = False, model_path: Path = DEFAULT_MODEL_PATH,
             embedding_dir: Path | None = None, seeds: int = RANDOM_SEEDS, nested: bool = False,
             repeats: int = 1, log: Callable[[str], None] = print) -> Evaluation:
    """``nested``: add the row whose thresholds are picked on training folds only; ``repeats``: also run
    the cross-validation on that many other fold splits and report the spread of the 95%-quality saving."""
    t0 = time.perf_counter()
    examples, dropped = read_all(data)
    router = ComplexityRouter.load(model_path, embedding_dir=embedding_dir)
    vectors: StaticVectors = router.vectors
    feats = featurize(examples, vectors)
    log(f"{len(examples)} examples ({dropped} contaminated dropped); "
        f"{'scoring the shipped model' if shipped else f'{CV_FOLDS}-fold grouped cross-validation'} ...")
    p = router.model.p(feats.x) if shipped else cross_validate(examples, feats)
    scores = effective_scores(p, feats.forced)
    slices = {name: idx for name, idx in dataset_slices(examples).items() if len(idx)}
    results = {name: score_dataset(name, [examples[i] for i in idx], p[idx], scores[idx], router.default_threshold,
                                   seeds) for name, idx in slices.items()}
    if nested and not shipped:
        log("nested: thresholds picked on the training folds ...")
        cheap = nested_threshold_cheap(examples, feats, p)
        for name, idx in slices.items():
            sub = [examples[i] for i in idx]
            weak = np.asarray([e.weak for e in sub])
            strong = np.asarray([e.strong for e in sub])
            o = Costs.of(sub).outcome(cheap[idx], weak, strong)
            results[name].rows.insert(1, _row(name, "learned, threshold from training folds", o,
                                              float(strong.mean())))
    spread: dict[str, list[float]] = {name: [results[name].row("learned @ 95% quality").saving] for name in slices}
    for r in range(1, repeats if not shipped else 1):
        log(f"cross-validation on fold split {r + 1}/{repeats} ...")
        p_r = effective_scores(cross_validate(examples, feats, salt=f"split{r}"), feats.forced)
        for name, idx in slices.items():
            sub = [examples[i] for i in idx]
            weak = np.asarray([e.weak for e in sub])
            strong = np.asarray([e.strong for e in sub])
            best = best_at_quality(sweep(p_r[idx], weak, strong, Costs.of(sub)), float(strong.mean()))
            spread[name].append(best.saving if best is not None else 0.0)
    return Evaluation("shipped model" if shipped else "cross-validated", dropped, list(results.values()),
                      time.perf_counter() - t0, spread if repeats > 1 and not shipped else {})


def _pct(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:.1f}%"  # + 0.0: no "-0.0%"


def render(ev: Evaluation, command: str = COMMAND) -> str:
    ratio = PRICE_PER_MTOK["cheap"] / PRICE_PER_MTOK["strong"]
    lines = [
        "## Model routing (`auto`): complexity router vs. random router",
        "",
        f"Command: `{command}` ({ev.seconds:.0f} s). Learned router {ev.mode}: "
        + ("10 folds grouped by prompt (GSM8K) and by question, both turns (MT-Bench); every prompt is "
           "scored by a model trained without it. " if ev.mode == "cross-validated" else "")
        + "Contaminated prompts (`contaminated_prompts.jsonl`) dropped before training and scoring: "
        + ", ".join(f"{TITLES.get(k, k)} {v}" for k, v in ev.dropped.items()) + ".",
        "",
        f"Cheap tier = {WEAK_MODEL}, strong tier = {STRONG_MODEL}. Quality: mean correctness (GSM8K), mean "
        "GPT-4 judge score (MT-Bench); strong-only quality is the strong model's. Cost: RouteLLM's blended "
        f"prices, ${PRICE_PER_MTOK['strong']}/M tokens (GPT-4) and ${PRICE_PER_MTOK['cheap']}/M (Mixtral), "
        f"so a cheap call costs {ratio:.2%} of a strong one; **saved/call** prices every call alike, "
        "**saved/tokens** prices each by its prompt's tokens (`libs.tokens`, user turns only). "
        "\"@ 95% quality\" = the largest per-call saving among thresholds whose quality is >= 95% of "
        "strong-only. Random routers: exactly that many strong calls drawn at random, mean of "
        f"{RANDOM_SEEDS:,} seeds, same run.",
        "",
        "The 95%-quality point reads its threshold off the scored prompts' own curve (as RouteLLM reports "
        "routers); *threshold from training folds* picks each fold's threshold (per data set) on the other "
        "folds only, which is what a threshold fixed in advance gets; *default threshold* is the shipped "
        "model's single threshold (the larger of the two data sets' 95% thresholds in training).",
    ]
    for res in ev.results:
        title = TITLES.get(res.data, res.data)
        lines += ["", f"### {title} ({res.examples} prompts{', both turns' if res.data == 'mt_bench' else ''}; "
                  f"{QUALITY_UNIT.get(res.data, 'quality')}; learned AUC {res.auc:.3f})", "",
                  "| router | strong calls | quality | of strong-only | saved/call | saved/tokens | threshold |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        fmt = "{:.3f}" if res.data == "gsm8k" else "{:.2f}"
        for r in res.rows:
            name = f"**{r.router}**" if r.router == "learned @ 95% quality" else r.router
            thr = "" if r.threshold is None else f"{r.threshold:.3f}"
            lines.append(f"| {name} | {_pct(r.strong_share)} | {fmt.format(r.quality)} | {_pct(r.quality_share)} "
                         f"| {_pct(r.saving)} | {_pct(r.saving_tokens)} | {thr} |")
    if ev.spread:
        splits = len(next(iter(ev.spread.values())))
        lines += ["", f"Over {splits} different fold splits, learned saving @ 95% quality: "
                  + "; ".join(f"{TITLES.get(k, k)} mean {_pct(float(np.mean(v)))} "
                              f"(min {_pct(min(v))}, max {_pct(max(v))})" for k, v in ev.spread.items()) + "."]
    lines += ["", verdict(ev)]
    return "\n".join(lines)


def verdict(ev: Evaluation) -> str:
    parts = []
    for res in ev.results:
        learned, rand = res.row("learned @ 95% quality"), res.row("random @ 95% quality")
        title = TITLES.get(res.data, res.data)
        target = TARGET_SAVING.get(res.data)
        text = (f"{title}: learned saves {_pct(learned.saving)} per call ({_pct(learned.saving_tokens)} by tokens) "
                f"at >= 95% quality vs. {_pct(rand.saving)} for the random router")
        if target is not None:
            met = learned.saving >= target
            text += (f"; target >= {target:.0%} (RouteLLM, per call): **{'met' if met else 'not met'}**"
                     + ("" if learned.saving_tokens >= target else
                        f" (by prompt tokens {_pct(learned.saving_tokens)}: not met)"))
        nested = [r for r in res.rows if r.router == "learned, threshold from training folds"]
        if nested:
            text += (f"; with the threshold picked on the training folds only: {_pct(nested[0].saving)} per call "
                     f"at {_pct(nested[0].quality_share)} of strong-only quality")
        parts.append(text + ".")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    p.add_argument("--embedding-dir", type=Path, default=None, help=f"default {static_model.DEFAULT_DIR}")
    p.add_argument("--shipped", action="store_true", help="score the shipped model (held-out data only)")
    p.add_argument("--seeds", type=int, default=RANDOM_SEEDS)
    p.add_argument("--repeats", type=int, default=5, help="fold splits for the spread line (1: none)")
    p.add_argument("--no-nested", action="store_true", help="skip the thresholds-from-training-folds row")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args(argv)
    if not (args.data / "routellm").is_dir():
        print(f"no routellm data under {args.data}", file=sys.stderr)
        return 2
    ev = evaluate(args.data, shipped=args.shipped, model_path=args.model, embedding_dir=args.embedding_dir,
                  seeds=args.seeds, nested=not args.no_nested, repeats=args.repeats)
    text = render(ev)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"mode": ev.mode, "dropped": ev.dropped,
                                         "results": [{**asdict(r)} for r in ev.results]}, indent=1))
    if args.write:
        from tests.bench.run import write_section

        write_section("bench:eval_routing", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
