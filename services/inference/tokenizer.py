"""Counting tokens for engines whose provider may not report them.

A provider's usage report is the truth. When a stream omits it, an HTTP engine
counts with the model's own tokenizer if one is configured
(``TOLLGATE_INFERENCE_TOKENIZER_PATH``: a local Hugging Face tokenizer folder,
loaded offline), else it estimates and marks the usage as estimated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from libs.chat import ChatMessage
from libs.tokens import estimate_prompt_tokens, estimate_tokens


class TokenCounter(Protocol):
    # False when the counts are estimates (the result is then marked usage_estimated).
    exact: bool

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int: ...

    def text_tokens(self, text: str) -> int: ...


class EstimatingCounter:
    exact = False

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return estimate_prompt_tokens(m.content for m in messages)

    def text_tokens(self, text: str) -> int:
        return estimate_tokens(text)


class HfTokenizerCounter:
    """Counts with a Hugging Face tokenizer from a local folder; the prompt through its chat template."""

    exact = True

    def __init__(self, path: Path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self._tokenizer: Any = AutoTokenizer.from_pretrained(str(path))

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        chat = [{"role": m.role.value, "content": m.content} for m in messages]
        if self._tokenizer.chat_template:
            text = self._tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            return len(self._tokenizer.encode(text, add_special_tokens=False))
        return sum(len(self._tokenizer.encode(m.content, add_special_tokens=False)) for m in messages)

    def text_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))


def counter_for(path: str) -> TokenCounter:
    return HfTokenizerCounter(Path(path)) if path else EstimatingCounter()
