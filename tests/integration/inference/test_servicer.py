"""InferenceService over real gRPC (in-process server on port 0) against the fake provider over real HTTP."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc

from libs.grpc_errors import domain_error_from_rpc, status_proto_from_rpc
from tests.integration.inference.conftest import serving
from tools.fake_provider import ANSWER_PREFIX, FakeProvider

USER = common_pb2.MESSAGE_ROLE_USER
SYSTEM = common_pb2.MESSAGE_ROLE_SYSTEM


def request(text: str = "how do gateways save money", model: str = "tiny", **params: object,
            ) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id="it-1", model=model,
        messages=[common_pb2.ChatMessage(role=SYSTEM, content="Answer briefly."),
                  common_pb2.ChatMessage(role=USER, content=text)],
        params=common_pb2.GenerationParams(**params),  # type: ignore[arg-type]
    )


def details(err: grpc.aio.AioRpcError) -> dict[str, object]:
    """The rich-status details of an error, by type."""
    status = status_proto_from_rpc(err)
    assert status is not None, "every error carries google.rpc.Status details"
    out: dict[str, object] = {}
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo, error_details_pb2.BadRequest,
                    error_details_pb2.QuotaFailure):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                out[cls.__name__] = msg
    return out


async def test_streams_deltas_then_one_result(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    responses = [r async for r in stub.Generate(request(temperature=0.0), timeout=5)]
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"delta"} and len(kinds) > 5
    text = "".join(r.delta for r in responses[:-1])
    assert text == f"{ANSWER_PREFIX} how do gateways save money"
    result = responses[-1].result
    # 2 + 5 words in; 7 + 5 words out.
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.cached_input_tokens) == (7, 12, 0)
    assert result.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (result.model, result.provider) == ("fake-small", "fakeai")

    again = [r async for r in stub.Generate(request(), timeout=5)]
    assert again[-1].result.usage.cached_input_tokens == 2  # the provider's prefix cache, passed through


async def test_deadline_while_the_provider_hangs(stub: inference_pb2_grpc.InferenceServiceStub,
                                                 fake: FakeProvider) -> None:
    fake.configure(mode="hang")
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        async for _ in stub.Generate(request(), timeout=0.2):
            pass
    assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.5
    state = await fake.wait_idle(1.0)
    assert (state["active_streams"], state["cancelled_streams"]) == (0, 1)


async def test_deadline_while_the_provider_hangs_mid_stream(stub: inference_pb2_grpc.InferenceServiceStub,
                                                            fake: FakeProvider) -> None:
    fake.configure(mode="hang_mid_stream")
    deltas: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        async for r in stub.Generate(request(), timeout=0.3):
            deltas.append(r.delta)
    assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert deltas
    assert (await fake.wait_idle(1.0))["active_streams"] == 0


async def test_client_cancel_mid_stream_closes_the_provider_stream(stub: inference_pb2_grpc.InferenceServiceStub,
                                                                   fake: FakeProvider) -> None:
    fake.configure(extra_words=1000, chunk_delay_ms=5)
    call = stub.Generate(request(), timeout=10)
    for _ in range(3):
        assert (await call.read()).delta
    assert fake.snapshot()["active_streams"] == 1
    call.cancel()
    state = await fake.wait_idle(2.0)
    assert (state["active_streams"], state["cancelled_streams"], state["completed_streams"]) == (0, 1, 0)
    load = await stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=2)
    assert (load.running_requests, load.waiting_requests) == (0, 0)


async def test_client_that_stops_reading_then_cancels(stub: inference_pb2_grpc.InferenceServiceStub,
                                                      fake: FakeProvider) -> None:
    # The servicer may be parked in a send (flow control) rather than in a provider read when the
    # client goes away; the provider stream must be closed all the same.
    # 64 KiB deltas: a few MiB in, gRPC flow control parks the servicer in a send.
    fake.configure(reply=" ".join(["x" * 65536] * 200))
    call = stub.Generate(request(), timeout=10)
    assert (await call.read()).delta
    await asyncio.sleep(0.3)
    assert (fake.snapshot()["active_streams"], fake.snapshot()["completed_streams"]) == (1, 0)
    call.cancel()
    state = await fake.wait_idle(2.0)
    assert (state["active_streams"], state["cancelled_streams"], state["completed_streams"]) == (0, 1, 0)


async def test_provider_rate_limit_is_resource_exhausted_with_retry_info(
        stub: inference_pb2_grpc.InferenceServiceStub, fake: FakeProvider) -> None:
    fake.configure(mode="rate_limit_429", retry_after_s=7)
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        async for _ in stub.Generate(request(), timeout=5):
            pass
    err = exc_info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    d = details(err)
    assert d["RetryInfo"].retry_delay.seconds == 7  # type: ignore[attr-defined]
    assert d["ErrorInfo"].reason == "PROVIDER_RATE_LIMITED"  # type: ignore[attr-defined]
    assert "QuotaFailure" in d
    assert domain_error_from_rpc(err).reason == "PROVIDER_RATE_LIMITED"


async def test_provider_500_is_unavailable(stub: inference_pb2_grpc.InferenceServiceStub,
                                           fake: FakeProvider) -> None:
    fake.configure(mode="error_500")
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        async for _ in stub.Generate(request(), timeout=5):
            pass
    assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(exc_info.value)["ErrorInfo"].reason == "BACKEND_ERROR"  # type: ignore[attr-defined]


async def test_malformed_stream_is_unavailable(stub: inference_pb2_grpc.InferenceServiceStub,
                                               fake: FakeProvider) -> None:
    fake.configure(mode="malformed_chunk")
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        async for _ in stub.Generate(request(), timeout=5):
            pass
    assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "malformed" in (exc_info.value.details() or "")


async def test_bad_input_is_invalid_argument_with_field_violations(
        stub: inference_pb2_grpc.InferenceServiceStub, fake: FakeProvider) -> None:
    bad = inference_pb2.GenerateRequest(model="no-such-model",
                                        params=common_pb2.GenerationParams(temperature=5.0, max_output_tokens=10**6))
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        async for _ in stub.Generate(bad, timeout=5):
            pass
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = details(exc_info.value)["BadRequest"]
    fields = {v.field for v in bad_request.field_violations}  # type: ignore[attr-defined]
    assert fields == {"model", "messages", "params.temperature", "params.max_output_tokens"}

    too_long = request(text="word " * 20_000)  # ~25k estimated tokens > the 4096 context window
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        async for _ in stub.Generate(too_long, timeout=5):
            pass
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.snapshot()["requests_total"] == 0  # nothing invalid reached the provider


async def test_over_max_waiting_is_resource_exhausted(fake: FakeProvider, clean_env: None) -> None:
    fake.configure(mode="hang_mid_stream")
    async with serving(fake, max_concurrency=1, max_waiting=1, overload_retry_after_s=2) as stub:
        running = stub.Generate(request(), timeout=10)
        assert (await running.read()).delta  # holds the only slot
        waiting = stub.Generate(request(), timeout=10)
        for _ in range(100):
            load = await stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=2)
            if load.waiting_requests == 1:
                break
            await asyncio.sleep(0.01)
        assert (load.running_requests, load.waiting_requests, load.max_waiting_requests) == (1, 1, 1)

        with pytest.raises(grpc.aio.AioRpcError) as exc_info:
            async for _ in stub.Generate(request(), timeout=5):
                pass
        err = exc_info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        d = details(err)
        assert d["ErrorInfo"].reason == "OVERLOADED"  # type: ignore[attr-defined]
        assert d["RetryInfo"].retry_delay.seconds == 2  # type: ignore[attr-defined]
        assert fake.snapshot()["requests_total"] == 1  # the rejected and the queued one never reached it

        running.cancel()
        assert (await waiting.read()).delta  # the queued request got the slot
        waiting.cancel()
        assert (await fake.wait_idle(2.0))["active_streams"] == 0


async def test_count_tokens_list_models_and_load(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    count = await stub.CountTokens(inference_pb2.CountTokensRequest(model="tiny", messages=[
        common_pb2.ChatMessage(role=USER, content="a" * 400)]), timeout=2)
    assert count.input_tokens == 100 + 4

    models = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2)
    assert [(m.name, m.provider, m.context_window) for m in models.models] == [
        ("tiny", "fakeai", 4096), ("other", "fakeai", 4096)]

    load = await stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=2)
    assert (load.running_requests, load.waiting_requests, load.kv_cache_usage, load.max_waiting_requests) == (
        0, 0, 0.0, 4)

    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await stub.CountTokens(inference_pb2.CountTokensRequest(model="nope"), timeout=2)
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
