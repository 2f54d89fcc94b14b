"""AdminService's dead-letter RPCs: protobuf <-> domain (services/router/ledger/dead_letters.py) only.

A mixin of ``AdminServicer`` (services/router/servicer.py), which provides ``_admin`` (the admin key
check); the router's wiring hands it the store with ``serve_dead_letters``.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
from tollgate.router.v1 import admin_pb2

from libs.errors import FailedPrecondition, Violations
from services.router import rpc
from services.router import vocabulary as vocab
from services.router.ledger.dead_letters import MAX_PAGE, DeadLetter, DeadLetterStore

MAX_REPLAY_IDS = 1000
MAX_ID_CHARS = 64  # a stream entry id is "<ms>-<seq>"
MAX_EVENT_JSON_CHARS = 64 * 1024



# "<ms>-<seq>" in ASCII digits, each part a 64-bit unsigned number: anything else Redis refuses ("Invalid
# stream ID"), which must be the caller's INVALID_ARGUMENT, not an UNAVAILABLE. (str.isdigit() takes "²".)
_ENTRY_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?", re.ASCII)
_U64_MAX = 2**64 - 1


def _entry_id_ok(value: str) -> bool:
    match = _ENTRY_ID.fullmatch(value)
    return match is not None and all(int(part) <= _U64_MAX for part in match.groups() if part is not None)


def dead_letter_to_proto(d: DeadLetter) -> admin_pb2.DeadLetter:
    return admin_pb2.DeadLetter(id=d.id, request_id=d.request_id, reason=d.reason, event_json=d.event_json,
                                source_entry_id=d.source_id,
                                dead_time=rpc.to_timestamp(d.dead_at) if d.dead_at else None,
                                attempts=d.attempts)


class DeadLetterAdmin:
    _dead_letters: DeadLetterStore | None = None

    def serve_dead_letters(self, store: DeadLetterStore) -> None:
        self._dead_letters = store

    async def _admin(self, context: grpc.aio.ServicerContext) -> str:
        raise NotImplementedError  # AdminServicer's

    def _store(self) -> DeadLetterStore:
        if self._dead_letters is None:
            raise FailedPrecondition("this router has no usage stream configured", reason="NO_USAGE_STREAM")
        return self._dead_letters

    async def ListDeadLetters(self, request: admin_pb2.ListDeadLettersRequest,
                              context: Any) -> admin_pb2.ListDeadLettersResponse:
        await self._admin(context)
        v = Violations()
        v.check(0 <= request.page_size <= MAX_PAGE, "page_size", f"between 0 and {MAX_PAGE} (0: 100)")
        v.check(not request.page_token or _entry_id_ok(request.page_token), "page_token",
                "must be a next_page_token of an earlier page")
        v.raise_if_any()
        page = await self._store().list_page(request.page_size or 100, request.page_token)
        return admin_pb2.ListDeadLettersResponse(dead_letters=[dead_letter_to_proto(d) for d in page.letters],
                                                 total=page.total, next_page_token=page.next_after)

    async def ReplayDeadLetters(self, request: admin_pb2.ReplayDeadLettersRequest,
                                context: Any) -> admin_pb2.ReplayDeadLettersResponse:
        actor = await self._admin(context)
        ids = list(request.ids)
        v = Violations()
        v.check(request.all != bool(ids), "ids", "give the ids to replay, or set all (not both)")
        v.check(len(ids) <= MAX_REPLAY_IDS, "ids", f"at most {MAX_REPLAY_IDS}")
        v.check(all(_entry_id_ok(i) for i in ids), "ids", "must be dead-letter ids (<ms>-<seq>)")
        if request.repaired_event_json:
            v.check(len(ids) == 1 and not request.all, "repaired_event_json", "only with exactly one id")
            v.check(len(request.repaired_event_json) <= MAX_EVENT_JSON_CHARS, "repaired_event_json",
                    f"at most {MAX_EVENT_JSON_CHARS} characters")
        v.raise_if_any()
        store = self._store()
        results = await store.replay(actor, None if request.all else ids, request.repaired_event_json)
        return admin_pb2.ReplayDeadLettersResponse(
            results=[admin_pb2.DeadLetterReplayResult(id=r.id, request_id=r.request_id,
                                                      outcome=vocab.REPLAY_OUTCOME_PROTO[r.outcome],
                                                      reason=r.reason, new_id=r.new_id) for r in results],
            remaining=await store.count())
