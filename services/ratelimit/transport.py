"""A lean path to Redis for the two hot scripts (reserve, settle).

Two things in redis-py's asyncio client cost more client CPU than a rate-limit decision needs:
packing every argument in Python on every call, and the pool's per-checkout bookkeeping. Here a
caller packs what never changes once (:func:`bulk`), and :class:`PackedScript` sends EVALSHA
as ready-made RESP on a connection from :class:`Connections`. Everything else (connection
settings, reply parsing with hiredis when installed, error types) is redis-py's own.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors


def bulk(value: bytes) -> bytes:
    """One command argument as a RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class Connections:
    """Connections for the reserve and settle fast path, kept outside redis-py's pool.

    The pool's per-call bookkeeping (a lock, connection metrics, a readability probe on every
    checkout) cost more client CPU than sending the command. A connection is only ever put back
    with no reply outstanding (any error or cancellation disconnects it first), so it needs no
    probe. Connections are made with the client's own settings, at most ``max_size`` of them
    (Redis serves one command at a time anyway); callers beyond that wait for a free one.
    """

    def __init__(self, redis: aioredis.Redis, max_size: int = 32):
        self._pool = redis.connection_pool
        self._max_size = max_size
        self._made = 0
        self._free: list[Any] = []
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def get(self) -> Any:
        if self._free:
            conn = self._free.pop()
        elif self._made < self._max_size:
            conn = self._pool.make_connection()
            self._made += 1
        else:
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                conn = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.put(waiter.result())  # handed over just as we were cancelled: pass it on
                raise
        if not conn.is_connected:
            try:
                await conn.connect()
            except BaseException:
                self.put(conn)
                raise
        return conn

    def put(self, conn: Any) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._free.append(conn)

    async def aclose(self) -> None:
        free, self._free = self._free, []
        for conn in free:
            await conn.disconnect()


class PackedScript:
    """A script called with EVALSHA sent as pre-packed RESP on a :class:`Connections` connection.

    redis-py packs every argument in Python on every call; with the ~50 arguments of a reserve
    that was a third of its client-side CPU. The arguments that depend only on the subject are
    packed once per plan (the limiter's per-subject plan), the rest per call. Like redis-py's client here, a
    connection error is retried once on a fresh connection (a pooled connection can be stale
    after a Redis restart); NOSCRIPT loads the script and retries.
    """

    def __init__(self, redis: aioredis.Redis, connections: Connections, text: str):
        self._redis = redis
        self._connections = connections
        self._text = text
        self._head = b"$7\r\nEVALSHA\r\n" + bulk(hashlib.sha1(text.encode()).hexdigest().encode())

    async def __call__(self, n_keys: int, n_args: int, parts: Sequence[bytes]) -> Any:
        command = b"".join([b"*%d\r\n" % (3 + n_keys + n_args), self._head, bulk(b"%d" % n_keys), *parts])
        for attempt in range(3):
            conn = await self._connections.get()
            try:
                await conn.send_packed_command(command, check_health=False)
                reply = await conn.read_response()
            except redis_errors.NoScriptError:
                self._connections.put(conn)
                if attempt == 2:
                    raise
                await self._redis.script_load(self._text)
                continue
            except redis_errors.ResponseError:
                self._connections.put(conn)  # a whole reply was read: the connection is fine
                raise
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
                await conn.disconnect(nowait=True)
                self._connections.put(conn)
                if attempt >= 1:
                    raise
                continue
            except BaseException:
                # Cancelled (a deadline) with a reply possibly still due: never reuse the socket.
                await conn.disconnect(nowait=True)
                self._connections.put(conn)
                raise
            self._connections.put(conn)
            return reply
        raise redis_errors.ConnectionError("no reply after retrying")
