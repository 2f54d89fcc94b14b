"""Domain types of a generation, shared by every service, and their protobuf conversions.

The dataclasses import no gRPC. The ``*_from_proto`` / ``*_to_proto`` helpers
use only protobuf messages and live here once so every servicer translates the
same way.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tollgate.common.v1 import common_pb2

from libs.errors import Violations
from libs.validation import check_finite, check_name, check_no_nul, check_text


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"
    CONTENT_FILTER = "content_filter"


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str
    name: str = ""


@dataclass(frozen=True)
class GenerationParams:
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def deterministic(self) -> bool:
        """Greedy decoding: the same input gives the same answer, so it may be cached."""
        return self.temperature is not None and self.temperature == 0.0


@dataclass
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Principal:
    org_id: str
    team_id: str
    key_id: str


@dataclass
class GenerationChunk:
    """One event of a generation stream: a text delta, or the final usage."""

    delta: str = ""
    # Tokens in this delta when the engine knows them (vLLM); 0 = unknown.
    output_tokens: int = 0
    usage: TokenUsage | None = None
    finish_reason: FinishReason | None = None
    model: str = ""
    provider: str = ""
    extra: dict[str, str] = field(default_factory=dict)


# --- normalization and hashing -------------------------------------------------

def normalize_text(text: str) -> str:
    """Unicode NFC, trimmed, inner whitespace collapsed: formatting must not split cache keys."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def canonical_messages(messages: list[ChatMessage]) -> list[list[str]]:
    return [[m.role.value, m.name, normalize_text(m.content)] for m in messages]


def answer_changing_params(params: GenerationParams) -> dict[str, object]:
    """The generation parameters that change the answer (everything but transport details)."""
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_output_tokens": params.max_output_tokens,
        "stop": sorted(params.stop),
        "seed": params.seed,
    }


def stable_hash(*parts: object) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def system_prompt_hash(messages: list[ChatMessage]) -> str:
    system = [normalize_text(m.content) for m in messages if m.role is Role.SYSTEM]
    return stable_hash(system)[:16] if system else ""


# --- protobuf conversions -------------------------------------------------------

_ROLE_FROM_PROTO = {
    common_pb2.MESSAGE_ROLE_SYSTEM: Role.SYSTEM,
    common_pb2.MESSAGE_ROLE_USER: Role.USER,
    common_pb2.MESSAGE_ROLE_ASSISTANT: Role.ASSISTANT,
    common_pb2.MESSAGE_ROLE_TOOL: Role.TOOL,
}
_ROLE_TO_PROTO = {v: k for k, v in _ROLE_FROM_PROTO.items()}

_FINISH_TO_PROTO = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
    FinishReason.CONTENT_FILTER: common_pb2.FINISH_REASON_CONTENT_FILTER,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def role_from_proto(value: int) -> Role | None:
    return _ROLE_FROM_PROTO.get(value)  # type: ignore[call-overload, no-any-return]


def messages_from_proto(messages: Iterable[common_pb2.ChatMessage]) -> list[ChatMessage]:
    """Convert validated messages (roles must already be known)."""
    return [ChatMessage(_ROLE_FROM_PROTO[m.role], m.content, m.name) for m in messages]


def messages_to_proto(messages: list[ChatMessage]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=_ROLE_TO_PROTO[m.role], content=m.content, name=m.name) for m in messages]


def params_from_proto(p: common_pb2.GenerationParams) -> GenerationParams:
    return GenerationParams(
        temperature=p.temperature if p.HasField("temperature") else None,
        top_p=p.top_p if p.HasField("top_p") else None,
        max_output_tokens=p.max_output_tokens,
        stop=tuple(p.stop),
        seed=p.seed if p.HasField("seed") else None,
    )


def params_to_proto(p: GenerationParams) -> common_pb2.GenerationParams:
    msg = common_pb2.GenerationParams(max_output_tokens=p.max_output_tokens, stop=list(p.stop))
    if p.temperature is not None:
        msg.temperature = p.temperature
    if p.top_p is not None:
        msg.top_p = p.top_p
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def usage_from_proto(u: common_pb2.TokenUsage) -> TokenUsage:
    return TokenUsage(u.input_tokens, u.output_tokens, u.cached_input_tokens)


def usage_to_proto(u: TokenUsage) -> common_pb2.TokenUsage:
    return common_pb2.TokenUsage(input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                                 cached_input_tokens=u.cached_input_tokens)


def finish_to_proto(f: FinishReason | None) -> Any:
    return _FINISH_TO_PROTO.get(f, common_pb2.FINISH_REASON_UNSPECIFIED) if f else common_pb2.FINISH_REASON_UNSPECIFIED


def finish_from_proto(value: int) -> FinishReason | None:
    return _FINISH_FROM_PROTO.get(value)  # type: ignore[call-overload, no-any-return]


# Limits of the shared request validation (the router, cache and inference services all apply them;
# documented in tollgate/common/v1/common.proto and docs/architecture.md).
MAX_MESSAGES = 256
MAX_MESSAGES_CHARS = 1_000_000  # all message contents together
MAX_MESSAGE_NAME_CHARS = 64  # ChatMessage.name (OpenAI's limit)
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 128
MAX_OUTPUT_TOKENS = 32_768
# A token price, wherever one is accepted (router prices, cache savings): at most $1,000,000 per million
# tokens, so price x tokens / 1e6 stays far inside 64-bit counters (the ledger's bigint, Redis's integers).
MAX_PRICE_NANO_USD_PER_MTOK = 10**15


def validate_messages(messages: Iterable[common_pb2.ChatMessage], violations: Violations,
                      field_prefix: str = "messages", max_messages: int = MAX_MESSAGES,
                      max_chars: int = MAX_MESSAGES_CHARS) -> None:
    """Shared request validation for a list of proto ChatMessages.

    Content is free text: only NUL is refused (no backend or store can carry it); other control
    characters are the caller's business. A name is one line without control characters.
    """
    items = list(messages)
    if not items:
        violations.add(field_prefix, "at least one message is required")
        return
    if len(items) > max_messages:
        violations.add(field_prefix, f"at most {max_messages} messages")
        return  # the items of a list that is refused anyway are not worth checking one by one
    total = 0
    for i, m in enumerate(items):
        if m.role not in _ROLE_FROM_PROTO:
            violations.add(f"{field_prefix}[{i}].role", "role must be system, user, assistant or tool")
        total += len(m.content)
        check_no_nul(violations, m.content, f"{field_prefix}[{i}].content")
        check_name(violations, m.name, f"{field_prefix}[{i}].name", max_chars=MAX_MESSAGE_NAME_CHARS)
    if total > max_chars:
        violations.add(field_prefix, f"messages exceed {max_chars} characters in total")
    if items and items[-1].role == common_pb2.MESSAGE_ROLE_SYSTEM:
        violations.add(f"{field_prefix}[{len(items) - 1}].role", "the last message must not be a system message")


def validate_params(p: common_pb2.GenerationParams, violations: Violations, field_prefix: str = "params",
                    max_output_tokens: int = MAX_OUTPUT_TOKENS) -> None:
    """Shared validation of sampling parameters: finite and in range, bounded stop sequences."""
    if p.HasField("temperature"):
        check_finite(violations, p.temperature, f"{field_prefix}.temperature")
        if not 0.0 <= p.temperature <= 2.0:
            violations.add(f"{field_prefix}.temperature", "must be between 0 and 2")
    if p.HasField("top_p"):
        check_finite(violations, p.top_p, f"{field_prefix}.top_p")
        if not 0.0 < p.top_p <= 1.0:
            violations.add(f"{field_prefix}.top_p", "must be in (0, 1]")
    if p.max_output_tokens > max_output_tokens:
        violations.add(f"{field_prefix}.max_output_tokens", f"must be at most {max_output_tokens}")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        violations.add(f"{field_prefix}.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    else:
        for i, stop in enumerate(p.stop):
            check_text(violations, stop, f"{field_prefix}.stop[{i}]", max_chars=MAX_STOP_CHARS, required=True)
