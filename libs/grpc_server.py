"""Server bootstrap shared by every service.

One grpc.aio server with the standard health service, server reflection
(grpcurl can list and describe everything), optional OpenTelemetry tracing,
domain-error mapping, and graceful shutdown on SIGTERM/SIGINT: stop accepting,
let in-flight calls drain for the grace period, then cancel what is left.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from libs.grpc_errors import ErrorMappingInterceptor
from libs.settings import ServiceSettings
from libs.telemetry import configure_logging, configure_tracing, server_interceptors, shutdown_tracing

log = logging.getLogger(__name__)

# Message size limits: long prompts fit, runaway payloads do not.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer and how to add it to a server."""

    full_name: str  # e.g. "tollgate.router.v1.RouterService"
    add_to_server: Callable[[grpc.aio.Server], None]


class DetailedHealthServicer(health.aio.HealthServicer):
    """The standard health service, plus details per service name sent as trailing metadata of ``Check``.

    The protocol's response carries only a status; a number an operator needs next to it (how many usage
    rows the ledger refused, say) travels as ``tollgate-<name>: <value>`` metadata, which grpcurl and
    every gRPC client show. Written here because grpcio-health-checking has no such hook.
    """

    def __init__(self) -> None:
        super().__init__()
        self._details: dict[str, dict[str, str]] = {}

    def set_detail(self, service: str, name: str, value: str) -> None:
        self._details.setdefault(service, {})[f"tollgate-{name}"] = value

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        details = self._details.get(request.service)
        if details:
            context.set_trailing_metadata(tuple(details.items()))
        return await super().Check(request, context)


class GrpcServer:
    """A running gRPC server; ``health`` lets the service report SERVING / NOT_SERVING."""

    def __init__(self, settings: ServiceSettings, bindings: Sequence[ServiceBinding], *, tracing: bool = False):
        self._settings = settings
        self._bindings = list(bindings)
        self.health = DetailedHealthServicer()
        self.server = grpc.aio.server(
            interceptors=[*server_interceptors(tracing), ErrorMappingInterceptor()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.port = 0

    async def start(self) -> int:
        for binding in self._bindings:
            binding.add_to_server(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [b.full_name for b in self._bindings]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(self._settings.address)
        if self.port == 0:
            raise SystemExit(f"cannot bind {self._settings.address}")
        await self.server.start()
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s:%d (%s)", self._settings.host, self.port, ", ".join(names))
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *(b.full_name for b in self._bindings)]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        # Tell load balancers first, then stop accepting and drain.
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


def wait_for_stop_signal() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_until_stopped(
    settings: ServiceSettings,
    service: str,
    build: Callable[[], Awaitable[tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]]],
    *,
    on_started: Callable[[GrpcServer], Awaitable[None]] | None = None,
) -> None:
    """Build the service (``build`` returns bindings and an async close), serve it, shut down in ``finally``."""
    tracing = configure_tracing(service, settings.otlp_endpoint)
    stop = wait_for_stop_signal()
    bindings, close = await build()
    server = GrpcServer(settings, bindings, tracing=tracing)
    try:
        await server.start()
        if on_started is not None:
            await on_started(server)
        await stop.wait()
        log.info("stopping: draining in-flight calls for up to %.1fs", settings.grace_period_s)
    finally:
        await server.stop(settings.grace_period_s)
        await close()
        if tracing:
            shutdown_tracing()
        log.info("stopped")


def run(main: Callable[[], Coroutine[Any, Any, None]], *, service: str, log_level: str) -> None:
    """Process entry point: logging, uvloop, run ``main`` to completion."""
    import uvloop

    configure_logging(log_level, service)
    uvloop.run(main())
