"""Virtual keys: generation, hashing, lookup with a short-lived in-process cache.

Keys are ``tg-`` + 32 random bytes (256 bits, URL-safe base64). With that much
entropy a brute-force or dictionary attack on a leaked hash is hopeless, so a
fast unsalted SHA-256 is the right hash: it lets the router find a key by its
hash in one indexed lookup. Slow password hashes (bcrypt, argon2) exist for
low-entropy human passwords and would only add latency here.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from libs.chat import Principal
from libs.errors import PermissionDenied, Unauthenticated, Unavailable

KEY_PREFIX = "tg-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


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

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


class KeyLookup(Protocol):
    async def find_by_hash(self, key_hash: bytes) -> KeyRecord | None: ...


class Authenticator:
    """Bearer token -> KeyRecord. Fails closed: no valid key, no service."""

    def __init__(self, lookup: KeyLookup, *, cache_ttl_s: float, stale_ttl_s: float = 300.0):
        self._lookup = lookup
        self._ttl = cache_ttl_s
        # While PostgreSQL is down, keys seen recently keep working this long (DESIGN: auth from the key cache).
        self._stale_ttl = stale_ttl_s
        self._cache: dict[bytes, tuple[float, KeyRecord | None]] = {}

    def forget(self, key_hash: bytes | None = None) -> None:
        if key_hash is None:
            self._cache.clear()
        else:
            self._cache.pop(key_hash, None)

    async def authenticate(self, authorization: str | None) -> KeyRecord:
        if not authorization:
            raise Unauthenticated("missing authorization metadata (expected 'Bearer tg-…')")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token.startswith(KEY_PREFIX):
            raise Unauthenticated("authorization must be 'Bearer tg-…'")
        key_hash = hash_key(token)
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None and now - cached[0] < self._ttl:
            record = cached[1]
        else:
            try:
                record = await self._lookup.find_by_hash(key_hash)
            except Unavailable:
                if cached is not None and cached[1] is not None and now - cached[0] < self._stale_ttl:
                    record = cached[1]
                else:
                    raise Unavailable("cannot verify the key right now (control plane unavailable)") from None
            else:
                self._cache[key_hash] = (now, record)
        if record is None:
            raise Unauthenticated("unknown key")
        if record.revoked:
            raise Unauthenticated("key revoked")
        if record.expires_at is not None and record.expires_at <= datetime.now(UTC):
            raise Unauthenticated("key expired")
        return record


def require_admin(record: KeyRecord) -> None:
    if not record.is_admin:
        raise PermissionDenied("this call needs an admin key")
