"""The edge app on uvicorn in front of a scripted RouterService over loopback gRPC: HTTP shapes, errors before
and after the stream started, and client disconnects cancelling the router call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import router_pb2, router_pb2_grpc

from libs.errors import FieldViolation, InvalidArgument, QuotaExceeded, QuotaViolation, Unauthenticated, Unavailable
from libs.grpc_errors import ErrorMappingInterceptor
from services.edge.server import uvicorn_config
from services.edge.settings import EdgeSettings
from tests.support import infra

KEY = "tg-good"
BODY_LIMIT = 64 * 1024


def _summary(model: str) -> router_pb2.GenerationSummary:
    return router_pb2.GenerationSummary(
        request_id="req-1", model=model, provider="fake", finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.TokenUsage(input_tokens=3, output_tokens=2), cache_tier=common_pb2.CACHE_TIER_MISS)


@dataclass
class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    """Behaviour by model name: ok, quota, fail-mid (error after two deltas), slow (never finishes)."""

    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[router_pb2.GenerationInput] = field(default_factory=list)
    timeouts: list[float] = field(default_factory=list)

    def _check(self, request_input: router_pb2.GenerationInput, context: grpc.aio.ServicerContext) -> None:
        # Like the real router: the request id in the trailers of every Generate/GenerateStream, errors included.
        context.set_trailing_metadata((("x-request-id", "req-1"),))
        self.seen.append(request_input)
        remaining = context.time_remaining()
        if remaining is not None:
            self.timeouts.append(remaining)
        if ("authorization", f"Bearer {KEY}") not in tuple(context.invocation_metadata() or ()):
            raise Unauthenticated("unknown key")
        if request_input.model == "quota":
            raise QuotaExceeded("rpm", [QuotaViolation("key:k", "requests_per_minute limit 1 exceeded")], 0.25)
        if request_input.params.temperature > 2:
            raise InvalidArgument([FieldViolation("input.params.temperature", "must be between 0 and 2")])

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> router_pb2.GenerateResponse:
        self._check(request.input, context)
        if request.input.model == "slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return router_pb2.GenerateResponse(content="Hello there", summary=_summary(request.input.model))

    async def GenerateStream(self, request: router_pb2.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb2.GenerateStreamResponse]:
        self._check(request.input, context)
        await context.send_initial_metadata((("x-request-id", "req-1"),))
        model = request.input.model
        try:
            for i in range(1000 if model == "slow" else 2):
                yield router_pb2.GenerateStreamResponse(delta=f"w{i} ")
                if model == "slow":
                    await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if model == "fail-mid":
            raise Unavailable("backend went away", reason="BACKEND_ERROR")
        yield router_pb2.GenerateStreamResponse(summary=_summary(model))

    async def ListAvailableModels(self, request: router_pb2.ListAvailableModelsRequest,
                                  context: grpc.aio.ServicerContext) -> router_pb2.ListAvailableModelsResponse:
        if ("authorization", f"Bearer {KEY}") not in tuple(context.invocation_metadata() or ()):
            raise Unauthenticated("unknown key")
        return router_pb2.ListAvailableModelsResponse(models=[
            router_pb2.AvailableModel(name="auto", provider="tollgate"),
            router_pb2.AvailableModel(name="ok", provider="fake")])


@dataclass
class Running:
    url: str
    router: FakeRouter
    health: health.aio.HealthServicer


@contextlib.asynccontextmanager
async def _edge_for(router_target: str) -> AsyncIterator[str]:
    """The edge on uvicorn in front of ``router_target``; yields its base URL."""
    settings = EdgeSettings(host="127.0.0.1", port=0, router_target=router_target, default_timeout_s=20,
                            max_body_bytes=BODY_LIMIT, grace_period_s=1)
    web = uvicorn.Server(uvicorn_config(settings))  # the production configuration (serve() keeps this loop)
    task = asyncio.create_task(web.serve())
    while not web.started:
        await asyncio.sleep(0.01)
    http_port = web.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{http_port}"
    finally:
        web.should_exit = True
        await task


@pytest.fixture
async def edge() -> AsyncIterator[Running]:
    fake = FakeRouter()
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    router_pb2_grpc.add_RouterServiceServicer_to_server(fake, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("tollgate.router.v1.RouterService", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with _edge_for(f"127.0.0.1:{port}") as url:
            yield Running(url, fake, health_servicer)
    finally:
        await server.stop(0)


def _chat(model: str = "ok", **fields: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


AUTH = {"authorization": f"Bearer {KEY}"}


async def test_completion_and_forwarded_fields(edge: Running) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        r = await client.post("/v1/chat/completions", json=_chat(temperature=0, max_tokens=9),
                              headers={**AUTH, "x-tollgate-cache": "no-store", "x-request-timeout": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Hello there"
    assert body["id"] == "chatcmpl-req-1" and r.headers["x-request-id"] == "req-1"
    assert body["usage"]["total_tokens"] == 5 and body["tollgate"]["cache_tier"] == "miss"
    [seen] = edge.router.seen
    assert seen.cache_control.no_store and seen.params.max_output_tokens == 9
    assert 2 < edge.router.timeouts[0] < 3.1  # gRPC rounds deadlines a little


async def test_errors_before_the_router_and_from_it(edge: Running) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        malformed = await client.post("/v1/chat/completions", content=b"{nope", headers=AUTH)
        no_key = await client.post("/v1/chat/completions", json=_chat())
        bad_value = await client.post("/v1/chat/completions", json=_chat(temperature=5), headers=AUTH)
        limited = await client.post("/v1/chat/completions", json=_chat("quota"), headers=AUTH)
        limited_stream = await client.post("/v1/chat/completions", json=_chat("quota", stream=True), headers=AUTH)
        unknown = await client.get("/v1/nothing-here")
        wrong_method = await client.get("/v1/chat/completions")
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert bad_value.status_code == 400 and bad_value.json()["error"]["param"] == "temperature"
    for r in (limited, limited_stream):
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.headers["retry-after-ms"] == "250"
        assert r.json()["error"]["type"] == "rate_limit_error"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert len(edge.router.seen) == 4  # the malformed body never reached the router


async def test_stream_and_error_after_the_stream_started(edge: Running) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        ok = await client.post("/v1/chat/completions", headers=AUTH,
                               json=_chat(stream=True, stream_options={"include_usage": True}))
        failed = await client.post("/v1/chat/completions", json=_chat("fail-mid", stream=True), headers=AUTH)
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/event-stream")
    frames = [f.removeprefix("data: ") for f in ok.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "w0 w1 "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["total_tokens"] == 5
    assert failed.status_code == 200
    frames = [f.removeprefix("data: ") for f in failed.text.split("\n\n") if f]
    assert "[DONE]" not in frames
    assert json.loads(frames[-1])["error"]["code"] == "backend_error"


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_the_router_call(edge: Running, stream: bool) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=_chat("slow", stream=True),
                                     headers=AUTH) as r:
                async for _ in r.aiter_bytes():
                    break
        else:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/chat/completions", json=_chat("slow"), headers=AUTH, timeout=0.3)
    await asyncio.wait_for(edge.router.cancelled.wait(), 5)


async def test_models_and_health(edge: Running) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        models = await client.get("/v1/models", headers=AUTH)
        one = await client.get("/v1/models/ok", headers=AUTH)
        missing = await client.get("/v1/models/nope", headers=AUTH)
        denied = await client.get("/v1/models")
        healthy = await client.get("/healthz")
        await edge.health.set("tollgate.router.v1.RouterService", health_pb2.HealthCheckResponse.NOT_SERVING)
        draining = await client.get("/healthz")
    assert [m["id"] for m in models.json()["data"]] == ["auto", "ok"]
    assert one.json() == {"id": "ok", "object": "model", "created": 0, "owned_by": "fake"}
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert denied.status_code == 401
    assert healthy.status_code == 200 and draining.status_code == 503


# --- hostile input (issue 14): 4xx with an OpenAI error body, never a 500, and the router never called ----

def _openai_error(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code", "request_id"}, body
    assert body["error"]["request_id"] == r.headers["x-request-id"] != ""  # issue 24: every error names its request
    error: dict[str, object] = body["error"]
    return error


_HEAD = b'{"model":"ok","messages":[{"role":"user","content":"hi"}]'


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model":"ok","messages":[{"role":"user","content":"\\ud800"}]}', "messages[0].content"),
    (_HEAD + b',"temperature":1e309}', "temperature"),
    (_HEAD + b',"temperature":-1e309}', "temperature"),
    (_HEAD + b',"temperature":NaN}', "temperature"),
    (_HEAD + b',"temperature":Infinity}', "temperature"),
    (_HEAD + b',"top_p":-Infinity}', "top_p"),
    (_HEAD + b',"temperature":1' + b"0" * 400 + b"}", "temperature"),
    (_HEAD + b',"max_tokens":1' + b"0" * 400 + b"}", "max_tokens"),
    (_HEAD + b',"x":' + b"[" * 30_000 + b"]" * 30_000 + b"}", None),  # within the 64 KiB limit
    (b"\xff\xfe{}", None),
    (b"[]", None),
], ids=["lone-surrogate", "1e309", "-1e309", "NaN", "Infinity", "-Infinity", "int-10e400-as-float",
        "int-10e400-as-int", "30k-nested", "invalid-utf8", "not-an-object"])
async def test_hostile_json_is_400_not_500(edge: Running, body: bytes, param: str | None) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        r = await client.post("/v1/chat/completions", content=body,
                              headers={**AUTH, "content-type": "application/json"})
        assert (await client.get("/healthz")).status_code == 200
    error = _openai_error(r, 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert edge.router.seen == []


async def test_a_body_over_the_limit_is_413(edge: Running) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for _ in range(3):
            yield b" " * BODY_LIMIT

    async with httpx.AsyncClient(base_url=edge.url) as client:
        declared = await client.post("/v1/chat/completions", content=b" " * (BODY_LIMIT + 1), headers=AUTH)
        chunked = await client.post("/v1/chat/completions", content=chunks(), headers=AUTH)
        at_limit = await client.post("/v1/chat/completions", headers=AUTH,
                                     content=json.dumps(_chat()).encode().ljust(BODY_LIMIT))
        after = await client.post("/v1/chat/completions", json=_chat(), headers=AUTH)  # same connection
    for r in (declared, chunked):
        assert _openai_error(r, 413)["code"] == "request_too_large"
    assert at_limit.status_code == 200 and after.status_code == 200
    assert len(edge.router.seen) == 2


async def _raw(url: str, request: bytes, *, then_wait_s: float = 5.0) -> bytes:
    """Send raw bytes, then read the answer (the connection stays open, as a client still sending would)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), then_wait_s)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        return head + await asyncio.wait_for(reader.readexactly(length), then_wait_s)
    finally:
        writer.close()


async def test_a_chunked_body_is_refused_once_past_the_limit_without_waiting_for_the_rest(edge: Running) -> None:
    # Before: the whole body was read into memory first, so this client (which never finishes) got no answer.
    chunk = b"x" * (BODY_LIMIT + 1)
    reply = await _raw(edge.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                                 b"content-type: application/json\r\n\r\n" + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in reply


async def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(edge: Running) -> None:
    reply = await _raw(edge.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
                       % (BODY_LIMIT * 1000))
    assert reply.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in reply


async def test_a_malformed_http_request_gets_an_openai_error(edge: Running) -> None:
    # uvicorn's own answer is text/plain; the edge's protocol answers in the API's error format.
    reply = await _raw(edge.url, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer \x01\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"application/json" in reply
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "invalid_http_request" and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("headers", "status", "code"), [
    ({"content-type": "multipart/form-data; boundary=x"}, 415, "unsupported_media_type"),
    ({"content-type": "application/json; charset=latin-1"}, 415, "unsupported_media_type"),
    ({"content-encoding": "gzip"}, 415, "unsupported_media_type"),
    ({"authorization": "Bearer tg-" + "a" * 20_000}, 401, "invalid_api_key"),
    ({"authorization": "Bearer tg-\u00e9"}, 401, "invalid_api_key"),
])
async def test_bad_headers_are_refused_before_the_router(edge: Running, headers: dict[str, str], status: int,
                                                          code: str) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        r = await client.post("/v1/chat/completions", content=json.dumps(_chat()).encode(),
                              headers={**AUTH, **{k: v.encode("latin-1") for k, v in headers.items()}})
    assert _openai_error(r, status)["code"] == code
    assert edge.router.seen == []


async def test_metadata_is_forwarded_as_labels(edge: Running) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        r = await client.post("/v1/chat/completions", json=_chat(metadata={"team": "search"}), headers=AUTH)
    assert r.status_code == 200, r.text
    assert dict(edge.router.seen[0].labels) == {"team": "search"}


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
async def test_the_readmes_curl_request_is_served(edge: Running, content_type: str) -> None:
    # README.md's example is `curl … -d '{…}'` without -H, which sends application/x-www-form-urlencoded:
    # the body is JSON all the same, and OpenAI's API reads it as such.
    body = b'{"model": "auto", "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
    async with httpx.AsyncClient(base_url=edge.url) as client:
        r = await client.post("/v1/chat/completions", content=body,
                              headers={**AUTH, "content-type": content_type})
    assert r.status_code == 200, r.text


# --- issue 24: every response names its request (x-request-id; error.request_id in error bodies) ----------

_EDGE_ID = re.compile(r"[0-9a-f]{32}")


def _error_id(r: httpx.Response) -> str:
    rid = r.json()["error"]["request_id"]
    assert rid == r.headers["x-request-id"], (rid, r.headers)
    return str(rid)


async def test_the_routers_request_id_on_successes_and_errors(edge: Running) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        ok = await client.post("/v1/chat/completions", json=_chat(), headers=AUTH)
        limited = await client.post("/v1/chat/completions", json=_chat("quota"), headers=AUTH)
        invalid = await client.post("/v1/chat/completions", json=_chat(temperature=5), headers=AUTH)
        unknown_key = await client.post("/v1/chat/completions", json=_chat(), headers={"authorization": "Bearer x"})
        limited_stream = await client.post("/v1/chat/completions", json=_chat("quota", stream=True), headers=AUTH)
        stream = await client.post("/v1/chat/completions", json=_chat(stream=True), headers=AUTH)
        failed_mid = await client.post("/v1/chat/completions", json=_chat("fail-mid", stream=True), headers=AUTH)
    assert ok.headers["x-request-id"] == "req-1"
    for r, status in ((limited, 429), (invalid, 400), (unknown_key, 401), (limited_stream, 429)):
        assert r.status_code == status and _error_id(r) == "req-1"  # the router's id, from its trailer
    # A stream: the id (from the router's initial metadata) in the headers and in every chunk's id.
    assert stream.headers["x-request-id"] == "req-1"
    frames = [f.removeprefix("data: ") for f in stream.text.split("\n\n") if f and f != "data: [DONE]"]
    assert {json.loads(f)["id"] for f in frames} == {"chatcmpl-req-1"}
    # An error after the stream started: in the SSE error event.
    assert failed_mid.headers["x-request-id"] == "req-1"
    last = json.loads(failed_mid.text.split("\n\n")[-2].removeprefix("data: "))
    assert last["error"]["request_id"] == "req-1" and last["error"]["code"] == "backend_error"


async def test_errors_the_edge_answers_itself_get_an_edge_id(edge: Running) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        replies = [
            await client.post("/v1/chat/completions", content=b"{nope", headers=AUTH),
            await client.post("/v1/chat/completions", content=b"{}", headers={**AUTH, "content-type": "text/xml"}),
            await client.post("/v1/chat/completions", content=b"x" * (BODY_LIMIT + 1), headers=AUTH),
            await client.get("/v1/nothing-here"),
            await client.get("/v1/chat/completions"),
            await client.get("/v1/models/nope", headers=AUTH),
        ]
    ids = [_error_id(r) for r in replies]
    assert [r.status_code for r in replies] == [400, 415, 413, 404, 405, 404]
    assert all(_EDGE_ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)


async def test_successes_without_a_router_id_get_an_edge_id(edge: Running) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        replies = [await client.get("/v1/models", headers=AUTH), await client.get("/healthz")]
    assert [r.status_code for r in replies] == [200, 200]
    assert all(_EDGE_ID.fullmatch(r.headers["x-request-id"]) for r in replies)


async def test_router_unreachable_is_503_with_an_edge_id() -> None:
    async with _edge_for(f"127.0.0.1:{infra.free_port()}") as url, httpx.AsyncClient(base_url=url) as client:
        unary = await client.post("/v1/chat/completions", json=_chat(), headers={**AUTH, "x-request-timeout": "2"})
        stream = await client.post("/v1/chat/completions", json=_chat(stream=True),
                                   headers={**AUTH, "x-request-timeout": "2"})
    for r in (unary, stream):
        assert r.status_code in (503, 504), r.text
        assert _EDGE_ID.fullmatch(_error_id(r))


async def test_a_client_request_id_is_echoed_apart_never_used_as_ours(edge: Running) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as client:
        ok = await client.post("/v1/chat/completions", json=_chat(), headers={**AUTH, "x-request-id": "my-trace.1:a"})
        refused = await client.post("/v1/chat/completions", content=b"{nope",
                                    headers={**AUTH, "x-request-id": "my-trace.2"})
        too_long = await client.get("/healthz", headers={"x-request-id": "a" * 129})
        odd = await client.get("/healthz", headers={"x-request-id": "a b<script>"})
    assert ok.headers["x-request-id"] == "req-1" and ok.headers["x-client-request-id"] == "my-trace.1:a"
    assert refused.headers["x-client-request-id"] == "my-trace.2" and _error_id(refused) != "my-trace.2"
    for r in (too_long, odd):
        assert "x-client-request-id" not in r.headers and _EDGE_ID.fullmatch(r.headers["x-request-id"])
    assert [dict(s.labels) for s in edge.router.seen] == [{}]  # not forwarded either


async def test_a_malformed_http_request_names_its_request_too(edge: Running) -> None:
    reply = await _raw(edge.url, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer \x01\r\n\r\n")
    head, body = reply.split(b"\r\n\r\n", 1)
    [rid] = [line.split(b": ", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
    assert json.loads(body)["error"]["request_id"] == rid.decode() and _EDGE_ID.fullmatch(rid.decode())
