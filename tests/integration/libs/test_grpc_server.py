"""The shared server bootstrap, exercised through a real service process:
OTLP tracing when configured (trace context propagated from the caller), and
graceful shutdown on SIGTERM (in-flight calls drain, new ones are refused)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from tollgate.cache.v1 import cache_pb2, cache_pb2_grpc
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc

from tests.support.infra import free_port
from tests.support.procs import ServiceProcess
from tools.fake_provider.server import FakeProvider

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, bytes, bytes]] = []  # (name, trace id, parent span id)

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: object) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((span.name, span.trace_id, span.parent_span_id))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    server = grpc.aio.server()
    found = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield found, port
    await server.stop(0)


async def test_tracing_exports_server_spans_in_the_callers_trace(collector: tuple[Collector, int], redis_url: str,
                                                                 redis_prefix: str, tmp_path: Path) -> None:
    spans, collector_port = collector
    port = free_port()
    proc = ServiceProcess("cache", port, {
        "TOLLGATE_CACHE_PORT": str(port), "TOLLGATE_REDIS_URL": redis_url, "TOLLGATE_REDIS_PREFIX": redis_prefix,
        "TOLLGATE_OTLP_ENDPOINT": f"127.0.0.1:{collector_port}"}, tmp_path)
    try:
        await asyncio.to_thread(proc.wait_ready)
        async with grpc.aio.insecure_channel(proc.address) as ch:
            await cache_pb2_grpc.CacheServiceStub(ch).GetStats(
                cache_pb2.GetStatsRequest(tenant_id="t1"), timeout=5,
                metadata=(("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),))
    finally:
        assert await asyncio.to_thread(proc.stop) == 0  # shutdown flushes the span exporter
    names = {name for name, trace_id, _ in spans.spans if trace_id.hex() == TRACE_ID}
    assert any("GetStats" in n for n in names), spans.spans


async def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(tmp_path: Path) -> None:
    async with FakeProvider() as provider:
        provider.configure(chunk_delay_ms=100, extra_words=15)  # a ~2 s stream
        port = free_port()
        proc = ServiceProcess("inference", port, {
            "TOLLGATE_INFERENCE_PORT": str(port), "TOLLGATE_INFERENCE_PROVIDER_BASE_URL": provider.url,
            "TOLLGATE_INFERENCE_MODELS": "fake-small", "TOLLGATE_INFERENCE_GRACE_PERIOD_S": "10"}, tmp_path)
        await asyncio.to_thread(proc.wait_ready)
        async with grpc.aio.insecure_channel(proc.address) as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            call = stub.Generate(inference_pb2.GenerateRequest(
                request_id="drain", model="fake-small",
                messages=[common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content="count slowly")]),
                timeout=30)
            first = await call.read()
            assert first.delta
            t0 = time.monotonic()
            stopping = asyncio.create_task(asyncio.to_thread(proc.stop, 30))
            events = [first]
            while (event := await call.read()) is not grpc.aio.EOF:
                events.append(event)
            assert events[-1].HasField("result")  # the in-flight stream finished normally
            assert time.monotonic() - t0 > 0.5
            assert await stopping == 0
        async with grpc.aio.insecure_channel(proc.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await inference_pb2_grpc.InferenceServiceStub(ch).GetLoad(inference_pb2.GetLoadRequest(), timeout=2)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
