"""The router side of the ledger: events go to the Redis stream, or to a local spool file while Redis is
unreachable (replayed into the stream later, each line exactly once)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis.asyncio as redis
from redis.exceptions import RedisError

from services.router.ledger.events import UsageEvent
from services.router.tasks import raise_if_cancelling

log = logging.getLogger(__name__)


class UsageRecorder:
    """Appends events to the stream; spools to a local file while Redis is unreachable.

    The spool folder may be shared by several router processes (and recorders). Exactly-once into the
    stream, whatever a replay races with:
    - writers append to ``usage-spool-<pid>.jsonl`` while holding an exclusive ``flock`` on
      ``spool.lock`` (one lock for the folder, so it also covers other processes and threads);
    - a replay first renames every ``*.jsonl`` to a unique ``*.replaying`` name under that same lock, so
      no writer can append to a file being replayed: the next write creates a fresh file;
    - a ``*.replaying`` file is replayed by one replayer at a time (a non-blocking ``flock`` on the file
      itself, released by the kernel if that process dies), in chunks: each chunk's XADDs and a progress
      marker ``<stream>:spooled:<file name>`` (lines delivered so far) are one MULTI/EXEC, so a replay that
      dies after XADD and before the unlink resumes after what it delivered, instead of adding it again;
    - the file is removed only after every line is in the stream; then the marker.
    If the marker itself is lost (Redis lost data, or it expired after ``MARKER_TTL_S``), the lines come
    again and the ledger's request-id key still keeps one row each.
    """

    CHUNK = 500
    MARKER_TTL_S = 7 * 24 * 3600

    def __init__(self, client: redis.Redis, stream_key: str, spool_dir: Path):
        self._redis = client
        self._stream = stream_key
        self._spool_dir = spool_dir
        self._replay_lock = asyncio.Lock()  # one replay at a time in this recorder (the files lock the rest)

    @property
    def spool_path(self) -> Path:
        return self._spool_dir / f"usage-spool-{os.getpid()}.jsonl"

    async def record(self, event: UsageEvent) -> None:
        payload = event.to_json()
        try:
            await self._redis.xadd(self._stream, {"e": payload})
        except (RedisError, OSError):
            # An XADD whose reply was lost may have been applied: then the event is in the stream and in
            # the spool, and the ledger's request-id key keeps it once.
            await self._spool(payload)

    async def _spool(self, payload: str) -> None:
        # fsync: the event must survive the process dying before Redis returns.
        await asyncio.to_thread(_append_spooled, self._spool_dir, self.spool_path, payload)
        log.warning("redis unavailable: usage event spooled locally")

    async def replay_spool(self) -> int:
        """Move spooled events (from any process, earlier or running) into the stream; returns how many."""
        moved = 0
        async with self._replay_lock:
            if not self._spool_dir.exists():
                return 0
            await asyncio.to_thread(_rotate_spool_files, self._spool_dir)
            for path in sorted(self._spool_dir.glob(f"usage-spool-*{_REPLAYING}")):
                moved += await self._replay_file(path)
        if moved:
            log.info("replayed %d spooled usage events", moved)
        return moved

    async def _replay_file(self, path: Path) -> int:
        fd = await asyncio.to_thread(_claim, path)
        if fd is None:
            return 0  # another replayer has it, or it is already gone
        try:
            lines = await asyncio.to_thread(_read_lines, fd)
            marker = f"{self._stream}:spooled:{path.name}"
            done = int(await self._redis.get(marker) or 0)
            for start in range(done, len(lines), self.CHUNK):
                chunk = lines[start:start + self.CHUNK]
                async with self._redis.pipeline(transaction=True) as pipe:
                    for line in chunk:
                        pipe.xadd(self._stream, {"e": line})
                    pipe.set(marker, start + len(chunk), ex=self.MARKER_TTL_S)
                    await pipe.execute()
            # Unlink while holding the file's lock: a replayer that opened it meanwhile finds it gone.
            await asyncio.to_thread(path.unlink)
            await self._redis.delete(marker)
            return len(lines) - done
        finally:
            os.close(fd)

    async def replay_forever(self, every_s: float = 2.0) -> None:
        while True:
            raise_if_cancelling()
            await asyncio.sleep(every_s)
            if not self._spool_dir.exists():
                continue
            with contextlib.suppress(RedisError, OSError):  # still down: try again later
                await self.replay_spool()


_REPLAYING = ".replaying"
_LOCK_FILE = "spool.lock"


@contextlib.contextmanager
def _folder_lock(spool_dir: Path) -> Iterator[None]:
    """Exclusive across processes and threads (each call opens its own file description)."""
    fd = os.open(spool_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _append_spooled(spool_dir: Path, path: Path, line: str) -> None:
    spool_dir.mkdir(parents=True, exist_ok=True)
    with _folder_lock(spool_dir), open(path, "a+b") as f:
        data = (line + "\n").encode("utf-8")
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # an earlier write was cut short (disk full): keep this line whole
                data = b"\n" + data
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rotate_spool_files(spool_dir: Path) -> None:
    """Rename every file writers append to; the next write starts a new one."""
    with _folder_lock(spool_dir):
        for path in spool_dir.glob("usage-spool-*.jsonl"):
            path.rename(path.with_name(f"{path.stem}-{uuid.uuid4().hex}{_REPLAYING}"))
    _fsync_dir(spool_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _claim(path: Path) -> int | None:
    """An open descriptor holding the file's exclusive lock, or None if another replayer holds it or it is
    gone (replayed and removed since it was listed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return fd


def _read_lines(fd: int) -> list[str]:
    with os.fdopen(os.dup(fd), encoding="utf-8", errors="replace") as f:
        return [ln for ln in f.read().splitlines() if ln.strip()]
