"""Calling another service: reused channels, a bounded timeout per hop, a breaker per downstream.

Every call goes through :class:`Downstream`, which
- takes its timeout from the request's :class:`~libs.deadlines.Deadline` minus a margin, capped per hop;
- runs inside the downstream's :class:`~libs.breaker.Breaker`;
- turns ``AioRpcError`` into domain errors, telling a timeout the backend caused
  (counts against its breaker) from the caller's deadline running out (does not): DEADLINE_EXCEEDED is
  the caller's only when the deadline came from the caller (``Deadline.from_caller``; a side call's
  ``within`` leash that binds is not) and it, not the hop's cap, was the binding limit. Otherwise it is
  ``Unavailable(BACKEND_TIMEOUT)``, and ``timeout_trip`` of those in a row open the breaker, after
  which calls fail at once with ``BreakerOpen`` (no wait).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from libs.breaker import Breaker
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, Unavailable
from libs.grpc_errors import domain_error_from_rpc
from libs.telemetry import client_interceptors

# Metadata a trusted proxy (the HTTP edge) sets to the address of the client it serves; the router
# believes it only from peers in TOLLGATE_ROUTER_TRUSTED_PROXIES.
CLIENT_IP_METADATA = "x-tollgate-client-ip"
# The router's id of a generation, in the trailing metadata of every Generate/GenerateStream call (errors
# included) and in the initial metadata of a stream that got past authentication; the usage ledger's key.
REQUEST_ID_METADATA = "x-request-id"

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # Fail fast while a backend is down instead of waiting for reconnect backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def open_channel(target: str, *, tracing: bool = False) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS, interceptors=client_interceptors(tracing))


def rpc_error_to_domain(err: grpc.aio.AioRpcError, *, caller_bound: bool, target: str) -> BaseException:
    """Map a downstream failure; ``caller_bound`` says the hop's timeout came from the caller's deadline."""
    code = err.code()
    if code == grpc.StatusCode.CANCELLED:
        return asyncio.CancelledError()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        if caller_bound:
            return DeadlineExceeded(f"deadline exceeded waiting for {target}")
        return Unavailable(f"{target} did not answer in time", reason="BACKEND_TIMEOUT")
    if code == grpc.StatusCode.UNAVAILABLE:
        downstream = domain_error_from_rpc(err)
        # Keep the downstream's retry hint; the reason here is about *this* hop.
        return Unavailable(f"{target} unavailable: {err.details()}", reason="UNAVAILABLE",
                           retry_after_s=getattr(downstream, "retry_after_s", None),
                           metadata={"downstream_reason": downstream.reason})
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
                grpc.StatusCode.UNIMPLEMENTED):
        return Unavailable(f"{target} failed: {err.details()}", reason="BACKEND_ERROR")
    return domain_error_from_rpc(err)


class Downstream:
    """One downstream service: a channel, a breaker and per-hop timing rules."""

    def __init__(self, name: str, target: str, *, margin_s: float, cap_s: float,
                 breaker: Breaker | None = None, tracing: bool = False):
        self.name = name
        self.target = target
        self.channel = open_channel(target, tracing=tracing)
        self.breaker = breaker or Breaker(name)
        self.margin_s = margin_s
        self.cap_s = cap_s

    def _timeout(self, deadline: Deadline) -> tuple[float, bool]:
        timeout = deadline.hop_timeout(self.margin_s, self.cap_s)
        caller_bound = deadline.from_caller and deadline.remaining() - self.margin_s <= self.cap_s
        return timeout, caller_bound

    async def unary(self, method: Callable[..., Any], request: Any, deadline: Deadline,
                    metadata: Sequence[tuple[str, str]] | None = None) -> Any:
        timeout, caller_bound = self._timeout(deadline)
        with self.breaker.guard():
            try:
                return await method(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                raise rpc_error_to_domain(err, caller_bound=caller_bound, target=self.name) from None

    async def stream(self, method: Callable[..., Any], request: Any, deadline: Deadline,
                     metadata: Sequence[tuple[str, str]] | None = None) -> AsyncIterator[Any]:
        """Iterate a server stream; closing the iterator early cancels the downstream call."""
        timeout, caller_bound = self._timeout(deadline)
        with self.breaker.guard():
            call = method(request, timeout=timeout, metadata=metadata)
            try:
                async for item in call:
                    yield item
            except grpc.aio.AioRpcError as err:
                raise rpc_error_to_domain(err, caller_bound=caller_bound, target=self.name) from None
            finally:
                # Early exit (client gone, error upstream): stop the downstream's work too.
                call.cancel()

    async def close(self) -> None:
        await self.channel.close()
