from datetime import UTC, datetime, timedelta

import pytest

from libs.chat import Principal
from libs.errors import PermissionDenied, Unauthenticated, Unavailable
from services.router.control.keys import KeyRecord, hash_key, new_key, require_admin
from services.router.pipeline.authenticate import Authenticator


def _record(key_id: str = "key_1", **kw: object) -> KeyRecord:
    base: dict[str, object] = dict(key_id=key_id, principal=Principal("org_1", "team_1", key_id), role="member",
                                   allowed_models=(), expires_at=None, revoked=False)
    base.update(kw)
    return KeyRecord(**base)  # type: ignore[arg-type]


class FakeLookup:
    def __init__(self) -> None:
        self.by_hash: dict[bytes, KeyRecord] = {}
        self.calls = 0
        self.down = False

    async def find_by_hash(self, key_hash: bytes) -> KeyRecord | None:
        self.calls += 1
        if self.down:
            raise Unavailable("db down")
        return self.by_hash.get(key_hash)


def test_keys_are_random_and_hashed() -> None:
    a, b = new_key(), new_key()
    assert a != b and a.startswith("tg-") and len(a) > 40
    assert len(hash_key(a)) == 32 and hash_key(a) != hash_key(b)


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer nope", "tg-abc"])
async def test_malformed_authorization_is_unauthenticated(header: str | None) -> None:
    with pytest.raises(Unauthenticated):
        await Authenticator(FakeLookup(), cache_ttl_s=1).authenticate(header)


async def test_known_unknown_revoked_expired() -> None:
    lookup = FakeLookup()
    good, revoked, expired = new_key(), new_key(), new_key()
    lookup.by_hash[hash_key(good)] = _record("k_good")
    lookup.by_hash[hash_key(revoked)] = _record("k_rev", revoked=True)
    lookup.by_hash[hash_key(expired)] = _record("k_exp", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    auth = Authenticator(lookup, cache_ttl_s=0)
    assert (await auth.authenticate(f"Bearer {good}")).key_id == "k_good"
    for key, message in ((new_key(), "unknown"), (revoked, "revoked"), (expired, "expired")):
        with pytest.raises(Unauthenticated, match=message):
            await auth.authenticate(f"Bearer {key}")


async def test_positive_cache_and_revocation_within_ttl() -> None:
    lookup = FakeLookup()
    key = new_key()
    lookup.by_hash[hash_key(key)] = _record()
    auth = Authenticator(lookup, cache_ttl_s=60)
    await auth.authenticate(f"Bearer {key}")
    await auth.authenticate(f"Bearer {key}")
    assert lookup.calls == 1  # the second request did not query the database
    lookup.by_hash[hash_key(key)] = _record(revoked=True)
    auth.forget()
    with pytest.raises(Unauthenticated):
        await auth.authenticate(f"Bearer {key}")


async def test_database_down_serves_recent_keys_and_fails_closed_for_others() -> None:
    lookup = FakeLookup()
    key = new_key()
    lookup.by_hash[hash_key(key)] = _record()
    auth = Authenticator(lookup, cache_ttl_s=0, stale_ttl_s=60)
    await auth.authenticate(f"Bearer {key}")
    lookup.down = True
    assert (await auth.authenticate(f"Bearer {key}")).key_id == "key_1"
    with pytest.raises(Unavailable):
        await auth.authenticate(f"Bearer {new_key()}")


def test_admin_required() -> None:
    require_admin(_record(role="admin"))
    with pytest.raises(PermissionDenied):
        require_admin(_record())
