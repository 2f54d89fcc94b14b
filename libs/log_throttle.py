"""One log line per kind of event per interval, however often it happens.

A dependency that is down makes every request hit the same fallback ("cache lookup skipped: BREAKER_OPEN"):
one WARNING per request buries the line that matters (the breaker opening) under thousands that say nothing
new, and costs CPU when the mesh can least afford it. ``ThrottledLog`` logs the first occurrence of each key
at once, then at most one line per ``interval_s`` carrying the count of those held back. Hand-written: the
standard library has no rate-limited logging, and no kept library does this without replacing the logger.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable


class ThrottledLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, *, max_keys: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._clock = clock
        # key -> [when it was last logged, occurrences held back since]
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` unless a line for ``key`` went out less than ``interval_s`` ago."""
        if not self._log.isEnabledFor(level):
            return
        now = self._clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self._interval_s:
            entry[1] += 1
            return
        held = int(entry[1]) if entry is not None else 0
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        if held:
            self._log.log(level, msg + " (%d more like this in the last %.0f s)", *args, held, now - entry[0])  # type: ignore[index]
        else:
            self._log.log(level, msg, *args)
