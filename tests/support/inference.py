"""An inference service in this event loop, in front of a fake provider (router integration tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from libs.grpc_server import GrpcServer
from services.inference.server import build
from services.inference.settings import InferenceSettings
from tools.fake_provider import FakeProvider


@asynccontextmanager
async def inference_replica(provider: FakeProvider, model: str = "m", **settings: object) -> AsyncIterator[str]:
    """Serve ``model`` (upstream fake-small) on a free loopback port; yields its ``host:port``."""
    config = InferenceSettings(port=0, provider_base_url=provider.url, served_models=f"{model}=fake-small",
                               **settings)  # type: ignore[arg-type]
    bindings, close = await build(config)
    server = GrpcServer(config, bindings)
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        await close()
