from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.stubs import stub_version_problem

# Before anything imports a stub: a mismatch would otherwise fail every module at collection, far from its cause.
if (_problem := stub_version_problem()) is not None:
    pytest.exit(f"gen/ does not match the grpcio runtime: {_problem}", returncode=4)

from tests.support import infra


@pytest.fixture
def redis_url() -> str:
    return infra.REDIS_URL


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix no other test run uses; its keys are deleted afterwards."""
    prefix = f"tgtest:{infra.unique_name('run')}:"
    yield prefix
    await infra.delete_redis_prefix(redis_url, prefix)


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    name = infra.unique_name("tollgate_test")
    url = await infra.create_database(name)
    yield url
    await infra.drop_database(name)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No TOLLGATE_* variables from the developer's shell leak into settings tests."""
    for key in list(os.environ):
        if key.startswith("TOLLGATE_") and not key.startswith("TOLLGATE_TEST_"):
            monkeypatch.delenv(key)
    yield
