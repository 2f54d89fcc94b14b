"""The ``auto`` model's complexity router: send a request to the cheap or the strong tier.

From the prompt text alone (never a response) a small classifier gives ``p_cheap_ok``, the
probability that the cheap tier answers as well as the strong one. Its inputs are interpretable
heuristics of the last user turn (length, how many numbers and quantities, arithmetic and multi-step
wording, code / maths / writing vocabulary, list items, follow-up turns) and the sentence vector of
the user turns from the project's static embedding model (:mod:`libs.static_embedding`, the
model2vec model the cache uses). The classifier is a gated mixture of two logistic regressions
(:class:`MixtureModel`): a maths-word-problem expert and a general one.

A request goes cheap when ``p_cheap_ok >= threshold``: the threshold is the cost/quality knob
(higher: more strong calls, higher quality, higher cost); its default is stored with the model.
Two rules come first: a request without any user text goes cheap, one with a fenced code block strong.
System prompts and assistant turns are not read.

The model is our own small artifact, ``services/router/models/complexity.json``, written by
``python -m tools.train_complexity`` (how, and on what, is recorded in the file;
``services/router/models/README.md``). Run time needs numpy, ``tokenizers`` and ``safetensors``:
no training library. Measured quality: ``tests/bench/eval_routing.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from libs import static_model
from libs.chat import ChatMessage, Role
from libs.static_embedding import StaticModelMissing, StaticVectors

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "models" / "complexity.json"
MODEL_FORMAT = "tollgate-complexity/1"
CHEAP = "cheap"
STRONG = "strong"
# Another distillation of the embedding model is accepted when the stored probe prompts score within this.
PROBE_TOLERANCE = 0.02

F64 = npt.NDArray[np.float64]


class ComplexityModelError(RuntimeError):
    """The classifier cannot be loaded: model file or embedding model missing, unreadable or mismatched."""


@dataclass(frozen=True)
class RouteDecision:
    tier: str  # "cheap" | "strong"
    p_cheap_ok: float  # the classifier's probability that the cheap tier answers as well
    reason: str  # short, e.g. "classifier p=0.82 >= 0.60" or "heuristic: code block"


@dataclass(frozen=True)
class PromptView:
    """What the router reads of a conversation: the user turns (system prompts and answers are not read)."""

    last_user: str
    earlier_user: tuple[str, ...] = ()

    @classmethod
    def of(cls, messages: Sequence[ChatMessage]) -> PromptView:
        users = [m.content for m in messages if m.role == Role.USER]
        if not users:  # no user turn (e.g. tool results only): read what is not a system prompt or an answer
            users = [m.content for m in messages if m.role not in (Role.SYSTEM, Role.ASSISTANT)]
        if not users:
            return cls("")
        return cls(users[-1], tuple(users[:-1]))

    @property
    def embedding_text(self) -> str:
        """The last turn first (it survives the cut), then the earlier ones for their topic."""
        return "\n".join((self.last_user, *reversed(self.earlier_user)))[:EMBED_MAX_CHARS]

    @property
    def empty(self) -> bool:
        return not self.last_user.strip() and not any(t.strip() for t in self.earlier_user)


# Counting stops here: the heuristics of a very long prompt saturate, and scoring stays fast.
SCAN_MAX_CHARS = 4_000
# The sentence vector reads this much of the user turns (the last one first).
EMBED_MAX_CHARS = 2_000

_NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_LIST_ITEM = re.compile(r"(?m)^\s*(?:\d+[.)]|[-*\u2022])\s+")
_CODE_FENCE = re.compile(r"```|~~~")
_CODE_CHARS = re.compile(r"[{}\[\]();<>=_]")
_FRACTION = re.compile(r"\d\s*/\s*\d")

# Vocabulary heuristics: how many words (or word pairs) of each list the last user turn has.
_KEYWORDS: dict[str, tuple[str, ...]] = {
    "kw_fraction": ("half", "halves", "third", "thirds", "quarter", "quarters", "twice", "double", "triple",
                    "thrice"),
    "kw_percent": ("percent", "percentage", "percentages"),
    "kw_compare": ("more", "less", "fewer", "than", "times", "as many", "as much"),
    "kw_each": ("each", "every", "per", "apiece"),
    "kw_remaining": ("remaining", "remainder", "rest", "left", "leftover"),
    "kw_time": ("second", "seconds", "minute", "minutes", "hour", "hours", "day", "days", "week", "weeks",
                "month", "months", "year", "years"),
    "kw_money": ("dollar", "dollars", "cent", "cents", "cost", "costs", "price", "pay", "paid", "earn", "earns",
                 "sell", "sells", "sold", "buy", "buys", "bought"),
    "kw_number_word": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                       "twelve", "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million", "dozen"),
    "kw_condition": ("if", "after", "before", "then", "until", "instead", "but", "however", "while", "unless"),
    "kw_aggregate": ("average", "mean", "total", "altogether", "combined", "sum", "overall"),
    "kw_math": ("solve", "equation", "integral", "derivative", "prove", "proof", "probability", "matrix",
                "polynomial", "theorem", "sqrt", "logarithm", "prime", "divisible", "geometry", "triangle",
                "circle", "area", "volume", "function"),
    "kw_code": ("python", "java", "javascript", "cpp", "sql", "code", "program", "implement", "algorithm", "bug",
                "debug", "compile", "regex", "api", "class", "def", "return", "array", "string", "recursion",
                "complexity"),
    "kw_creative": ("write", "compose", "draft", "story", "poem", "essay", "email", "blog", "letter", "describe",
                    "imagine", "pretend", "role", "character", "slogan", "tweet", "speech", "script", "persuasive"),
    "kw_explain": ("explain", "why", "discuss", "compare", "summarise", "summarize", "summary", "opinion", "pros",
                   "cons", "advice", "tips"),
    "kw_constraint": ("must", "exactly", "at least", "at most", "no more", "only", "format", "json", "table",
                      "bullet", "list", "words", "sentences", "paragraph", "paragraphs"),
    "kw_followup": ("previous", "above", "earlier", "rewrite", "revise", "again", "now", "instead", "same",
                    "your answer"),
    "kw_extract": ("extract", "identify", "return", "output", "given", "following", "data", "text", "named",
                   "entities"),
}


def _keyword_index() -> dict[str, tuple[int, ...]]:
    index: dict[str, list[int]] = {}
    for i, words in enumerate(_KEYWORDS.values()):
        for w in words:
            index.setdefault(w, []).append(i)
    return {w: tuple(ids) for w, ids in index.items()}


_KW_INDEX = _keyword_index()
_KW_POS = {name: i for i, name in enumerate(_KEYWORDS)}

FEATURE_NAMES: tuple[str, ...] = (
    "log_chars", "log_words", "sentences", "numbers", "distinct_numbers", "decimals", "log_max_number",
    "question_marks", "lines", "list_items", "code_char_share",
    *_KEYWORDS,
    "earlier_turns", "log_earlier_chars",
)


def heuristic_features(view: PromptView) -> list[float]:
    """The named heuristics of ``FEATURE_NAMES``, from the last user turn and the turns before it."""
    full = view.last_user
    text = full[:SCAN_MAX_CHARS]
    numbers = _NUMBER.findall(text)
    values = [float(n.replace(",", "")) for n in numbers]
    n_chars = len(text)
    out = [
        math.log1p(len(full)),
        math.log1p(len(text.split())),
        float(len(_SENTENCE_END.findall(text))),
        float(len(numbers)),
        float(len(set(numbers))),
        float(sum(1 for n in numbers if "." in n)),
        math.log1p(max(values)) if values else 0.0,
        float(text.count("?")),
        float(text.count("\n")),
        float(len(_LIST_ITEM.findall(text))),
        len(_CODE_CHARS.findall(text)) / n_chars if n_chars else 0.0,
    ]
    counts = [0.0] * len(_KEYWORDS)
    previous = ""
    for word in _WORD.findall(text.lower().replace("c++", "cpp")):
        for i in _KW_INDEX.get(word, ()):
            counts[i] += 1.0
        if previous:
            for i in _KW_INDEX.get(previous + " " + word, ()):
                counts[i] += 1.0
        previous = word
    counts[_KW_POS["kw_fraction"]] += len(_FRACTION.findall(text))  # 3/4
    counts[_KW_POS["kw_percent"]] += text.count("%")
    counts[_KW_POS["kw_money"]] += text.count("$")
    out.extend(counts)
    out.append(float(len(view.earlier_user)))
    out.append(math.log1p(sum(len(t) for t in view.earlier_user)))
    return out


def hard_rule(view: PromptView) -> tuple[str, str] | None:
    """(tier, reason) when a rule decides before the classifier, else None."""
    if view.empty:
        return CHEAP, "heuristic: empty prompt"
    if _CODE_FENCE.search(view.last_user) or any(_CODE_FENCE.search(t) for t in view.earlier_user):
        return STRONG, "heuristic: code block"
    return None


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclass(frozen=True)
class LinearModel:
    """One logistic regression over (heuristics ++ embedding): ``sigmoid(bias + weights . x)``.

    Stored standardised (``mean``, ``scale``, ``coef``, ``intercept``, as trained); folded here
    into one weight vector so scoring is a dot product.
    """

    weights: F64
    bias: float

    @classmethod
    def from_standardised(cls, mean: Sequence[float], scale: Sequence[float], coef: Sequence[float],
                          intercept: float) -> LinearModel:
        m = np.asarray(mean, dtype=np.float64)
        s = np.asarray(scale, dtype=np.float64)
        c = np.asarray(coef, dtype=np.float64)
        if not (m.shape == s.shape == c.shape) or m.ndim != 1 or (s <= 0).any():
            raise ValueError("mean, scale and coef must be vectors of one length, scale > 0")
        w = c / s
        return cls(w, float(intercept - float(w @ m)))

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> LinearModel:
        return cls.from_standardised(doc["mean"], doc["scale"], doc["coef"], float(doc["intercept"]))

    def raw(self, x: F64) -> F64:
        """Log-odds of the rows of ``x``."""
        out: F64 = x @ self.weights + self.bias
        return out


def _sigmoid_array(z: F64) -> F64:
    out: F64 = 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))
    return out


class MixtureModel:
    """Two experts and a gate, all logistic regressions over the same features.

    ``g`` = the gate = how much the prompt reads like a maths word problem (trained to tell GSM8K
    prompts from MT-Bench ones); ``p_cheap_ok = g * word_problem(x) + (1 - g) * general(x)``, each
    expert trained on its own data set (GSM8K correctness; MT-Bench judge scores). One linear model
    serves both worse: the same heuristics (length, counts) mean different things in the two kinds.
    """

    def __init__(self, gate: LinearModel, word_problem: LinearModel, general: LinearModel):
        if not len(gate.weights) == len(word_problem.weights) == len(general.weights):
            raise ValueError("gate and experts must read the same features")
        self.gate, self.word_problem, self.general = gate, word_problem, general
        # One (3, n) matrix: scoring a request is one matrix-vector product.
        self._w = np.stack([gate.weights, word_problem.weights, general.weights])
        self._b = np.asarray([gate.bias, word_problem.bias, general.bias])

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> MixtureModel:
        return cls(LinearModel.from_doc(doc["gate"]), LinearModel.from_doc(doc["word_problem"]),
                   LinearModel.from_doc(doc["general"]))

    @property
    def n_features(self) -> int:
        return len(self.gate.weights)

    def p(self, x: F64) -> F64:
        """``p_cheap_ok`` of each row of ``x`` (evaluation, training)."""
        g = _sigmoid_array(self.gate.raw(x))
        out: F64 = g * _sigmoid_array(self.word_problem.raw(x)) + (1.0 - g) * _sigmoid_array(self.general.raw(x))
        return out

    def p_one(self, x: F64) -> float:
        z = self._w @ x + self._b
        g = sigmoid(float(z[0]))
        return g * sigmoid(float(z[1])) + (1.0 - g) * sigmoid(float(z[2]))


def features(view: PromptView, vectors: StaticVectors) -> F64:
    """The classifier's input: the ``FEATURE_NAMES`` heuristics, then the sentence vector of the user turns."""
    return np.concatenate([np.asarray(heuristic_features(view), dtype=np.float64),
                           vectors.embed(view.embedding_text).astype(np.float64)])


class ComplexityRouter:
    """Decides the tier of one request. No mutable state: safe to share between requests and threads."""

    def __init__(self, model: MixtureModel, vectors: StaticVectors, *, default_threshold: float,
                 threshold: float | None = None, metadata: dict[str, Any] | None = None):
        if model.n_features != len(FEATURE_NAMES) + vectors.dim:
            raise ComplexityModelError(f"the classifier reads {model.n_features} features, this code computes "
                                       f"{len(FEATURE_NAMES)} heuristics + {vectors.dim} embedding dims")
        for name, value in (("default_threshold", default_threshold), ("threshold", threshold)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.model = model
        self.vectors = vectors
        self.default_threshold = default_threshold
        self._threshold = default_threshold if threshold is None else threshold
        self.metadata = metadata or {}

    @classmethod
    def load(cls, path: Path = DEFAULT_MODEL_PATH, *, threshold: float | None = None,
             embedding_dir: Path | None = None) -> ComplexityRouter:
        """Read the classifier (``path``) and the static embedding model it was trained on.

        ``threshold``: the operating point (cheap when ``p_cheap_ok >= threshold``); None: the stored
        default. ``embedding_dir`` defaults to the model :mod:`libs.static_model` prepares (``make setup``).
        Raises :class:`ComplexityModelError` when either is missing, unreadable or does not match.
        """
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ComplexityModelError(f"complexity model not found at {path} "
                                       "(python -m tools.train_complexity writes it)") from None
        except (OSError, ValueError) as exc:
            raise ComplexityModelError(f"complexity model {path} is unreadable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != MODEL_FORMAT:
            raise ComplexityModelError(f"{path}: not a {MODEL_FORMAT} file")
        if tuple(doc.get("features", ())) != FEATURE_NAMES:
            raise ComplexityModelError(f"{path}: trained on other heuristics than this code computes; retrain it")
        try:
            model = MixtureModel.from_doc(doc["model"])
            default_threshold = float(doc["default_threshold"])
            emb = dict(doc["embedding"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ComplexityModelError(f"{path}: malformed model ({exc!r})") from None
        try:
            vectors = StaticVectors(embedding_dir or static_model.DEFAULT_DIR)
        except StaticModelMissing as exc:
            raise ComplexityModelError(str(exc)) from None
        if vectors.dim != emb.get("dim"):
            raise ComplexityModelError(f"{path}: trained on {emb.get('dim')}-dim embeddings, the model at "
                                       f"{vectors.path} has {vectors.dim}")
        router = cls(model, vectors, default_threshold=default_threshold, threshold=threshold,
                     metadata=dict(doc.get("training", {})))
        if emb.get("fingerprint") != vectors.fingerprint:
            router._check_probes(path, emb)
        return router

    def _check_probes(self, path: Path, emb: dict[str, Any]) -> None:
        """Another distillation of the embedding model (other fingerprint, e.g. other BLAS): accept it only
        when it scores the stored probe prompts as the training one did, else the weights mean nothing."""
        probes = emb.get("probes") or []
        if not probes:
            raise ComplexityModelError(f"{path}: embedding model {self.vectors.fingerprint} is not the one it was "
                                       f"trained on ({emb.get('fingerprint')}); retrain it")
        worst = max(abs(self.p_cheap_ok(PromptView(str(p["text"]))) - float(p["p"])) for p in probes)
        if worst > PROBE_TOLERANCE:
            raise ComplexityModelError(
                f"{path}: embedding model {self.vectors.fingerprint} differs from the training one "
                f"({emb.get('fingerprint')}): probe p off by {worst:.3f} > {PROBE_TOLERANCE}; retrain it")
        self.metadata = {**self.metadata, "probe_max_abs_diff": round(worst, 6)}

    @property
    def threshold(self) -> float:
        return self._threshold

    def with_threshold(self, threshold: float | None) -> ComplexityRouter:
        """The same model at another operating point (None: the stored default)."""
        return ComplexityRouter(self.model, self.vectors, default_threshold=self.default_threshold,
                                threshold=threshold, metadata=self.metadata)

    def p_cheap_ok(self, view: PromptView) -> float:
        return self.model.p_one(features(view, self.vectors))

    def decide(self, messages: Sequence[ChatMessage]) -> RouteDecision:
        view = PromptView.of(messages)
        rule = hard_rule(view)
        if rule is not None and rule[0] == CHEAP:
            return RouteDecision(CHEAP, 1.0, rule[1])
        p = self.p_cheap_ok(view)
        if rule is not None:
            return RouteDecision(rule[0], p, rule[1])
        t = self._threshold
        if p >= t:
            return RouteDecision(CHEAP, p, f"classifier p={p:.2f} >= {t:.2f}")
        return RouteDecision(STRONG, p, f"classifier p={p:.2f} < {t:.2f}")
