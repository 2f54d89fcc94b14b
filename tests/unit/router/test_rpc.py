"""The client address for client-IP limits: the gRPC peer, or what a trusted proxy (the edge) forwards."""

from __future__ import annotations

from typing import Any

from libs.clients import CLIENT_IP_METADATA
from services.router.rpc import client_ip


class Context:
    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._peer, self._metadata = peer, metadata

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> Any:
        return self._metadata


TRUSTED = frozenset({"127.0.0.1", "::1"})


def test_the_peer_address_without_a_proxy() -> None:
    assert client_ip(Context("ipv4:10.1.2.3:5555"), TRUSTED) == "10.1.2.3"  # type: ignore[arg-type]
    assert client_ip(Context("ipv6:[2001:db8::1]:5555"), TRUSTED) == "2001:db8::1"  # type: ignore[arg-type]


def test_a_trusted_proxy_forwards_the_clients_address() -> None:
    ctx = Context("ipv4:127.0.0.1:5555", ((CLIENT_IP_METADATA, "203.0.113.9"),))
    assert client_ip(ctx, TRUSTED) == "203.0.113.9"  # type: ignore[arg-type]


def test_anyone_else_cannot_forge_it() -> None:
    ctx = Context("ipv4:10.1.2.3:5555", ((CLIENT_IP_METADATA, "203.0.113.9"),))
    assert client_ip(ctx, TRUSTED) == "10.1.2.3"  # type: ignore[arg-type]
    assert client_ip(Context("ipv4:127.0.0.1:1", ((CLIENT_IP_METADATA, "x" * 65),)), TRUSTED) == "127.0.0.1"  # type: ignore[arg-type]
