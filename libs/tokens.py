"""Token estimates for when no tokenizer or usage report is at hand.

About four characters a token for English text with BPE tokenizers; used for
rate-limit reservations (corrected at commit) and for billing a stream that was
cut off before the engine reported usage. Exact counts always win when known.
"""

from __future__ import annotations

from collections.abc import Iterable

# Chat templates add a few tokens per message (role markers, separators).
PER_MESSAGE_OVERHEAD = 4


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def estimate_prompt_tokens(contents: Iterable[str]) -> int:
    return sum(estimate_tokens(c) + PER_MESSAGE_OVERHEAD for c in contents)
