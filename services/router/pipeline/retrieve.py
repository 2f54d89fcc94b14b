"""Stage 3, retrieve (only when the caller asked for it): the key's own tenant's documents for the last
user message, added as a system message after the caller's. It runs before the cache lookup because the
retrieved context is part of the prompt, so of the cache key too. The answer's citations map back to
chunk ids when the request is accounted."""

from __future__ import annotations

from dataclasses import replace

from libs.chat import ChatMessage, Role
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, Unavailable
from libs.rag_context import assemble_context
from services.router.pipeline.ports import RetrievalClient
from services.router.pipeline.request import GenerateCommand, RequestState

MAX_QUERY_CHARS = 4096


class RetrieveStage:
    def __init__(self, retrieval: RetrievalClient | None, timeout_s: float):
        self._retrieval = retrieval
        self._timeout_s = timeout_s

    async def augment(self, state: RequestState, deadline: Deadline) -> GenerateCommand:
        """The command with the retrieved sources in it (unchanged when nothing was found, or when retrieval
        is down and not required: then the request is marked degraded)."""
        cmd = state.cmd
        query = next((m.content for m in reversed(cmd.messages) if m.role is Role.USER), "")[:MAX_QUERY_CHARS]
        try:
            if self._retrieval is None:
                raise Unavailable("retrieval is not configured on this gateway", reason="NO_RETRIEVAL")
            hits = await self._retrieval.search(state.key.principal.org_id, query, cmd.retrieval.top_k,
                                                deadline.within(self._timeout_s))
        except (Unavailable, DeadlineExceeded) as exc:
            if cmd.retrieval.required:
                raise Unavailable(f"retrieval is required for this request and unavailable ({exc.reason})",
                                  reason="RETRIEVAL_UNAVAILABLE") from None
            state.degrade("retrieval_unavailable", f"answered without retrieved context ({exc.reason})")
            return cmd
        context = assemble_context(hits, cmd.retrieval.max_context_tokens)
        if not context.text:
            return cmd
        state.context = context
        cut = next((i for i, m in enumerate(cmd.messages) if m.role is not Role.SYSTEM), len(cmd.messages))
        messages = [*cmd.messages[:cut], ChatMessage(Role.SYSTEM, context.text), *cmd.messages[cut:]]
        return replace(cmd, messages=messages)
