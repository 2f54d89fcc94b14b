"""The exact-tier cache key.

One SHA-256 over the whole namespace (tenant first), the model, every turn of the
conversation after normalization, and the parameters that change the answer. All
turns count, so a follow-up question only matches when the earlier turns match too.
The tenant is hashed in *and* is part of the Redis key layout (see ``exact.py``).
"""

from __future__ import annotations

from libs.chat import answer_changing_params, canonical_messages, stable_hash
from services.cache.domain import CacheKey

# Bump when the key's composition changes: old entries then simply stop matching.
KEY_VERSION = "exact/v1"


def exact_key(key: CacheKey) -> str:
    ns = key.namespace
    return stable_hash(
        KEY_VERSION,
        [ns.tenant_id, ns.model_class, ns.system_prompt_hash, ns.prompt_version],
        key.model,
        canonical_messages(list(key.messages)),
        answer_changing_params(key.params),
    )


def exact_entry_id(key_hash: str) -> str:
    """The id reported for an exact entry (a truncated key hash: enough to correlate, nothing more)."""
    return f"exact:{key_hash[:32]}"
