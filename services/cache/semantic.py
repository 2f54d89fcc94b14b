"""The semantic tier: embed the last user turn, search its context in the vector store, verify.

Matching rules:
- Only the *last user turn* is compared by meaning. Everything before it (system prompt,
  earlier turns), the namespace, the model and the answer-changing parameters go into an
  exact *context id*, and a search only sees points of the same tenant and context id.
  A follow-up therefore matches only when the earlier turns match.
- Candidates come back best cosine first (at most ``candidates``, above a loose floor);
  each is checked by the verifier at the namespace's operating point, and the first one
  accepted is served. The cosine alone never serves anything.
- When the vector store fails, the tier answers "miss" (the exact tier still serves) and
  reports itself degraded; it tries the store again after ``recheck_s``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from libs.chat import Role, TokenUsage, answer_changing_params, canonical_messages, normalize_text, stable_hash
from libs.errors import Unavailable
from services.cache.domain import (
    CacheHit,
    CacheKey,
    InvalidationScope,
    LookupOptions,
    NewEntry,
    TierHealth,
    TierKind,
    staleness,
)
from services.cache.embedding import Analysis, AnalyzingEmbedder
from services.cache.vectors import CONTEXT, MODEL_CLASS, PROMPT_VERSION, RETAIN_UNTIL, TENANT, VectorStore
from services.cache.verifier import Verifier

log = logging.getLogger(__name__)

CONTEXT_VERSION = "semantic/v1"


def context_id(key: CacheKey, embedder_fingerprint: str) -> str:
    """Everything that must match exactly for a semantic hit: all but the last turn, and more.

    The embedder's fingerprint is in it, so vectors from another model are never compared.
    """
    ns = key.namespace
    return stable_hash(CONTEXT_VERSION, embedder_fingerprint,
                       [ns.tenant_id, ns.model_class, ns.system_prompt_hash, ns.prompt_version], key.model,
                       canonical_messages(list(key.messages[:-1])), answer_changing_params(key.params))[:32]


def semantic_prompt(key: CacheKey, max_chars: int) -> str | None:
    """The text compared by meaning: the last turn, if it is the user's and not too long."""
    if not key.messages:
        return None
    last = key.messages[-1]
    text = normalize_text(last.content)
    if last.role is not Role.USER or not text or len(text) > max_chars:
        return None
    return text


def _analysis_bytes(a: Analysis) -> int:
    # The arrays, the text, and a rough 100 bytes per word for its two strings.
    return a.vector.nbytes + a.word_vectors.nbytes + a.word_weights.nbytes + len(a.text) + 100 * len(a.words)


class UnavailableTier:
    """Stands in for the semantic tier when its model could not be loaded: never answers, reports why."""

    kind = TierKind.SEMANTIC

    def __init__(self, detail: str):
        self._detail = detail

    async def lookup(self, key: CacheKey, options: LookupOptions, now: float) -> CacheHit | None:
        return None

    async def store(self, key: CacheKey, entry: NewEntry, now: float) -> str:
        return ""

    async def invalidate(self, scope: InvalidationScope) -> int:
        return 0

    def health(self) -> TierHealth:
        return TierHealth(True, self._detail)


@dataclass(frozen=True)
class SemanticPolicy:
    """Per-namespace behaviour of the semantic tier."""

    enabled: bool = True
    threshold: float | None = None  # verifier operating point; None: the model's default


class SemanticTier:
    kind = TierKind.SEMANTIC

    def __init__(self, store: VectorStore, embedder: AnalyzingEmbedder, verifier: Verifier, *, stale_window_s: float,
                 policy: Callable[[CacheKey], SemanticPolicy] = lambda _k: SemanticPolicy(),
                 on_rejected: Callable[[CacheKey, str], None] = lambda _k, _r: None,
                 candidates: int = 4, min_cosine: float = 0.5, max_prompt_chars: int = 2000,
                 recheck_s: float = 5.0, analysis_cache: int = 4096, analysis_cache_bytes: int = 16 * 1024 * 1024,
                 monotonic: Callable[[], float] = time.monotonic):
        self._store = store
        self._embedder = embedder
        self._verifier = verifier
        self._stale_window_s = stale_window_s
        self._policy = policy
        self._on_rejected = on_rejected
        self._candidates = candidates
        self._min_cosine = min_cosine
        self._max_prompt_chars = max_prompt_chars
        self._recheck_s = recheck_s
        self._monotonic = monotonic
        self._down_until = 0.0
        self._down_since: float | None = None
        self._last_error = ""
        # Cached prompts are analysed again on every candidate check; keep the recent ones, bounded by count
        # and by bytes (an analysis holds a vector per word: ~1 KiB a word, up to 512 words a prompt).
        self._analyses: OrderedDict[str, Analysis] = OrderedDict()
        self._analysis_cache = analysis_cache
        self._analysis_cache_bytes = analysis_cache_bytes
        self._analyses_bytes = 0

    # --- CacheTier ---
    async def lookup(self, key: CacheKey, options: LookupOptions, now: float) -> CacheHit | None:
        policy = self._policy(key)
        text = semantic_prompt(key, self._max_prompt_chars)
        if not policy.enabled or text is None or not self._available():
            return None
        query = self._embedder.analyze(text)
        try:
            found = await self._store.search(query.vector, key.namespace.tenant_id,
                                             context_id(key, self._embedder.fingerprint), now,
                                             self._candidates, self._min_cosine)
        except Exception as exc:  # any store fault: the exact tier still answers
            self._fault(exc)
            return None
        self._ok()
        threshold = options.semantic_threshold or policy.threshold
        for cand in found:
            p = cand.payload
            try:
                stored_at, expires_at = float(p["stored_at"]), float(p["expires_at"])
                prompt = str(p["prompt"])
            except (KeyError, TypeError, ValueError):
                continue
            stale = staleness(stored_at, expires_at, now, options)
            if stale is None:
                continue
            verdict = self._verifier.verify(query, self._analysis(cand.point_id, prompt), threshold)
            if not verdict.accept:
                self._on_rejected(key, verdict.reason)
                continue
            usage = p.get("usage") or [0, 0, 0]
            return CacheHit(tier=TierKind.SEMANTIC, entry_id=f"semantic:{cand.point_id}", content=str(p["content"]),
                            usage=TokenUsage(int(usage[0]), int(usage[1]), int(usage[2])), model=str(p["model"]),
                            stored_at=stored_at, expires_at=expires_at, stale=stale, similarity=verdict.score)
        return None

    async def store(self, key: CacheKey, entry: NewEntry, now: float) -> str:
        """Returns the entry id, or "" when this request has no semantic entry (not eligible, store down)."""
        text = semantic_prompt(key, self._max_prompt_chars)
        if not self._policy(key).enabled or text is None or not self._available():
            return ""
        ctx = context_id(key, self._embedder.fingerprint)
        # One point per (context, prompt): storing the same question again replaces its answer.
        point_id = str(uuid.UUID(stable_hash(ctx, text)[:32]))
        analysis = self._embedder.analyze(text)
        ns = key.namespace
        u = entry.usage
        payload: Mapping[str, Any] = {
            TENANT: ns.tenant_id, CONTEXT: ctx, MODEL_CLASS: ns.model_class, PROMPT_VERSION: ns.prompt_version,
            RETAIN_UNTIL: now + entry.ttl_s + self._stale_window_s,
            "prompt": text, "content": entry.content, "model": key.model,
            "usage": [u.input_tokens, u.output_tokens, u.cached_input_tokens],
            "stored_at": round(now, 3), "expires_at": round(now + entry.ttl_s, 3),
        }
        try:
            await self._store.upsert(point_id, analysis.vector, payload)
        except Exception as exc:
            self._fault(exc)
            return ""
        self._ok()
        self._forget_analysis(point_id)
        return f"semantic:{point_id}"

    async def invalidate(self, scope: InvalidationScope) -> int:
        # Not skipped while degraded: a stale answer must not come back when the store does.
        try:
            removed = await self._store.delete(scope)
        except Exception as exc:
            self._fault(exc)
            raise Unavailable("vector store unreachable: semantic entries not invalidated, retry",
                              reason="BACKEND_ERROR") from exc
        self._ok()
        return removed

    async def sweep(self, now: float) -> int:
        try:
            return await self._store.sweep(now)
        except Exception as exc:
            self._fault(exc)
            return 0

    def health(self) -> TierHealth:
        if self._down_since is None:
            return TierHealth()
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._down_since))
        return TierHealth(True, f"vector store unreachable since {since} ({self._last_error}); "
                                "semantic tier off, exact tier only")

    # --- internals ---
    def _analysis(self, point_id: str, prompt: str) -> Analysis:
        a = self._analyses.get(point_id)
        if a is not None and a.text == prompt:
            self._analyses.move_to_end(point_id)
            return a
        self._forget_analysis(point_id)
        a = self._embedder.analyze(prompt)
        self._analyses[point_id] = a
        self._analyses_bytes += _analysis_bytes(a)
        while len(self._analyses) > self._analysis_cache or self._analyses_bytes > self._analysis_cache_bytes:
            self._forget_analysis(next(iter(self._analyses)))
        return a

    def _forget_analysis(self, point_id: str) -> None:
        a = self._analyses.pop(point_id, None)
        if a is not None:
            self._analyses_bytes -= _analysis_bytes(a)

    @property
    def analysis_cache_bytes(self) -> int:
        """What the cached analyses hold (approximately)."""
        return self._analyses_bytes

    def _available(self) -> bool:
        # While down, requests skip the store until the recheck time; then one tries it again.
        return self._down_since is None or self._monotonic() >= self._down_until

    def _fault(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}"[:200]
        self._down_until = self._monotonic() + self._recheck_s
        if self._down_since is None:
            self._down_since = time.time()
            log.warning("vector store failed (%s); semantic tier off until it answers again", type(exc).__name__)

    def _ok(self) -> None:
        if self._down_since is not None:
            log.info("vector store answering again; semantic tier back on")
            self._down_since = None
