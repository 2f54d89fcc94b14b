"""Virtual keys: generation, hashing, the key record, revocation broadcast.

Authentication (lookup with a short-lived, bounded in-process cache) is the pipeline's first stage:
``services/router/pipeline/authenticate.py``.

Keys are ``tg-`` + 32 random bytes (256 bits, URL-safe base64). With that much
entropy a brute-force or dictionary attack on a leaked hash is hopeless, so a
fast unsalted SHA-256 is the right hash: it lets the router find a key by its
hash in one indexed lookup. Slow password hashes (bcrypt, argon2) exist for
low-entropy human passwords and would only add latency here.

Revocation reaches every router two ways: positive cache entries live at most
``cache_ttl_s`` (``TOLLGATE_ROUTER_KEY_CACHE_TTL_S``, 0.5 s by default), and a revoked
key id is published on a Redis channel that every router's :class:`RevocationBus`
listens to, which evicts it at once (and keeps rejecting it while PostgreSQL is down and the stale cache
would otherwise still serve it).

"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.chat import Principal
from libs.errors import PermissionDenied
from services.router.tasks import raise_if_cancelling

log = logging.getLogger(__name__)

KEY_PREFIX = "tg-"
KEY_RANDOM_BYTES = 32
HASH_ALGORITHM = "sha256"
# What `tollgate key create` and CreateKeyResponse tell the operator (the issue: "the tool says which hash and why").
HASH_RATIONALE = (
    "The key is shown once and stored only as its SHA-256 digest. Keys are 256 bits from the OS's secure "
    "random generator, so a leaked digest cannot be reversed by brute force or dictionary (2^256 guesses); "
    "salts and slow password hashes (bcrypt, scrypt, argon2) defend low-entropy human passwords and would "
    "only add latency to every request. An unsalted digest also lets the router find the key in one "
    "indexed lookup."
)
REVOCATION_CHANNEL = "keys:revoked"
# Service tiers, most sheddable first.
KEY_TIERS = ("free", "pro", "enterprise")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def display_prefix(key: str) -> str:
    return key[:10]


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    principal: Principal
    role: str  # "admin" | "member"
    allowed_models: tuple[str, ...]
    expires_at: datetime | None
    revoked: bool
    # Service tier: "free" | "pro" | "enterprise" (who is shed first under overload).
    tier: str = "pro"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


class KeyAuthenticator(Protocol):
    """Bearer token -> KeyRecord (``services/router/pipeline/authenticate.py`` implements it)."""

    async def authenticate(self, authorization: str | None, source: str = "") -> KeyRecord: ...

    def revoked(self, key_id: str) -> None:
        """Reject ``key_id`` from now on, whatever is cached."""
        ...


class RevocationListener(Protocol):
    """What the revocation bus tells a router's key cache."""

    def expire_all(self) -> None: ...

    def revoked(self, key_id: str) -> None: ...


def require_admin(record: KeyRecord) -> None:
    if not record.is_admin:
        raise PermissionDenied("this call needs an admin key")


class RevocationBus:
    """Redis pub/sub channel ``{prefix}keys:revoked``: the router that revokes a key publishes its id,
    every router (itself included) evicts it from its key cache.

    Publishing is best effort: if Redis is down the cache TTL still bounds how long a revoked key works.
    A listener that was disconnected may have missed messages, so on every (re)subscribe it drops its
    whole key cache.
    """

    def __init__(self, client: redis.Redis, prefix: str):
        self._redis = client
        self.channel = f"{prefix}{REVOCATION_CHANNEL}"
        self.subscribed = asyncio.Event()
        self.subscriptions = 0  # how many times it (re)subscribed: 1 + reconnects

    async def publish(self, key_id: str) -> None:
        try:
            await self._redis.publish(self.channel, key_id)
        except (RedisError, OSError) as exc:
            log.warning("revocation of %s not broadcast (%s); cache TTL applies", key_id, type(exc).__name__)

    async def listen_forever(self, auth: RevocationListener, *, poll_s: float = 1.0, retry_s: float = 1.0) -> None:
        while True:
            raise_if_cancelling()
            pubsub: Any = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                auth.expire_all()  # what was revoked while unsubscribed is re-read on next use
                self.subscriptions += 1
                self.subscribed.set()
                while True:
                    raise_if_cancelling()
                    # A bounded wait (below the client's socket timeout) instead of listen(), which would
                    # treat a quiet channel as a read timeout.
                    message = await pubsub.get_message(timeout=poll_s)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        auth.revoked(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("revocation listener disconnected (%s); retrying in %.1fs", type(exc).__name__,
                            retry_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(retry_s)
