"""Domain types of the response cache (no gRPC, no Redis)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from libs.chat import ChatMessage, GenerationParams, TokenUsage


class TierKind(StrEnum):
    EXACT = "exact"
    SEMANTIC = "semantic"


class Counter(StrEnum):
    """Per-tenant statistics counters (also the Redis hash fields)."""

    EXACT_HITS = "exact_hits"
    SEMANTIC_HITS = "semantic_hits"
    MISSES = "misses"
    STORES = "stores"
    # Per tier: lookups a tier was asked and could not answer.
    EXACT_MISSES = "exact_misses"
    SEMANTIC_MISSES = "semantic_misses"
    # Near-duplicates the verifier refused (each is a wrong answer the naive cosine cache would have served).
    SEMANTIC_REJECTIONS = "semantic_rejections"
    # Dollars saved by hits, at the price the router passed with each lookup (nano-USD).
    SAVED_NANO_USD = "saved_nano_usd"


@dataclass(frozen=True)
class Namespace:
    """Entries only ever match inside one namespace; the tenant is what isolates customers."""

    tenant_id: str
    model_class: str = ""
    system_prompt_hash: str = ""
    prompt_version: str = ""


@dataclass(frozen=True)
class CacheKey:
    """What identifies a cacheable generation."""

    namespace: Namespace
    model: str
    messages: tuple[ChatMessage, ...]
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(frozen=True)
class LookupOptions:
    # Ask only the exact tier (the semantic tier is slower and approximate).
    exact_only: bool = False
    # Accept only entries at most this old; 0 means any live entry.
    max_age_s: float = 0.0
    # Accept entries that are past their TTL (or older than max_age_s) but still retained.
    allow_stale: bool = False
    # Verifier operating point for this request; None: the namespace's (or the model's default).
    semantic_threshold: float | None = None
    # What a generation costs in this namespace, for the "saved" statistics (None: not counted).
    price: TokenPrice | None = None


@dataclass(frozen=True)
class TokenPrice:
    """Nano-USD per million tokens (the router's price units)."""

    input_per_mtok: int = 0
    output_per_mtok: int = 0
    cached_input_per_mtok: int = 0

    def cost(self, usage: TokenUsage) -> int:
        """What the cached generation would cost again; the router's formula (cached input at its rate, once)."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        fresh = usage.input_tokens - cached
        total = (fresh * self.input_per_mtok + cached * self.cached_input_per_mtok
                 + usage.output_tokens * self.output_per_mtok)
        return (total + 500_000) // 1_000_000


@dataclass(frozen=True)
class CacheHit:
    tier: TierKind
    entry_id: str
    content: str
    usage: TokenUsage
    model: str
    stored_at: float
    expires_at: float
    stale: bool = False
    similarity: float = 1.0


@dataclass(frozen=True)
class NewEntry:
    content: str
    usage: TokenUsage
    ttl_s: int


@dataclass(frozen=True)
class InvalidationScope:
    """A tenant's entries, optionally only one model class and/or prompt version (None: all)."""

    tenant_id: str
    model_class: str | None = None
    prompt_version: str | None = None

    def matches(self, model_class: str, prompt_version: str) -> bool:
        return ((self.model_class is None or self.model_class == model_class)
                and (self.prompt_version is None or self.prompt_version == prompt_version))


@dataclass(frozen=True)
class TierHealth:
    degraded: bool = False
    detail: str = ""


@dataclass(frozen=True)
class CacheStats:
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    stores: int = 0
    degraded: bool = False
    degraded_detail: str = ""
    exact_misses: int = 0
    semantic_misses: int = 0
    semantic_rejections: int = 0
    saved_nano_usd: int = 0
    namespaces: tuple[NamespaceStats, ...] = ()

    @classmethod
    def from_counts(cls, counts: dict[str, int], **kw: object) -> CacheStats:
        return cls(**{c.value: counts.get(c.value, 0) for c in Counter}, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NamespaceStats:
    namespace: Namespace
    counts: dict[str, int]


def staleness(stored_at: float, expires_at: float, now: float, options: LookupOptions) -> bool | None:
    """Whether a retained entry may answer: False (fresh), True (stale, allowed) or None (unusable).

    Fresh means before its expiry and, when the caller bounds it, no older than max_age_s.
    allow_stale relaxes both: on the degraded path any retained answer beats none.
    """
    age = now - stored_at
    fresh = now < expires_at and (options.max_age_s <= 0 or age <= options.max_age_s)
    if fresh:
        return False
    return True if options.allow_stale else None
