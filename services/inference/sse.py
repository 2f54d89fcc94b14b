"""Incremental Server-Sent Events decoder (the WHATWG event-stream format).

Fed raw bytes exactly as the network delivers them: a read may end inside a
multi-byte UTF-8 character, inside a ``data:`` line, or between the ``\\r`` and
``\\n`` of a CRLF. Comments (``: keepalive``) are skipped; ``id`` / ``retry``
are kept; an event is dispatched at the blank line that ends it.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_EOL = re.compile(r"\r\n|\r|\n")

# A single line longer than this is not an event stream we want to buffer.
DEFAULT_MAX_LINE_CHARS = 4 * 1024 * 1024


class SSEProtocolError(Exception):
    """The byte stream is not a usable event stream."""


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry_ms: int | None = None


class SSEDecoder:
    """Turns byte chunks into :class:`SSEEvent` s; keeps state across chunks."""

    def __init__(self, *, max_line_chars: int = DEFAULT_MAX_LINE_CHARS):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max_line_chars = max_line_chars
        self._pending = ""  # text after the last line terminator
        self._skip_lf = False  # the previous chunk ended with "\r": a leading "\n" belongs to it
        self._at_start = True
        self._event = ""
        self._data: list[str] = []
        self._last_id: str | None = None
        self._retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        return self._feed_text(self._utf8.decode(chunk))

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a final unterminated line and a final unterminated event."""
        events = self._feed_text(self._utf8.decode(b"", final=True))
        if self._pending:
            event = self._line(self._pending)
            self._pending = ""
            if event is not None:
                events.append(event)
        event = self._dispatch()
        if event is not None:
            events.append(event)
        return events

    def _feed_text(self, text: str) -> list[SSEEvent]:
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            text = text.removeprefix("\ufeff")
        if self._skip_lf:
            self._skip_lf = False
            text = text.removeprefix("\n")
        buf = self._pending + text if self._pending else text
        events: list[SSEEvent] = []
        start = 0
        for match in _EOL.finditer(buf):
            event = self._line(buf[start:match.start()])
            if event is not None:
                events.append(event)
            start = match.end()
            if match.group() == "\r" and start == len(buf):
                self._skip_lf = True
        self._pending = buf[start:]
        if len(self._pending) > self._max_line_chars:
            raise SSEProtocolError(f"event-stream line longer than {self._max_line_chars} characters")
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment / keepalive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isdigit():
            self._retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._last_id,
                         retry_ms=self._retry_ms)
        self._data = []
        self._event = ""
        return event
