"""Helpers for the cache tests: a controllable clock and a TCP proxy that can take Redis "down"."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from urllib.parse import urlsplit

from libs.chat import ChatMessage, GenerationParams, Role
from services.cache.domain import CacheKey, Namespace


class FakeClock:
    """Wall clock for freshness decisions; Redis TTLs stay real, so tests move it forward only."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_key(text: str = "What is the capital of France?", *, tenant: str = "acme", model: str = "gpt-x",
             model_class: str = "fast", prompt_version: str = "v1", temperature: float = 0.0) -> CacheKey:
    return CacheKey(
        Namespace(tenant, model_class=model_class, system_prompt_hash="sp", prompt_version=prompt_version),
        model,
        (ChatMessage(Role.SYSTEM, "Answer briefly."), ChatMessage(Role.USER, text)),
        GenerationParams(temperature=temperature, max_output_tokens=64),
    )


class TcpProxy:
    """Forwards a local port to Redis; ``stop`` drops the listener and every open connection."""

    def __init__(self, target_url: str):
        parts = urlsplit(target_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._db = parts.path or "/0"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}{self._db}"

    async def start(self) -> TcpProxy:
        # Same port on restart, so clients configured with the URL reconnect on their own.
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writers.clear()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def static_model_dir() -> Path:
    """The semantic tier's embedding model, distilled on first use (cached under the data dir).

    Not skipped when torch is missing: the semantic tests must run wherever the suite runs.
    """
    from services.cache.setup_models import ensure_static_model

    return ensure_static_model()


def chat_key(*turns: str, tenant: str = "acme", prompt_version: str = "v1", model_class: str = "fast") -> CacheKey:
    """A conversation: user, assistant, user, ... (the last turn is the user's)."""
    roles = [Role.USER if i % 2 == 0 else Role.ASSISTANT for i in range(len(turns))]
    roles = roles[::-1] if len(turns) % 2 == 0 else roles
    return CacheKey(
        Namespace(tenant, model_class=model_class, system_prompt_hash="sp", prompt_version=prompt_version),
        "gpt-x",
        (ChatMessage(Role.SYSTEM, "Answer briefly."),
         *(ChatMessage(r, t) for r, t in zip(roles, turns, strict=True))),
        GenerationParams(temperature=0.0, max_output_tokens=64),
    )
