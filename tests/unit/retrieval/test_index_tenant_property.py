"""Property (hypothesis): a tenant never sees, or changes what is seen by, another tenant, whatever it sends.

Hypothesis generates programs of ingest / delete / search steps over tenants
whose ids are built to collide if compared loosely (case, whitespace, NUL,
JSON look-alikes, "tenant_id"), documents whose metadata claims other tenants,
filters that name other tenants, and queries of shared or arbitrary words, in
every search mode. Each step is checked against a model of what each tenant
owns, on the default engine (Qdrant Edge) with the real BM25 encoder.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.deadlines import Deadline
from services.retrieval.chunking import ChunkingOptions, chunk_text
from services.retrieval.edge_store import EdgeVectorStore
from services.retrieval.embedding import HashingEmbedder
from services.retrieval.index import Document, DocumentIndex
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.store import ChunkFilter, SearchMode

TENANTS = ["acme", "Acme", "acme ", "acme:1", "acme\x00", "tenant_id", "ünïcødé", '{"tenant_id": "acme"}']
VOCAB = ["otter", "otters", "river", "fish", "falcon", "stone", "the", "and", "shellfish", "dawn"]
DOC_IDS = ["d1", "d2", "shared", "tenant_id"]
CHUNKING = ChunkingOptions(chunk_tokens=5, overlap_tokens=1)
META_KEYS = ["tenant_id", "owner", "lang", "a.b", "document_id"]

tenants = st.sampled_from(TENANTS)
texts = st.one_of(
    st.lists(st.sampled_from(VOCAB), min_size=1, max_size=14).map(" ".join),
    st.text(min_size=1, max_size=40).filter(lambda t: t.strip() != ""),
)
metadata = st.dictionaries(st.sampled_from(META_KEYS), st.sampled_from([*TENANTS, "x", "y"]), max_size=3)
ingest = st.tuples(st.just("ingest"), tenants,
                   st.lists(st.tuples(st.sampled_from(DOC_IDS), texts, metadata), min_size=1, max_size=3,
                            unique_by=lambda d: d[0]))
delete = st.tuples(st.just("delete"), tenants, st.lists(st.sampled_from(DOC_IDS), min_size=1, max_size=3))
search = st.tuples(st.just("search"), tenants,
                   st.tuples(texts, st.sampled_from([1, 3, 50]), metadata, st.sampled_from(list(SearchMode))))
programs = st.lists(st.one_of(ingest, delete, search), min_size=1, max_size=25)


@dataclass
class Owned:
    """What one tenant stored: document id -> (chunk texts, metadata)."""

    docs: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)

    def chunks(self) -> list[tuple[str, str, dict[str, str]]]:
        return [(doc_id, text, meta) for doc_id, (texts, meta) in self.docs.items() for text in texts]


def matches(meta: dict[str, str], flt: dict[str, str]) -> bool:
    return all(meta.get(k) == v for k, v in flt.items())


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def store(loop: asyncio.AbstractEventLoop) -> Iterator[EdgeVectorStore]:
    # One engine for every example: data of earlier examples stays, as other tenants' noise.
    store = EdgeVectorStore(None, dim=64)
    loop.run_until_complete(store.start(Deadline.after(10)))
    yield store
    loop.run_until_complete(store.close())


@pytest.fixture(scope="module")
def index(store: EdgeVectorStore) -> DocumentIndex:
    return DocumentIndex(HashingEmbedder(64), store, default_chunking=CHUNKING, sparse=Bm25Encoder())


_runs = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=programs)
def test_a_tenant_never_sees_or_deletes_another_tenants_chunks(
        index: DocumentIndex, store: EdgeVectorStore, loop: asyncio.AbstractEventLoop,
        program: list[tuple[str, str, object]]) -> None:
    # Fresh tenant ids per example (same tricky names, unique prefix), so examples do not share a model.
    run = next(_runs)
    real = {t: f"run{run}/{t}" for t in TENANTS}
    owned = {t: Owned() for t in TENANTS}

    async def check() -> None:
        for step, (action, name, arg) in enumerate(program):
            tenant = real[name]
            if action == "ingest":
                assert isinstance(arg, list)
                docs = [Document(doc_id, text, meta) for doc_id, text, meta in arg]
                await index.ingest(tenant, docs)
                for d in docs:
                    owned[name].docs[d.document_id] = ([c.text for c in chunk_text(d.text, CHUNKING)],
                                                       dict(d.metadata))
            elif action == "delete":
                assert isinstance(arg, list)
                ids = list(dict.fromkeys(arg))
                expected = sum(len(owned[name].docs[i][0]) for i in ids if i in owned[name].docs)
                assert await index.delete(tenant, ids) == expected, f"step {step}"
                for i in ids:
                    owned[name].docs.pop(i, None)
            else:
                assert isinstance(arg, tuple)
                query, top_k, flt, mode = arg
                hits = await index.search(tenant, query, top_k, flt, mode=mode)
                mine = [c for c in owned[name].chunks() if matches(c[2], flt)]
                assert len(hits) <= min(top_k, len(mine)), f"step {step}: more hits than the tenant has"
                for h in hits:
                    assert h.document_id in owned[name].docs, f"step {step}: {name!r} saw {h.document_id!r}"
                    chunk_texts, meta = owned[name].docs[h.document_id]
                    assert h.text in chunk_texts and h.metadata == meta, f"step {step}: foreign chunk"
                    assert matches(h.metadata, flt)
                if mode is SearchMode.DENSE and mine and any(c.isalnum() for c in query):
                    # Dense ranks every matching chunk: the filter must not hide the tenant's own.
                    assert len(hits) == min(top_k, len(mine)), f"step {step}"
        for name in TENANTS:
            count = await store.count(ChunkFilter(real[name]), Deadline.after(5))
            assert count == len(owned[name].chunks()), name

    loop.run_until_complete(check())


def _by_rank(hit: tuple[str, float]) -> tuple[float, str]:
    return (-hit[1], hit[0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mine=st.lists(texts, min_size=1, max_size=6), theirs=st.lists(texts, min_size=1, max_size=12),
       query=texts, mode=st.sampled_from(list(SearchMode)))
def test_another_tenants_documents_never_change_a_tenants_results(
        index: DocumentIndex, loop: asyncio.AbstractEventLoop, mine: list[str], theirs: list[str], query: str,
        mode: SearchMode) -> None:
    """Not even through ranking statistics: BM25's IDF is computed over the caller's tenant only."""
    run = next(_runs)
    me, other = f"run{run}/me", f"run{run}/other"

    async def check() -> None:
        await index.ingest(me, [Document(f"m{i}", t) for i, t in enumerate(mine)])
        before = [(h.chunk_id, h.score) for h in await index.search(me, query, 50, mode=mode)]
        await index.ingest(other, [Document(f"o{i}", t) for i, t in enumerate(theirs)])
        after = [(h.chunk_id, h.score) for h in await index.search(me, query, 50, mode=mode)]
        # Equal scores may come back in either order; the ranking is the scores, so compare in canonical order.
        assert sorted(after, key=_by_rank) == sorted(before, key=_by_rank)

    loop.run_until_complete(check())
