from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from tollgate.inference.v1 import inference_pb2_grpc

from libs.grpc_server import GrpcServer
from services.inference.server import build
from services.inference.settings import InferenceSettings
from tools.fake_provider import FakeProvider


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider() as fp:
        yield fp


@asynccontextmanager
async def serving(fake: FakeProvider, **overrides: Any) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    """The inference service in-process on a free port, wired to ``fake``."""
    settings = InferenceSettings(**{
        "port": 0, "provider_base_url": fake.url, "provider_name": "fakeai",
        "served_models": "tiny=fake-small,other", "context_window": 4096,
        "max_concurrency": 4, "max_waiting": 4, **overrides,
    })
    bindings, close = await build(settings)
    server = GrpcServer(settings, bindings)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield inference_pb2_grpc.InferenceServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)
        await close()


@pytest.fixture
async def stub(fake: FakeProvider, clean_env: None) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with serving(fake) as s:
        yield s
