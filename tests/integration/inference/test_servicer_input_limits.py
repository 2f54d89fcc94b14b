"""InferenceService input limits and the defects the fuzzer found (tests/fuzz/test_fuzz_inference.py)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc

from libs.grpc_errors import status_proto_from_rpc

USER = common_pb2.MESSAGE_ROLE_USER


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = status_proto_from_rpc(err)
    assert status is not None, err
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


async def generate_error(stub: inference_pb2_grpc.InferenceServiceStub,
                         request: inference_pb2.GenerateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(request, timeout=10):
            pass
    return info.value


@pytest.mark.parametrize("request_id", ["\x80", "é", "a\nX-Injected: 1", "a b", "\x00"])
async def test_a_request_id_a_header_cannot_carry_is_invalid_argument(
        stub: inference_pb2_grpc.InferenceServiceStub, request_id: str) -> None:
    """Found by the fuzzer (minimal example: request_id="\\x80" on an otherwise valid request): the id went
    into the provider's x-request-id header, httpx refused to encode it, and Generate answered INTERNAL
    (a newline reached the provider as a broken HTTP request)."""
    err = await generate_error(stub, inference_pb2.GenerateRequest(
        request_id=request_id, model="tiny", messages=[common_pb2.ChatMessage(role=USER, content="hi")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "request_id" in violations(err)


async def test_every_limit_names_its_field(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    err = await generate_error(stub, inference_pb2.GenerateRequest(
        request_id="r" * 129, model="m" * 129,
        messages=[common_pb2.ChatMessage(role=USER, content="a\x00b", name="x" * 65)],
        params=common_pb2.GenerationParams(temperature=float("nan"), top_p=float("inf"), stop=["s" * 129, ""])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err)) >= {"request_id", "model", "messages[0].content", "messages[0].name",
                                    "params.temperature", "params.top_p", "params.stop[0]", "params.stop[1]"}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CountTokens(inference_pb2.CountTokensRequest(
            model="tiny", messages=[common_pb2.ChatMessage(role=USER, content="x")] * 257), timeout=10)
    assert violations(info.value) == {"messages": "at most 256 messages"}


async def test_a_valid_ascii_request_id_still_streams(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    seen = [r async for r in stub.Generate(inference_pb2.GenerateRequest(
        request_id="req-1.a_b:c", model="tiny", messages=[common_pb2.ChatMessage(role=USER, content="hi")],
        params=common_pb2.GenerationParams(max_output_tokens=4)), timeout=10)]
    assert seen and seen[-1].HasField("result")
