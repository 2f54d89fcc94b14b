"""With several inference replicas of one model, the router prefers the less busy one (by GetLoad)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from libs.chat import ChatMessage, GenerationParams, Role
from libs.deadlines import Deadline
from services.router.downstreams import GrpcInferenceClient
from tests.support.inference import inference_replica
from tools.fake_provider import FakeProvider


async def test_new_work_goes_to_the_less_busy_replica(clean_env: None) -> None:
    async with AsyncExitStack() as stack:
        provider = await stack.enter_async_context(FakeProvider())
        provider.configure(chunk_delay_ms=200, extra_words=20)  # each stream holds its replica for seconds
        a = await stack.enter_async_context(inference_replica(provider))
        b = await stack.enter_async_context(inference_replica(provider))
        client = GrpcInferenceClient(margin_s=0.01, cap_s=30, fail_max=3, reset_timeout_s=5, load_poll_s=0.1)
        try:
            assert client.order([a, b]) == [a, b]  # idle: the configured order
            messages = [ChatMessage(Role.USER, "tell me a long story")]

            async def hold(target: str) -> None:
                async for _ in client.generate(target, "r", "m", messages, GenerationParams(), Deadline.after(30)):
                    pass

            # Another router's traffic on A: only A's GetLoad knows about it.
            busy = [asyncio.create_task(hold_direct(a)) for _ in range(3)]
            await asyncio.sleep(0.5)
            assert client.load(a) >= 3 and client.load(b) == 0
            assert client.order([a, b]) == [b, a]
            # This router's own in-flight work counts immediately, before the next poll.
            mine = asyncio.create_task(hold(b))
            await asyncio.sleep(0.05)
            assert client.load(b) >= 1
            for task in [*busy, mine]:
                task.cancel()
            await asyncio.gather(*busy, mine, return_exceptions=True)
        finally:
            await client.aclose()


async def hold_direct(target: str) -> None:
    import grpc
    from tollgate.common.v1 import common_pb2
    from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        req = inference_pb2.GenerateRequest(request_id="other-router", model="m", messages=[
            common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content="long story")])
        async for _ in inference_pb2_grpc.InferenceServiceStub(ch).Generate(req, timeout=30):
            pass


pytestmark = pytest.mark.timeout(60)


async def test_a_restarted_replica_is_probed_as_soon_as_it_answers_its_load_poll(clean_env: None) -> None:
    from libs.errors import Unavailable
    from libs.grpc_server import GrpcServer
    from ops.launcher import free_port
    from services.inference.server import build
    from services.inference.settings import InferenceSettings

    async with AsyncExitStack() as stack:
        provider = await stack.enter_async_context(FakeProvider())
        config = InferenceSettings(port=free_port(), provider_base_url=provider.url,  # type: ignore[call-arg]
                                   served_models="m=fake-small")

        async def serve() -> GrpcServer:
            bindings, close = await build(config)
            stack.push_async_callback(close)
            server = GrpcServer(config, bindings)
            await server.start()
            return server

        server = await serve()
        target = f"127.0.0.1:{config.port}"
        # A reset timeout far longer than the test: only the poll can let traffic back this soon.
        client = GrpcInferenceClient(margin_s=0.01, cap_s=5, fail_max=1, reset_timeout_s=60, load_poll_s=0.1)
        stack.push_async_callback(client.aclose)
        messages = [ChatMessage(Role.USER, "hello")]

        async def call() -> None:
            async for _ in client.generate(target, "r", "m", messages, GenerationParams(), Deadline.after(5)):
                pass

        await call()
        await server.stop(0)  # killed
        with pytest.raises(Unavailable):
            await call()
        assert client.order([target]) == []  # its breaker is open
        await asyncio.sleep(0.3)  # polls fail meanwhile
        server = await serve()  # restarted on the same port
        stack.push_async_callback(server.stop, 0)
        for _ in range(30):
            if client.order([target]):
                break
            await asyncio.sleep(0.1)
        assert client.order([target]) == [target]  # probed within a few polls, not after 60 s
        await call()
        assert client.breaker(target).state == "closed"
