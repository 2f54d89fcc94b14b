"""The fake provider itself, over HTTP: the control API, non-streamed answers, models, auth, the process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.infra import free_port
from tests.support.procs import ROOT
from tools.fake_provider import ANSWER_PREFIX, FakeProvider

API_KEY = "sk-test-not-a-secret"
AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(api_key=API_KEY) as fp:
        yield fp


async def test_control_api_and_non_streamed_answers(fake: FakeProvider) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        body = {"model": "fake-small", "messages": [{"role": "user", "content": "one two three"}]}
        resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert resp.status_code == 200
        data = resp.json()
        assert data["choices"][0]["message"]["content"] == f"{ANSWER_PREFIX} one two three"
        assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13,
                                 "prompt_tokens_details": {"cached_tokens": 0}}

        resp = await client.post("/_control", json={"mode": "rate_limit_429", "retry_after_s": 4, "fail_next_n": 1,
                                                    "latency_ms": 100})
        assert resp.status_code == 200 and resp.json()["config"]["mode"] == "rate_limit_429"
        resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert (resp.status_code, resp.headers["retry-after"]) == (429, "4")

        started = time.monotonic()
        resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)  # fail_next_n ran out
        assert resp.status_code == 200
        assert time.monotonic() - started >= 0.1  # latency_ms still applies

        assert (await client.post("/_control", json={"mode": "sideways"})).status_code == 400
        assert (await client.post("/_control", json={"nonsense": 1})).status_code == 400

        state = (await client.get("/_control/state")).json()
        assert (state["requests_total"], state["active_streams"], state["cancelled_streams"]) == (3, 0, 0)
        assert (await client.post("/_control", json={"reset": True})).json()["requests_total"] == 0

        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["fake-small", "fake-large"]


async def test_anthropic_non_streamed_and_auth(fake: FakeProvider) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        body = {"model": "c", "max_tokens": 100, "system": "be brief",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}
        resp = await client.post("/v1/messages", json=body, headers={"x-api-key": API_KEY})
        data = resp.json()
        assert data["content"] == [{"type": "text", "text": f"{ANSWER_PREFIX} hello there"}]
        assert data["usage"]["input_tokens"] == 4 and data["usage"]["output_tokens"] == 9
        assert data["stop_reason"] == "end_turn"

        resp = await client.post("/v1/messages", json=body, headers={"x-api-key": "wrong"})
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 401


def test_runs_as_a_process() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tools.fake_provider", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                state = httpx.get(f"http://127.0.0.1:{port}/_control/state", timeout=1).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "fake provider did not start"
                time.sleep(0.05)
        assert state["active_streams"] == 0
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={
                "model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as resp:
            lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
    finally:
        proc.terminate()
        proc.wait(10)
