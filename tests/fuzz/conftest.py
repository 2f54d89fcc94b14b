from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fuzz import ServerErrorLog, server_error_log


@pytest.fixture(scope="module")
def server_errors() -> Iterator[ServerErrorLog]:
    """Every error the server's interceptor logs as unhandled during a module's fuzzing (a failure even
    when the client never sees the status)."""
    with server_error_log() as log:
        yield log
