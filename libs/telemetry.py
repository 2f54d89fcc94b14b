"""Logging and OpenTelemetry tracing.

Logs carry ids, counts and timings only: never prompt text, response text or
keys. Tracing is off unless an OTLP endpoint is configured; then the gRPC
server and client interceptors from opentelemetry-instrumentation-grpc
propagate trace context across every hop.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger(__name__)


class ConnectionTracebackFilter(logging.Filter):
    """One line instead of a traceback for a connection error a library logs with ``exc_info`` while it
    retries by itself (asyncpg's pool restoring its floor during a PostgreSQL restart logs a 20-line
    traceback at WARNING per attempt): the message and the error's type and text stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (isinstance(exc, OSError) or type(exc).__module__.startswith("asyncpg")):
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


# Loggers of libraries that retry connections themselves and log each failure with its traceback.
_RETRYING_LOGGERS = ("asyncpg.pool",)


def configure_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        force=True,
    )
    for name in _RETRYING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ConnectionTracebackFilter) for f in logger.filters):
            logger.addFilter(ConnectionTracebackFilter())


def configure_tracing(service: str, otlp_endpoint: str) -> bool:
    """Install an OTLP tracer provider; returns whether tracing is on."""
    if not otlp_endpoint:
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"tollgate-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    log.info("tracing to %s", otlp_endpoint)
    return True


def server_interceptors(tracing: bool) -> list[Any]:
    if not tracing:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def client_interceptors(tracing: bool) -> list[Any]:
    if not tracing:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def shutdown_tracing() -> None:
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()
