"""Issue 14, RouterService over real gRPC (in-process server, in-memory gateway downstreams): every string,
label and number is checked before a reservation is made, so a request whose usage row PostgreSQL would
refuse (NUL in a label: JSONB refuses it; the row was dead-lettered) is INVALID_ARGUMENT naming the field;
and a flood of bad keys from one address is refused before the key lookup."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import router_pb2, router_pb2_grpc

from libs.chat import Principal
from libs.grpc_errors import status_proto_from_rpc
from libs.grpc_server import GrpcServer, ServiceBinding
from services.router import limits as lim
from services.router.control.keys import KeyRecord, hash_key, new_key
from services.router.pipeline.authenticate import Authenticator, AuthLimits
from services.router.servicer import RouterServicer
from services.router.settings import RouterSettings
from tests.support.router import Ledger, MemoryLimiter, scripted_gateway
from tests.unit.router.pipeline.test_authenticate_bounds import CountingLookup

N_FAILURES = 5


@dataclass
class Router:
    stub: router_pb2_grpc.RouterServiceStub
    key: str
    limiter: MemoryLimiter
    ledger: Ledger
    lookup: CountingLookup

    def md(self, key: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key or self.key}"),)


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    gateway, _, limiter, _, ledger = scripted_gateway({"t-primary": "ok", "t-backup": "ok"})
    lookup = CountingLookup()
    key = new_key()
    lookup.rows[hash_key(key)] = KeyRecord("k1", Principal("org1", "team1", "k1"), "member", (), None, False)
    auth = Authenticator(lookup, cache_ttl_s=60, limits=AuthLimits(failures_per_window=N_FAILURES))
    servicer = RouterServicer(gateway, auth, default_timeout_s=5, max_timeout_s=10)
    server = GrpcServer(RouterSettings(host="127.0.0.1", port=0), [ServiceBinding(
        "tollgate.router.v1.RouterService",
        lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, s))])
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Router(router_pb2_grpc.RouterServiceStub(channel), key, limiter, ledger, lookup)
    finally:
        await channel.close()
        await server.stop(0)
        await gateway.aclose()


def _input(**kw: object) -> router_pb2.GenerationInput:
    inp = router_pb2.GenerationInput(
        model="primary", messages=[common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content="hi")])
    inp.params.temperature = 0.0
    for name, value in kw.items():
        if name == "labels":
            inp.labels.update(value)  # type: ignore[arg-type]
        else:
            setattr(inp, name, value)
    return inp


def _with(change: Callable[[router_pb2.GenerationInput], None]) -> router_pb2.GenerationInput:
    inp = _input()
    change(inp)
    return inp


def _violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = status_proto_from_rpc(err)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


BAD_INPUTS = {
    "nul in a label key": (_input(labels={"te\x00am": "x"}), "input.labels"),
    "nul in a label value": (_input(labels={"team": "a\x00b"}), "input.labels"),
    "control char in a label": (_input(labels={"team": "a\x1bb"}), "input.labels"),
    "the ledger's reserved label": (_input(labels={"ledger_guard": "x"}), "input.labels"),
    "label key too long": (_input(labels={"k" * (lim.ROUTER_MAX_LABEL_KEY_CHARS + 1): "v"}), "input.labels"),
    "label value too long": (_input(labels={"k": "v" * (lim.ROUTER_MAX_LABEL_VALUE_CHARS + 1)}), "input.labels"),
    "too many labels": (_input(labels={f"k{i}": "v" for i in range(lim.ROUTER_MAX_LABELS + 1)}), "input.labels"),
    "empty label key": (_input(labels={"": "v"}), "input.labels"),
    "nul in user_id": (_input(user_id="u\x00"), "input.user_id"),
    "nul in prompt_version": (_input(prompt_version="v1\x00"), "input.prompt_version"),
    "nul in model": (_input(model="primary\x00"), "input.model"),
    "model too long": (_input(model="m" * (lim.MAX_MODEL_NAME_CHARS + 1)), "input.model"),
    "nul in a fallback model": (_with(lambda i: i.fallback_models.append("backup\x00")), "input.fallback_models[0]"),
    "empty fallback model": (_with(lambda i: i.fallback_models.append("")), "input.fallback_models[0]"),
    "nul in a stop sequence": (_with(lambda i: i.params.stop.append("\x00")), "input.params.stop[0]"),
    "long stop sequence": (_with(lambda i: i.params.stop.append("s" * (lim.MAX_STOP_CHARS + 1))),
                           "input.params.stop[0]"),
    "nul in message content": (_with(lambda i: setattr(i.messages[0], "content", "hi\x00")),
                               "input.messages[0].content"),
    "nul in message name": (_with(lambda i: setattr(i.messages[0], "name", "bob\x00")), "input.messages[0].name"),
    "nan temperature": (_with(lambda i: setattr(i.params, "temperature", float("nan"))), "input.params.temperature"),
    "inf top_p": (_with(lambda i: setattr(i.params, "top_p", float("inf"))), "input.params.top_p"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_bad_input_is_invalid_argument_naming_the_field_before_any_reservation(router: Router,
                                                                                   case: str) -> None:
    inp, field = BAD_INPUTS[case]
    for call in (router.stub.Generate(router_pb2.GenerateRequest(input=inp), metadata=router.md(), timeout=5),):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert any(f.startswith(field) for f in _violations(err.value)), (_violations(err.value), field)
    stream = router.stub.GenerateStream(router_pb2.GenerateStreamRequest(input=inp), metadata=router.md(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert router.limiter.reserved == {} and router.ledger.events == []


async def test_a_good_request_still_reserves_and_records(router: Router) -> None:
    inp = _input(labels={"team": "search", "env": "prod\tA"[:4]}, user_id="user-1", prompt_version="v2")
    inp.params.stop.append("\n\n")
    reply = await router.stub.Generate(router_pb2.GenerateRequest(input=inp), metadata=router.md(), timeout=5)
    assert reply.content == "Paris is the capital."
    assert len(router.limiter.reserved) == 1


async def test_nul_in_a_feedback_request_id_is_invalid_argument(router: Router) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await router.stub.SubmitFeedback(router_pb2.SubmitFeedbackRequest(
            request_id="r\x00", score=router_pb2.FEEDBACK_SCORE_UP), metadata=router.md(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and _violations(err.value) == ["request_id"]


async def test_a_flood_of_bad_keys_over_grpc_costs_at_most_n_lookups(router: Router) -> None:
    # A legitimate client at the same address (behind the same NAT) was verified before the flood.
    await router.stub.ListAvailableModels(router_pb2.ListAvailableModelsRequest(), metadata=router.md(), timeout=5)
    codes = []
    for i in range(200):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.stub.ListAvailableModels(router_pb2.ListAvailableModelsRequest(),
                                                  metadata=router.md(f"tg-bad-{i}"), timeout=5)
        codes.append(err.value.code())
    assert router.lookup.calls <= 1 + N_FAILURES  # the good key's lookup, then N failed ones
    assert codes[:N_FAILURES] == [grpc.StatusCode.UNAUTHENTICATED] * N_FAILURES
    assert set(codes[N_FAILURES:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    status = status_proto_from_rpc(err.value)
    assert status is not None
    retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry, "RESOURCE_EXHAUSTED without RetryInfo"
    info = error_details_pb2.RetryInfo()
    retry[0].Unpack(info)
    assert 0 < info.retry_delay.seconds <= 60
    # The verified key still works from that address.
    await router.stub.ListAvailableModels(router_pb2.ListAvailableModelsRequest(), metadata=router.md(), timeout=5)


# --- issue 24: every Generate/GenerateStream answer carries its request id, errors included ---------------


def _request_id(metadata: object) -> str | None:
    ids = [value for name, value in metadata or () if name == "x-request-id"]  # type: ignore[attr-defined]
    assert len(ids) <= 1, ids
    return str(ids[0]) if ids else None


async def test_a_success_carries_the_summarys_request_id_in_its_trailer(router: Router) -> None:
    call = router.stub.Generate(router_pb2.GenerateRequest(input=_input()), metadata=router.md(), timeout=5)
    reply = await call
    assert _request_id(await call.trailing_metadata()) == reply.summary.request_id != ""
    stream = router.stub.GenerateStream(router_pb2.GenerateStreamRequest(input=_input()), metadata=router.md(),
                                        timeout=5)
    events = [e async for e in stream]
    rid = _request_id(await stream.initial_metadata())  # in time for an HTTP edge's response headers
    assert rid == _request_id(await stream.trailing_metadata()) == events[-1].summary.request_id != ""
    assert rid != reply.summary.request_id


@pytest.mark.parametrize("streaming", [False, True])
async def test_errors_before_the_pipeline_carry_a_request_id_too(router: Router, streaming: bool) -> None:
    cases = [(_input(), router.md("tg-unknown"), grpc.StatusCode.UNAUTHENTICATED),
             (_input(model=""), router.md(), grpc.StatusCode.INVALID_ARGUMENT)]
    for inp, md, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if streaming:
                async for _ in router.stub.GenerateStream(router_pb2.GenerateStreamRequest(input=inp), metadata=md,
                                                          timeout=5):
                    pass
            else:
                await router.stub.Generate(router_pb2.GenerateRequest(input=inp), metadata=md, timeout=5)
        assert err.value.code() == code
        rid = _request_id(err.value.trailing_metadata())
        assert rid is not None and len(rid) == 32
        assert status_proto_from_rpc(err.value) is not None  # the rich status survives beside it
    assert router.ledger.events == []  # refused before the pipeline: no ledger row, but an id to quote


@dataclass
class SpiedRouter(Router):
    seen_ids: list[str | None]  # the request_id the servicer passed to Gateway.generate, call by call


@pytest.fixture
async def failing_router() -> AsyncIterator[SpiedRouter]:
    """Every backend down: the request reaches the pipeline, fails, and is written to the ledger."""
    gateway, _, limiter, _, ledger = scripted_gateway({"t-primary": "down", "t-backup": "down"})
    lookup = CountingLookup()
    key = new_key()
    lookup.rows[hash_key(key)] = KeyRecord("k1", Principal("org1", "team1", "k1"), "member", (), None, False)
    servicer = RouterServicer(gateway, Authenticator(lookup, cache_ttl_s=60), default_timeout_s=5, max_timeout_s=10)
    seen: list[str | None] = []
    generate = gateway.generate

    def spy(*args: object, request_id: str | None = None, **kw: object) -> object:
        seen.append(request_id)
        return generate(*args, request_id=request_id, **kw)  # type: ignore[arg-type]

    gateway.generate = spy  # type: ignore[method-assign]
    server = GrpcServer(RouterSettings(host="127.0.0.1", port=0), [ServiceBinding(
        "tollgate.router.v1.RouterService",
        lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, s))])
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield SpiedRouter(router_pb2_grpc.RouterServiceStub(channel), key, limiter, ledger, lookup, seen)
    finally:
        await channel.close()
        await server.stop(0)
        await gateway.aclose()


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_failed_requests_trailer_id_is_its_ledger_rows(failing_router: SpiedRouter, streaming: bool) -> None:
    r = failing_router
    inp = _with(lambda i: i.fallback_models.append("backup"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if streaming:
            async for _ in r.stub.GenerateStream(router_pb2.GenerateStreamRequest(input=inp), metadata=r.md(),
                                                 timeout=5):
                pass
        else:
            await r.stub.Generate(router_pb2.GenerateRequest(input=inp), metadata=r.md(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    rid = _request_id(err.value.trailing_metadata())
    assert rid is not None and r.seen_ids == [rid]
    for _ in range(100):  # settlement runs after the response
        if r.ledger.events:
            break
        await asyncio.sleep(0.02)
    assert [e.request_id for e in r.ledger.events] == [rid]
