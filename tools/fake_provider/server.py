"""Run the fake provider: in this event loop (tests), in a thread (sync tests), or as a process (``__main__``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from tools.fake_provider.app import DEFAULT_MODELS, ProviderState, apply_control, create_app


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class FakeProvider:
    """The fake provider on a real loopback port.

    ``async with FakeProvider() as fp:`` serves it in the running event loop;
    ``with FakeProvider().in_thread() as fp:`` serves it from a background
    thread. ``fp.url`` is the root URL (append ``/v1/...``); ``fp.configure(...)``
    / ``fp.reset()`` / ``fp.snapshot()`` act like ``POST /_control`` and
    ``GET /_control/state`` without an HTTP round trip.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 models: tuple[str, ...] = DEFAULT_MODELS):
        self.host = host
        self.state = ProviderState()
        self.app = create_app(self.state, api_key=api_key, models=models)
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- control ----------------------------------------------------------------

    def configure(self, **fields: Any) -> None:
        apply_control(self.state, fields)

    def reset(self, **fields: Any) -> None:
        apply_control(self.state, {"reset": True, **fields})

    def snapshot(self) -> dict[str, Any]:
        return self.state.snapshot()

    async def wait_idle(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """Wait until no generation is active (the provider noticed every disconnect); returns the state."""
        deadline = time.monotonic() + timeout_s
        while self.state.active_streams and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.01)
        return self.snapshot()

    # --- in this event loop ---------------------------------------------------------

    async def start(self) -> FakeProvider:
        # uvicorn's startup/shutdown without Server.serve(): no signal handlers taken over in the
        # test process, and no 0.1 s polling ticks on the way down (tests start one per test).
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._sock])
        self._server = server
        return self

    async def stop(self, grace_s: float = 1.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        for listener in server.servers:
            listener.close()
        state = server.server_state
        for connection in list(state.connections):
            connection.shutdown()  # idle keep-alive connections close now, busy ones after their response
        deadline = time.monotonic() + grace_s
        while state.tasks and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.005)
        for task in list(state.tasks):
            task.cancel()
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=grace_s)
        self._sock.close()

    async def __aenter__(self) -> FakeProvider:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- in a background thread ----------------------------------------------------------

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[FakeProvider]:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        stop = asyncio.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                await self.start()
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            await stop.wait()
            await self.stop()

        thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="fake-provider",
                                  daemon=True)
        thread.start()
        started.wait(10)
        if failure:
            raise failure[0]
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()
