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
