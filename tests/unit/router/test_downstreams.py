"""GrpcInferenceClient (services/router/downstreams.py): faults the request path detects itself."""

from __future__ import annotations

from libs.errors import Unavailable
from services.router.downstreams import GrpcInferenceClient


async def test_timeouts_recorded_by_the_request_path_open_the_replicas_breaker() -> None:
    client = GrpcInferenceClient(margin_s=0.02, cap_s=60, fail_max=5, reset_timeout_s=5, timeout_trip=3)
    target = "127.0.0.1:1"
    try:
        for _ in range(2):
            client.record_fault(target, Unavailable("no first token", reason="BACKEND_TIMEOUT"))
        assert client.order([target]) == [target]
        client.record_fault(target, Unavailable("no first token", reason="BACKEND_TIMEOUT"))
        assert client.order([target]) == [] and client.breaker(target).is_open
    finally:
        await client.aclose()
