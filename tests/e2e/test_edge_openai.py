"""The official `openai` client against the HTTP edge: edge -> router -> ratelimit/cache -> inference -> the
fake provider, every hop a real process."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import openai
import pytest
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc

from tests.e2e.conftest import MODEL, RunningMesh

pytestmark = pytest.mark.e2e

NO_CACHE = {"x-tollgate-cache": "no-cache, no-store"}


async def _key(mesh: RunningMesh, **limits: int) -> tuple[str, str]:
    """A new member key in the bootstrap org and team, with key-level limits if given."""
    md = (("authorization", f"Bearer {mesh.admin_key}"),)
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        p = (await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=md)).keys[0].principal
        created = await admin.CreateKey(admin_pb2.CreateKeyRequest(
            org_id=p.org_id, team_id=p.team_id, name=f"edge-{uuid.uuid4().hex[:6]}",
            role=admin_pb2.KEY_ROLE_MEMBER), metadata=md)
        if limits:
            await admin.SetLimits(admin_pb2.SetLimitsRequest(
                scope=common_pb2.LIMIT_SCOPE_KEY, scope_id=created.key_id, **limits), metadata=md)
    return created.key_id, created.key


def _client(mesh: RunningMesh, key: str) -> openai.AsyncOpenAI:
    # No client-side retries: each test sees the edge's first answer.
    return openai.AsyncOpenAI(base_url=f"{mesh.edge_url}/v1", api_key=key, max_retries=0, timeout=30)


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_plain_completion_then_exact_hit(mesh: RunningMesh) -> None:
    _, key = await _key(mesh)
    question = f"What does a gateway do? {uuid.uuid4().hex}"
    async with _client(mesh, key) as client:
        first = await client.chat.completions.create(model=MODEL, messages=_user(question), temperature=0,
                                                     max_tokens=32)
        await asyncio.sleep(0.5)  # the router stores the answer after responding
        second = await client.chat.completions.create(model=MODEL, messages=_user(question), temperature=0,
                                                      max_tokens=32)
    assert first.choices[0].message.content and first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason == "stop" and first.model == MODEL
    assert first.usage is not None and first.usage.prompt_tokens > 0 and first.usage.completion_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    extra: dict[str, Any] = first.model_extra["tollgate"]  # type: ignore[index]
    assert first.id == "chatcmpl-" + extra["request_id"]
    assert extra["cache_tier"] == "miss" and extra["cost_nano_usd"] > 0 and extra["attempts"] >= 1
    hit: dict[str, Any] = second.model_extra["tollgate"]  # type: ignore[index]
    assert second.choices[0].message.content == first.choices[0].message.content
    assert hit["cache_tier"] == "exact" and hit["saved_nano_usd"] == extra["cost_nano_usd"]


async def test_stream_matches_the_plain_answer_and_ends_with_usage(mesh: RunningMesh) -> None:
    _, key = await _key(mesh)
    question = f"Stream this please {uuid.uuid4().hex}"
    async with _client(mesh, key) as client:
        plain = await client.chat.completions.create(model=MODEL, messages=_user(question), temperature=0,
                                                     max_tokens=32, extra_headers=NO_CACHE)
        stream = await client.chat.completions.create(model=MODEL, messages=_user(question), temperature=0,
                                                      max_tokens=32, stream=True,
                                                      stream_options={"include_usage": True},
                                                      extra_headers=NO_CACHE)
        chunks = [chunk async for chunk in stream]
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in with_choices if c.choices[0].delta.content]) >= 2
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert with_choices[-1].model_extra["tollgate"]["cache_tier"] == "miss"  # type: ignore[index]
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]


async def test_models_list(mesh: RunningMesh) -> None:
    _, key = await _key(mesh)
    async with _client(mesh, key) as client:
        ids = [m.id async for m in client.models.list()]
        one = await client.models.retrieve(MODEL)
    assert {MODEL, "auto"} <= set(ids)
    assert one.id == MODEL and one.owned_by


async def test_bad_key_and_bad_input(mesh: RunningMesh) -> None:
    _, key = await _key(mesh)
    async with _client(mesh, "tg-not-a-key") as client:
        with pytest.raises(openai.AuthenticationError) as unauthenticated:
            await client.chat.completions.create(model=MODEL, messages=_user("hi"))
    assert unauthenticated.value.status_code == 401 and unauthenticated.value.code == "invalid_api_key"
    async with _client(mesh, key) as client:
        with pytest.raises(openai.BadRequestError) as out_of_range:  # judged by the router
            await client.chat.completions.create(model=MODEL, messages=_user("hi"), temperature=5)
        with pytest.raises(openai.BadRequestError) as image:  # refused by the edge
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
        with pytest.raises(openai.BadRequestError) as unknown_model:
            await client.chat.completions.create(model="no-such-model", messages=_user("hi"))
    assert out_of_range.value.param == "temperature" and out_of_range.value.type == "invalid_request_error"
    assert image.value.param == "messages[0].content[0].type"
    assert unknown_model.value.param == "model"


async def test_rate_limited_key_gets_429_with_retry_after(mesh: RunningMesh) -> None:
    _, key = await _key(mesh, requests_per_minute=1)
    await asyncio.sleep(1.0)  # the limiter reloads limits every 0.5 s in this mesh
    async with _client(mesh, key) as client:
        await client.chat.completions.create(model=MODEL, messages=_user(f"one {uuid.uuid4().hex}"),
                                             extra_headers=NO_CACHE)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model=MODEL, messages=_user(f"two {uuid.uuid4().hex}"),
                                                 extra_headers=NO_CACHE)
    err = limited.value
    assert err.status_code == 429 and err.type == "rate_limit_error" and err.code == "rate_limit_exceeded"
    assert int(err.response.headers["retry-after"]) >= 1


async def test_client_disconnect_mid_stream_settles_the_request_as_cancelled(mesh: RunningMesh) -> None:
    key_id, key = await _key(mesh)
    mesh.provider(reset=True, extra_words=400, chunk_delay_ms=20)
    try:
        async with _client(mesh, key) as client:
            stream = await client.chat.completions.create(model=MODEL, messages=_user("A long story please"),
                                                          max_tokens=400, stream=True, extra_headers=NO_CACHE)
            got = 0
            async for _ in stream:
                got += 1
                if got == 5:
                    break
            await stream.close()  # drops the HTTP connection mid-stream
        state = await mesh.provider_idle()
        assert state["active_streams"] == 0 and state["cancelled_streams"] >= 1  # type: ignore[operator]
    finally:
        mesh.provider(reset=True)
    row = await mesh.ledger_row_of_key(key_id)
    assert row is not None and row["status"] == "cancelled"
    assert 0 < row["output_tokens"] < 400


async def test_provider_down_is_503(mesh: RunningMesh) -> None:
    key_id, key = await _key(mesh)
    mesh.provider(reset=True, mode="error_500")
    try:
        async with _client(mesh, key) as client:
            with pytest.raises(openai.APIStatusError) as down:
                await client.chat.completions.create(model=MODEL, messages=_user(f"down {uuid.uuid4().hex}"),
                                                     extra_headers=NO_CACHE)
    finally:
        mesh.provider(reset=True)
        await asyncio.sleep(1.2)  # the breaker's reset timeout in this mesh: later tests find it half-open
    assert isinstance(down.value, openai.InternalServerError)
    assert down.value.status_code == 503 and down.value.type == "server_error"
    # Issue 24: the error names the request, and it is the id of the request's usage-ledger row.
    rid = down.value.response.headers["x-request-id"]
    assert down.value.response.json()["error"]["request_id"] == rid
    row = await mesh.ledger_row_of_key(key_id)
    assert row is not None and row["request_id"] == rid
