"""What this router's local limiter admitted, charged to the ratelimit service once it answers again (stage 5).

While the ratelimit service is unreachable the local limiter (``local_limits.py``) admits within this router's
share, and the service's token buckets, knowing nothing of it, refill. So every request the local limiter
admitted and accounting settled as served (``account.py``; a released one cost nothing) is queued here with
its actual usage: one request, its tokens and cost, when it started, under its request id. A **drain** sends
them with ``RateLimitService.Charge``, which draws them from every bucket of the subject without refusing
(stopping at zero) and commits the cost to its budgets, once per request id. Admission reserves with the
service again only when none is queued or on its way (:meth:`LocalCharges.require_delivered`): until then it
starts a pass and admits locally at once (no request waits for the backlog), so the service admits nothing
more until its buckets include what this router admitted alone (``local_limits.py`` states the bound).

Delivery: a pass sends the oldest charge alone (with the breaker half-open it is the probe), then up to
``concurrency`` at a time, each with ``call_timeout_s``; the first failure (unavailable, timed out, breaker
open) ends the pass, and what was not delivered stays queued, in order, for the next one. Requests that find
charges queued start a pass (one at a time), and :meth:`run_forever` starts one every ``retry_s`` while any
are queued, so they are delivered with no traffic too. A charge the service
refuses for good (invalid) is dropped and logged. Exactly once per request id: a charge leaves the queue only
when the service answered it, and one whose answer was lost is sent again and answered ``replayed`` (the
service keeps the id a day).

Bounded: at most ``max_pending`` queued; past it the oldest are dropped (their windows end first), and the
count dropped is logged, once per ``log_every_s``. A pass delivers a few thousand charges a second (one
Charge each, ``concurrency`` at a time): a backlog keeps admission local for as long, and a router whose
local admissions outpaced that would stay local (its share still bounding it). Not covered: charges still
queued when the router exits (:meth:`aclose` tries once more, briefly, and logs how many it leaves); a
ratelimit service without ``Charge`` (an older version: UNIMPLEMENTED, a backend error) never takes them, so
the router stays on its local limiter until the service is upgraded (deploy the ratelimit service first).
No I/O but through the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, TollgateError, Unavailable
from services.router.pipeline.ports import Charge, ChargeClient

log = logging.getLogger(__name__)


class LocalCharges:
    def __init__(self, ratelimit: ChargeClient, *, max_pending: int = 100_000, concurrency: int = 8,
                 call_timeout_s: float = 0.5, retry_s: float = 1.0, log_every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_pending < 1 or concurrency < 1:
            raise ValueError("max_pending and concurrency must be at least 1")
        self._ratelimit = ratelimit
        self._max_pending = max_pending
        self._concurrency = concurrency
        self._call_timeout_s = call_timeout_s
        self._retry_s = retry_s
        self._log_every_s = log_every_s
        self._clock = clock
        self._queue: deque[Charge] = deque()
        self._in_flight = 0
        self._drain: asyncio.Task[bool] | None = None
        self._dropped_unlogged = 0
        self._dropped_logged_at = -float("inf")
        self.delivered = 0
        self.dropped = 0  # the queue was full
        self.rejected = 0  # refused by the service for good

    def __len__(self) -> int:
        """Charges not delivered yet (queued or being sent)."""
        return len(self._queue) + self._in_flight

    @property
    def draining(self) -> bool:
        return self._drain is not None and not self._drain.done()

    def add(self, charge: Charge) -> None:
        """Queue a request the local limiter admitted, with its actual usage (accounting, after it was served)."""
        self._queue.append(charge)
        self._trim()

    def _trim(self) -> None:
        over = len(self._queue) - self._max_pending
        if over > 0:
            for _ in range(over):
                self._queue.popleft()
            self.dropped += over
            self._dropped_unlogged += over
        self._report_drops()

    def _report_drops(self) -> None:
        now = self._clock()
        if self._dropped_unlogged and now - self._dropped_logged_at >= self._log_every_s:
            log.error("unsynced-charge queue full (%d): dropped %d of the oldest charges for local admissions "
                      "(never delivered to the ratelimit service; %d dropped in all)",
                      self._max_pending, self._dropped_unlogged, self.dropped)
            self._dropped_unlogged = 0
            self._dropped_logged_at = now

    def kick(self) -> asyncio.Task[bool] | None:
        """Start a pass unless one is running; returns the running pass (None: nothing to deliver)."""
        if self._drain is not None and not self._drain.done():
            return self._drain
        if not self._queue:
            return None
        self._drain = asyncio.get_running_loop().create_task(self._pass(), name="local-charges")
        return self._drain

    def require_delivered(self) -> None:
        """Before admission reserves with the service: raises Unavailable (``CHARGES_PENDING``) while charges are
        queued or on their way, after starting a pass to deliver them (admission then admits locally, at once:
        no request waits for the backlog); returns when there are none."""
        if not self._queue and not self.draining:
            return
        self.kick()
        raise Unavailable("charges for local admissions are not yet delivered to the ratelimit service",
                          reason="CHARGES_PENDING")

    async def flush(self, deadline: Deadline) -> None:
        """Deliver what is queued and wait for it (a pass shared with whoever else waits). Raises Unavailable
        when the service did not take it all, or the pass outlasts ``deadline``."""
        task = self.kick()
        if task is None:
            return
        try:
            async with asyncio.timeout(max(0.0, deadline.remaining())):
                delivered = await asyncio.shield(task)
        except TimeoutError:
            raise Unavailable("charges for local admissions are still on their way to the ratelimit service",
                              reason="CHARGES_PENDING") from None
        if not delivered:
            raise Unavailable("the ratelimit service did not take the charges for local admissions",
                              reason="CHARGES_UNDELIVERED")
        if self._queue:
            await self.flush(deadline)  # queued while the pass ran its last batch

    async def _pass(self) -> bool:
        """Send what is queued, oldest first; False when a charge could not be delivered (it stays queued)."""
        delivered = self.delivered
        try:
            size = 1  # the oldest alone first: through a half-open breaker it is the probe
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
                if not await self._send_batch(batch):
                    return False
                size = self._concurrency
            return True
        except Exception:
            log.exception("delivering charges for local admissions failed; kept for the next try")
            return False
        finally:
            if self.delivered > delivered:
                log.info("charged the ratelimit service for %d local admissions (%d still queued)",
                         self.delivered - delivered, len(self._queue))

    async def _send_batch(self, batch: list[Charge]) -> bool:
        done: list[bool] = []
        self._in_flight = len(batch)
        try:
            done = list(await asyncio.gather(*(self._send(c) for c in batch)))
        finally:
            self._in_flight = 0
            kept = [c for i, c in enumerate(batch) if i >= len(done) or not done[i]]
            self._queue.extendleft(reversed(kept))
            self._trim()
        return not kept

    async def _send(self, charge: Charge) -> bool:
        """True when the charge is done with: delivered (or replayed), or refused for good (dropped, logged)."""
        try:
            # This router's own cap, not a caller's deadline: a charge the service sits on counts against its breaker.
            await self._ratelimit.charge(charge, Deadline(time.monotonic() + self._call_timeout_s, from_caller=False))
        except (Unavailable, DeadlineExceeded):
            return False
        except TollgateError as exc:
            self.rejected += 1
            log.error("the ratelimit service refused the charge for request %s (%s): dropped",
                      charge.request_id, exc.reason)
            return True
        self.delivered += 1
        return True

    async def run_forever(self) -> None:
        """Start a pass every ``retry_s`` while charges are queued (requests start one too, when they come)."""
        while True:
            await asyncio.sleep(self._retry_s)
            self._report_drops()
            self.kick()

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """Shutdown: one more bounded pass, then log what is left undelivered (lost with this process)."""
        with contextlib.suppress(Unavailable):
            await self.flush(Deadline.after(timeout_s))
        if self._drain is not None and not self._drain.done():
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        self._report_drops()
        if self._queue:
            log.error("%d charges for local admissions not delivered to the ratelimit service at shutdown",
                      len(self._queue))
