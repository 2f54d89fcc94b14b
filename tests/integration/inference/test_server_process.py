"""``python -m services.inference`` as a real process, against the fake provider (served from a thread)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc

from tests.support.infra import free_port
from tests.support.procs import ServiceProcess
from tools.fake_provider import ANSWER_PREFIX, FakeProvider

API_KEY = "sk-process-test-key"
PROMPT = "zebra quokka marmot"  # words that must never show up in the service's log


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider(api_key=API_KEY).in_thread() as fp:
        yield fp


@pytest.fixture
def service(fake: FakeProvider, tmp_path: Path, clean_env: None) -> Iterator[ServiceProcess]:
    port = free_port()
    proc = ServiceProcess("inference", port, {
        "TOLLGATE_INFERENCE_PORT": str(port),
        "TOLLGATE_INFERENCE_PROVIDER_BASE_URL": f"{fake.url}/v1",
        "TOLLGATE_INFERENCE_API_KEY": API_KEY,
        "TOLLGATE_INFERENCE_SERVED_MODELS": "tiny=fake-small",
        "TOLLGATE_INFERENCE_PROVIDER_NAME": "fakeai",
        "TOLLGATE_LOG_LEVEL": "DEBUG",
    }, tmp_path)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def generate(address: str, timeout: float) -> list[inference_pb2.GenerateResponse]:
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        req = inference_pb2.GenerateRequest(request_id="proc-1", model="tiny", messages=[
            common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content=PROMPT)])
        return list(stub.Generate(req, timeout=timeout))


def test_process_streams_and_stops_cleanly(service: ServiceProcess, fake: FakeProvider) -> None:
    responses = generate(service.address, timeout=5)
    assert "".join(r.delta for r in responses[:-1]) == f"{ANSWER_PREFIX} {PROMPT}"
    result = responses[-1].result
    assert (result.usage.input_tokens, result.usage.output_tokens, result.provider) == (3, 10, "fakeai")

    fake.configure(mode="hang")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc_info:
        generate(service.address, timeout=0.2)
    assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 2
    while fake.snapshot()["active_streams"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.snapshot()["active_streams"] == 0

    assert service.stop() == 0
    log = service.log()
    assert "request_id=proc-1" in log
    for secret in (API_KEY, "zebra", "quokka", "fake answer"):
        assert secret not in log
