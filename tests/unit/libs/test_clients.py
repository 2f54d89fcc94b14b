"""Downstream (libs/clients.py) against a real grpc.aio server on loopback whose handler can hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from libs.breaker import Breaker, BreakerOpen
from libs.clients import Downstream
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, Unavailable

METHOD = "/tollgate.test.Hang/Call"
CAP_S = 0.1  # the hop's own cap (the router's side calls use 0.5 s)


class HangingServer:
    """Answers b"ok" while ``hang`` is clear; otherwise never answers (until the call is cancelled)."""

    def __init__(self) -> None:
        self.hang = True
        self.calls = 0
        self.cancelled = 0

    async def handle(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        try:
            while self.hang:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b"ok"


@pytest.fixture
async def hanging() -> AsyncIterator[tuple[HangingServer, Downstream]]:
    backend = HangingServer()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "tollgate.test.Hang", {"Call": grpc.unary_unary_rpc_method_handler(backend.handle)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ds = Downstream("hang", f"127.0.0.1:{port}", margin_s=0.02, cap_s=CAP_S,
                    breaker=Breaker("hang", fail_max=5, reset_timeout_s=10, timeout_trip=3))
    try:
        yield backend, ds
    finally:
        await ds.close()
        await server.stop(0)


async def _call(ds: Downstream, deadline: Deadline) -> bytes:
    method = ds.channel.unary_unary(METHOD)
    result: bytes = await ds.unary(method, b"", deadline)
    return result


async def test_the_hop_cap_running_out_is_a_backend_timeout_and_trips_the_breaker(
        hanging: tuple[HangingServer, Downstream]) -> None:
    backend, ds = hanging
    t0 = time.monotonic()
    for _ in range(3):
        # The caller has 60 s; the side call's own leash (as the router's stages take it) is what runs out.
        with pytest.raises(Unavailable) as caught:
            await _call(ds, Deadline.after(60).within(CAP_S))
        assert caught.value.reason == "BACKEND_TIMEOUT"
    opened_after = time.monotonic() - t0
    assert ds.breaker.is_open and opened_after < 3 * CAP_S + 0.2  # ~ N x cap
    t1 = time.monotonic()
    with pytest.raises(BreakerOpen):
        await _call(ds, Deadline.after(60).within(CAP_S))
    assert time.monotonic() - t1 < 0.05  # fails fast: no call, no wait
    assert backend.calls == 3


async def test_the_callers_own_deadline_running_out_does_not_count(
        hanging: tuple[HangingServer, Downstream]) -> None:
    _, ds = hanging
    for _ in range(4):
        with pytest.raises(DeadlineExceeded):
            await _call(ds, Deadline.after(0.06).within(CAP_S))  # the caller's deadline binds
    assert ds.breaker.state == "closed" and not ds.breaker.is_open


async def test_a_success_between_timeouts_resets_the_run(hanging: tuple[HangingServer, Downstream]) -> None:
    backend, ds = hanging
    for hang in (True, True, False, True, True):
        backend.hang = hang
        if hang:
            with pytest.raises(Unavailable):
                await _call(ds, Deadline.after(60))
        else:
            assert await _call(ds, Deadline.after(60)) == b"ok"
    assert ds.breaker.state == "closed"  # never 3 timeouts in a row


async def test_a_deadline_without_a_caller_is_capped_and_counts(hanging: tuple[HangingServer, Downstream]) -> None:
    _, ds = hanging
    no_caller = Deadline.from_remaining(None, default_s=60, max_s=600)
    for _ in range(3):
        with pytest.raises(Unavailable, match="did not answer in time"):
            await _call(ds, no_caller)
    assert ds.breaker.is_open
