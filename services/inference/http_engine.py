"""What the HTTP provider engines share: one pooled client, deadline-bounded streaming, error mapping.

Every request is bounded by its :class:`~libs.deadlines.Deadline`: httpx's
timeouts come from ``deadline.remaining()`` and each read of the stream is
additionally wrapped in its own timeout (a provider that drips bytes slower
than the deadline allows is cut off too). When the time runs out the error
says whose time it was: the caller's (``DeadlineExceeded``) or this service's
cap or idle limit (``Unavailable(reason="BACKEND_TIMEOUT")``, a backend fault).

Closing the event iterator closes the HTTP response, which drops the
connection of an unfinished stream: the provider sees the disconnect and stops
generating (and billing).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import httpx

from libs.chat import ChatMessage, TokenUsage
from libs.deadlines import Deadline
from libs.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    QuotaViolation,
    TollgateError,
    Unavailable,
)
from services.inference.engine import USAGE_ESTIMATED, EngineLoad, ServedModel
from services.inference.sse import SSEDecoder, SSEEvent, SSEProtocolError
from services.inference.tokenizer import EstimatingCounter, TokenCounter

log = logging.getLogger(__name__)

PROVIDER_RATE_LIMITED = "PROVIDER_RATE_LIMITED"
# Used when a 429 carries no Retry-After.
DEFAULT_RATE_LIMIT_RETRY_S = 1.0
# Error bodies are read only this far (they are parsed for a message, never logged).
_MAX_ERROR_BODY_BYTES = 64 * 1024
_MAX_ERROR_MESSAGE_CHARS = 300
# After the provider's end-of-stream marker, how long to wait for the body to end so the
# connection can go back to the pool (otherwise it is closed).
_DRAIN_S = 0.5


def provider_rate_limited(provider: str, retry_after_s: float | None, detail: str = "") -> QuotaExceeded:
    """The provider's 429: RESOURCE_EXHAUSTED with QuotaFailure + RetryInfo; not a backend fault."""
    message = f"{provider} rate limit reached" + (f": {detail}" if detail else "")
    error = QuotaExceeded(message, [QuotaViolation(subject=f"provider:{provider}", description="provider rate limit")],
                          retry_after_s=retry_after_s if retry_after_s is not None else DEFAULT_RATE_LIMIT_RETRY_S)
    error.reason = PROVIDER_RATE_LIMITED
    return error


def malformed(detail: str) -> Unavailable:
    return Unavailable(f"malformed response from provider: {detail}", reason="BACKEND_ERROR")


def stream_error(provider: str, error: Any) -> Unavailable:
    """An error event sent mid-stream: the provider failed after answering 200."""
    message = error.get("message") if isinstance(error, dict) else error
    text = str(message or "unknown error")[:_MAX_ERROR_MESSAGE_CHARS]
    return Unavailable(f"{provider} failed mid-stream: {text}", reason="BACKEND_ERROR")


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000.0)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# Provider parameter names (OpenAI's error "param") -> our request fields.
_PARAM_FIELDS = {
    "messages": "messages",
    "system": "messages",
    "max_tokens": "params.max_output_tokens",
    "max_completion_tokens": "params.max_output_tokens",
    "temperature": "params.temperature",
    "top_p": "params.top_p",
    "stop": "params.stop",
    "stop_sequences": "params.stop",
    "seed": "params.seed",
    "model": "model",
}


def _error_details(payload: Any) -> tuple[str, str]:
    """(message, request field) from an OpenAI- or Anthropic-style error body."""
    message, param = "", ""
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("type") or "")
            param = str(err.get("param") or "")
        elif isinstance(err, str):
            message = err
    head = param.split(".", 1)[0].split("[", 1)[0]
    return message[:_MAX_ERROR_MESSAGE_CHARS], _PARAM_FIELDS.get(head, "messages")


class HttpEngineBase:
    """Shared machinery; subclasses build the request body and interpret the events."""

    provider: str

    def __init__(
        self,
        *,
        provider: str,
        base_url: str,
        models: Sequence[ServedModel],
        headers: dict[str, str],
        connect_timeout_s: float = 5.0,
        stream_idle_timeout_s: float = 60.0,
        deadline_margin_s: float = 0.02,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        counter: TokenCounter | None = None,
    ):
        self.provider = provider
        self._counter: TokenCounter = counter or EstimatingCounter()
        self._models = {m.name: m for m in models}
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = stream_idle_timeout_s
        self._margin_s = deadline_margin_s
        self._running = 0
        # One pooled client for the engine's lifetime: keep-alive connections are reused across requests.
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(stream_idle_timeout_s, connect=connect_timeout_s),
            transport=transport,
            follow_redirects=False,
        )

    # --- Engine API shared by the HTTP engines ---------------------------------------

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def load(self) -> EngineLoad:
        return EngineLoad(running=self._running)

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        self._resolve(model)
        return self._counter.prompt_tokens(messages)

    def counted_usage(self, messages: Sequence[ChatMessage], output: str) -> tuple[TokenUsage, dict[str, str]]:
        """Usage for a stream that reported none: the tokenizer's count, or an estimate marked as such."""
        usage = TokenUsage(self._counter.prompt_tokens(messages), self._counter.text_tokens(output))
        return usage, ({} if self._counter.exact else {USAGE_ESTIMATED: "true"})

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- helpers -------------------------------------------------------------------

    def _resolve(self, model: str) -> ServedModel:
        served = self._models.get(model)
        if served is None:
            raise NotFound(f"model {model!r} is not served by this engine")
        return served

    def _budget(self, deadline: Deadline, where: str = "before the provider answered") -> tuple[float, bool]:
        """(timeout for the next wait, whether that timeout is the request's deadline)."""
        left = deadline.remaining() - self._margin_s
        if left <= 0.001:
            raise self._timeout_error(deadline, True, where)
        if left > self._idle_timeout_s:
            return self._idle_timeout_s, False
        return left, True

    def _timeout_error(self, deadline: Deadline, deadline_bound: bool, where: str) -> TollgateError:
        if deadline_bound and deadline.from_caller:
            return DeadlineExceeded(f"deadline exceeded {where}")
        return Unavailable(f"{self.provider} timed out {where}", reason="BACKEND_TIMEOUT")

    def _transport_error(self, exc: httpx.HTTPError) -> TollgateError:
        kind = type(exc).__name__
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return Unavailable(f"cannot connect to {self.provider} ({kind})", reason="UNAVAILABLE")
        if isinstance(exc, httpx.DecodingError):
            return malformed(f"undecodable body ({kind})")
        return Unavailable(f"{self.provider} connection failed ({kind})", reason="BACKEND_ERROR")

    async def _send(self, request_id: str, path: str, body: dict[str, Any], deadline: Deadline) -> httpx.Response:
        """POST and wait for the response head; a non-stream or error answer is raised as a domain error."""
        timeout, bound = self._budget(deadline)
        connect = min(timeout, self._connect_timeout_s)
        request = self._client.build_request(
            "POST", path, json=body, headers={"x-request-id": request_id},
            timeout=httpx.Timeout(timeout, connect=connect, pool=timeout),
        )
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.send(request, stream=True)
        except httpx.ConnectTimeout as exc:
            if connect < timeout:
                raise self._transport_error(exc) from None
            raise self._timeout_error(deadline, bound, "connecting to the provider") from None
        except (TimeoutError, httpx.TimeoutException):
            raise self._timeout_error(deadline, bound, "waiting for the provider to answer") from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        try:
            if response.status_code >= 400:
                raise self._status_error(response, await self._read_error_body(response, deadline))
            content_type = response.headers.get("content-type", "")
            if "text/event-stream" not in content_type:
                raise malformed(f"expected an event stream, got {content_type.split(';')[0] or 'no content type'}")
        except BaseException:
            await self._close(response)
            raise
        return response

    async def _read_error_body(self, response: httpx.Response, deadline: Deadline) -> Any:
        data = b""
        try:
            timeout, _ = self._budget(deadline)
            async with asyncio.timeout(min(timeout, 2.0)):
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) >= _MAX_ERROR_BODY_BYTES:
                        break
        except (TollgateError, TimeoutError, httpx.HTTPError):
            pass
        try:
            return json.loads(data)
        except ValueError:
            return None

    def _status_error(self, response: httpx.Response, payload: Any) -> TollgateError:
        status = response.status_code
        message, field = _error_details(payload)
        retry_after = parse_retry_after(response.headers)
        detail = f": {message}" if message else ""
        if status == 429:
            return provider_rate_limited(self.provider, retry_after, message)
        if status >= 500:
            return Unavailable(f"{self.provider} answered {status}{detail}", reason="BACKEND_ERROR",
                               retry_after_s=retry_after)
        if status == 408:
            return Unavailable(f"{self.provider} timed out (408){detail}", reason="BACKEND_TIMEOUT",
                               retry_after_s=retry_after)
        if status in (400, 413, 422):
            return InvalidArgument([FieldViolation(field, f"rejected by {self.provider}{detail}")],
                                   f"{self.provider} rejected the request ({status}){detail}")
        if status in (401, 403):
            return FailedPrecondition(f"{self.provider} rejected this service's credentials ({status})",
                                      reason="PROVIDER_AUTH_FAILED")
        if status == 404:
            return FailedPrecondition(f"{self.provider} does not know the configured model or path (404){detail}",
                                      reason="PROVIDER_NOT_FOUND")
        return FailedPrecondition(f"{self.provider} refused the request ({status}){detail}", reason="PROVIDER_REJECTED")

    async def _close(self, response: httpx.Response) -> None:
        with contextlib.suppress(Exception):
            await response.aclose()

    async def _drain(self, events: AsyncIterator[object]) -> None:
        """Read what follows the end-of-stream marker, briefly, so the kept-alive connection is reusable."""
        try:
            async with asyncio.timeout(_DRAIN_S):
                async for _ in events:
                    pass
        except (TimeoutError, TollgateError):
            pass

    async def _event_batches(self, request_id: str, path: str, body: dict[str, Any],
                             deadline: Deadline) -> AsyncGenerator[list[SSEEvent], None]:
        """The provider's events, one list per network read; closing this iterator closes the HTTP response.
        The engines merge the deltas that arrived together into one chunk, so a fast provider costs one gRPC
        message per read, not one per token."""
        response = await self._send(request_id, path, body, deadline)
        decoder = SSEDecoder()
        chunks = response.aiter_bytes()
        try:
            while True:
                timeout, bound = self._budget(deadline, "in the middle of the stream")
                try:
                    async with asyncio.timeout(timeout):
                        chunk = await anext(chunks, None)
                except (TimeoutError, httpx.TimeoutException):
                    raise self._timeout_error(deadline, bound, "in the middle of the stream") from None
                except httpx.HTTPError as exc:
                    raise self._transport_error(exc) from None
                try:
                    events = decoder.close() if chunk is None else decoder.feed(chunk)
                except SSEProtocolError as exc:
                    raise malformed(str(exc)) from None
                if events:
                    yield list(events)
                if chunk is None:
                    return
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
            await self._close(response)


def parse_json(event: SSEEvent) -> dict[str, Any]:
    try:
        value = json.loads(event.data)
    except ValueError:
        raise malformed(f"event {event.event!r} is not JSON") from None
    if not isinstance(value, dict):
        raise malformed(f"event {event.event!r} is not a JSON object")
    return value


def as_int(value: Any) -> int:
    """A token count from a provider's JSON (missing, null or junk -> 0)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float):
        return max(0, int(value))
    return 0
