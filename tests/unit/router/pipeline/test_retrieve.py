"""RetrieveStage (services/router/pipeline/retrieve.py): the tenant's sources added to the prompt, or a marked miss."""

from __future__ import annotations

import pytest

from libs.chat import ChatMessage, GenerationParams, Principal, Role
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, TollgateError, Unavailable
from libs.rag_context import ContextChunk
from services.router.control.keys import KeyRecord
from services.router.pipeline.request import GenerateCommand, RequestState, RetrievalPolicy
from services.router.pipeline.retrieve import MAX_QUERY_CHARS, RetrieveStage

CHUNKS = [ContextChunk("doc1#0", "doc1", "Paris is the capital of France.", 0.9),
          ContextChunk("doc2#3", "doc2", "France is in Europe.", 0.5)]
TENANT_KEY = KeyRecord("k9", Principal("tenant-a", "team-a", "k9"), "member", (), None, False)


class FakeRetrieval:
    def __init__(self, hits: list[ContextChunk] | None = None, error: TollgateError | None = None) -> None:
        self.hits = CHUNKS if hits is None else hits
        self.error = error
        self.searches: list[tuple[str, str, int, Deadline]] = []

    async def search(self, tenant_id: str, query: str, top_k: int, deadline: Deadline) -> list[ContextChunk]:
        self.searches.append((tenant_id, query, top_k, deadline))
        if self.error is not None:
            raise self.error
        return self.hits


def _state(*messages: ChatMessage, **policy: object) -> RequestState:
    cmd = GenerateCommand(model="primary", messages=list(messages), params=GenerationParams(temperature=0.0),
                          retrieval=RetrievalPolicy(enabled=True, **policy))  # type: ignore[arg-type]
    return RequestState.begin(TENANT_KEY, cmd)


def _question(state_text: str = "capital of France?") -> ChatMessage:
    return ChatMessage(Role.USER, state_text)


async def test_the_context_goes_after_the_callers_system_messages() -> None:
    retrieval = FakeRetrieval()
    state = _state(ChatMessage(Role.SYSTEM, "Be brief."), ChatMessage(Role.SYSTEM, "Be kind."), _question(),
                   ChatMessage(Role.ASSISTANT, "Paris."), ChatMessage(Role.SYSTEM, "late system note"),
                   ChatMessage(Role.USER, "and of Spain?"))
    original = state.cmd
    cmd = await RetrieveStage(retrieval, 2.0).augment(state, Deadline.after(5))
    assert [(m.role, m.content[:9]) for m in cmd.messages] == [
        (Role.SYSTEM, "Be brief."), (Role.SYSTEM, "Be kind."), (Role.SYSTEM, "Answer th"),
        (Role.USER, "capital o"), (Role.ASSISTANT, "Paris."), (Role.SYSTEM, "late syst"), (Role.USER, "and of Sp")]
    context = cmd.messages[2].content
    assert "[1] (document doc1)" in context and "Paris is the capital of France." in context
    assert state.context is not None and state.context.labels == ("doc1#0", "doc2#3")
    assert state.context.text == context
    assert state.cmd is original and len(original.messages) == 6  # the caller's command is not mutated
    assert cmd.model == original.model and cmd.params == original.params and not state.degraded


async def test_without_system_messages_the_context_comes_first() -> None:
    state = _state(_question())
    cmd = await RetrieveStage(FakeRetrieval(), 2.0).augment(state, Deadline.after(5))
    assert [m.role for m in cmd.messages] == [Role.SYSTEM, Role.USER]
    assert cmd.messages[1] == _question()


async def test_the_context_goes_before_the_first_message_that_is_not_a_system_message() -> None:
    state = _state(ChatMessage(Role.SYSTEM, "Be brief."), ChatMessage(Role.ASSISTANT, "Hello."), _question())
    cmd = await RetrieveStage(FakeRetrieval(), 2.0).augment(state, Deadline.after(5))
    assert [m.role for m in cmd.messages] == [Role.SYSTEM, Role.SYSTEM, Role.ASSISTANT, Role.USER]
    assert state.context is not None and cmd.messages[1].content == state.context.text


@pytest.mark.parametrize(("hits", "max_context_tokens"), [([], 2000), (CHUNKS, 5)])
async def test_nothing_found_or_nothing_fitting_leaves_the_command_unchanged(hits: list[ContextChunk],
                                                                             max_context_tokens: int) -> None:
    state = _state(_question(), max_context_tokens=max_context_tokens)
    cmd = await RetrieveStage(FakeRetrieval(hits), 2.0).augment(state, Deadline.after(5))
    assert cmd is state.cmd and state.context is None and not state.degraded


@pytest.mark.parametrize("error", [Unavailable("down", reason="UNAVAILABLE"), DeadlineExceeded("slow")])
async def test_retrieval_down_and_optional_answers_without_context_marked_degraded(error: TollgateError) -> None:
    state = _state(_question())
    cmd = await RetrieveStage(FakeRetrieval(error=error), 2.0).augment(state, Deadline.after(5))
    assert cmd is state.cmd and state.context is None
    assert state.degraded == ["retrieval_unavailable"]
    assert state.degraded_detail == [f"answered without retrieved context ({error.reason})"]


async def test_retrieval_down_and_required_is_unavailable() -> None:
    state = _state(_question(), required=True)
    with pytest.raises(Unavailable) as err:
        await RetrieveStage(FakeRetrieval(error=DeadlineExceeded("slow")), 2.0).augment(state, Deadline.after(5))
    assert err.value.reason == "RETRIEVAL_UNAVAILABLE" and "DEADLINE_EXCEEDED" in err.value.message
    assert state.degraded == []


async def test_no_retrieval_client_configured() -> None:
    optional = _state(_question())
    cmd = await RetrieveStage(None, 2.0).augment(optional, Deadline.after(5))
    assert cmd is optional.cmd and optional.degraded == ["retrieval_unavailable"]
    assert "NO_RETRIEVAL" in optional.degraded_detail[0]
    required = _state(_question(), required=True)
    with pytest.raises(Unavailable) as err:
        await RetrieveStage(None, 2.0).augment(required, Deadline.after(5))
    assert err.value.reason == "RETRIEVAL_UNAVAILABLE" and "NO_RETRIEVAL" in err.value.message


async def test_the_query_is_the_last_user_message_cut_to_the_limit() -> None:
    retrieval = FakeRetrieval()
    long_question = "q" * (MAX_QUERY_CHARS - 1) + "XYZ"
    state = _state(_question("first question"), ChatMessage(Role.ASSISTANT, "an answer"),
                   ChatMessage(Role.USER, long_question), ChatMessage(Role.ASSISTANT, "trailing"), top_k=3)
    await RetrieveStage(retrieval, 2.0).augment(state, Deadline.after(5))
    [(_, query, top_k, _)] = retrieval.searches
    assert len(query) == MAX_QUERY_CHARS and query == long_question[:MAX_QUERY_CHARS] and query.endswith("X")
    assert top_k == 3


async def test_without_a_user_message_the_query_is_empty() -> None:
    retrieval = FakeRetrieval()
    await RetrieveStage(retrieval, 2.0).augment(_state(ChatMessage(Role.SYSTEM, "only this")), Deadline.after(5))
    assert retrieval.searches[0][1] == ""


async def test_the_search_is_for_the_keys_own_tenant_within_the_retrieval_timeout() -> None:
    retrieval = FakeRetrieval()
    await RetrieveStage(retrieval, 0.25).augment(_state(_question()), Deadline.after(5))
    [(tenant, _, top_k, deadline)] = retrieval.searches
    assert tenant == "tenant-a" and top_k == RetrievalPolicy.top_k
    assert 0 < deadline.remaining() <= 0.25
