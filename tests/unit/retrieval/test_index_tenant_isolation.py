"""Property: whatever a tenant ingests, searches, filters or deletes, it never sees or touches another tenant's chunks.

Plain randomized loops with fixed seeds (reproducible); every step is checked
against a model of what each tenant owns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from libs.deadlines import Deadline
from services.retrieval.chunking import ChunkingOptions, chunk_text
from services.retrieval.embedding import HashingEmbedder
from services.retrieval.index import Document, DocumentIndex
from services.retrieval.store import ChunkFilter, QdrantVectorStore

# Tenants chosen to collide if ids were compared loosely or concatenated without care.
TENANTS = ["acme", "Acme", "acme ", "acme:1", "acme\x00", "tenant_id", "ünïcødé", '{"tenant_id": "acme"}', "a", "b"]
# A shared vocabulary, so every query matches chunks of many tenants.
VOCAB = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu",
         "xi", "omicron"]
DOC_IDS = ["doc-1", "doc-2", "doc-3", "shared", "tenant_id"]  # the same ids in every tenant
CHUNKING = ChunkingOptions(chunk_tokens=6, overlap_tokens=2)


@dataclass
class Owned:
    """What one tenant has stored: document id -> (chunk texts, metadata)."""

    docs: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)

    def chunks(self) -> list[tuple[str, str, dict[str, str]]]:
        return [(doc_id, text, meta) for doc_id, (texts, meta) in self.docs.items() for text in texts]


def random_metadata(rng: random.Random, tenant: str) -> dict[str, str]:
    meta = {"owner": tenant, "lang": rng.choice(["en", "de", "fr"])}
    if rng.random() < 0.5:
        # Metadata that *claims* another tenant: must only ever be matched as metadata.
        meta["tenant_id"] = rng.choice(TENANTS)
    if rng.random() < 0.3:
        meta["document_id"] = rng.choice(DOC_IDS)
    if rng.random() < 0.3:
        meta["a.b"] = rng.choice(["x", "y"])
    return meta


def random_filter(rng: random.Random, tenant: str) -> dict[str, str]:
    other = rng.choice([t for t in TENANTS if t != tenant])
    return rng.choice([
        {},
        {"tenant_id": other},
        {"tenant_id": tenant},
        {"owner": other},
        {"owner": tenant},
        {"lang": rng.choice(["en", "de", "fr"])},
        {"tenant_id": other, "lang": "en"},
        {"metadata.tenant_id": other},
        {"document_id": rng.choice(DOC_IDS)},
        {"a.b": rng.choice(["x", "y"])},
        {"a": "b"},
    ])


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 25)))


def matches(meta: dict[str, str], flt: dict[str, str]) -> bool:
    return all(meta.get(k) == v for k, v in flt.items())


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_tenant_never_sees_or_deletes_another_tenants_chunks(seed: int) -> None:
    rng = random.Random(seed)
    store = QdrantVectorStore.create(url="", api_key="", path=None, collection="iso", dim=128, call_timeout_s=5)
    index = DocumentIndex(HashingEmbedder(128), store, default_chunking=CHUNKING)
    owned = {t: Owned() for t in TENANTS}
    try:
        for step in range(150):
            tenant = rng.choice(TENANTS)
            action = rng.random()
            if action < 0.35:
                docs = [Document(doc_id, random_text(rng), random_metadata(rng, tenant))
                        for doc_id in rng.sample(DOC_IDS, rng.randint(1, 3))]
                await index.ingest(tenant, docs)
                for d in docs:
                    owned[tenant].docs[d.document_id] = ([c.text for c in chunk_text(d.text, CHUNKING)],
                                                         dict(d.metadata))
            elif action < 0.45:
                ids = rng.sample(DOC_IDS, rng.randint(1, 3))
                expected = sum(len(owned[tenant].docs[i][0]) for i in ids if i in owned[tenant].docs)
                assert await index.delete(tenant, ids) == expected, f"step {step}"
                for i in ids:
                    owned[tenant].docs.pop(i, None)
            else:
                flt = random_filter(rng, tenant)
                query = " ".join(rng.sample(VOCAB, rng.randint(1, 4)))
                top_k = rng.choice([1, 5, 100])
                hits = await index.search(tenant, query, top_k, flt)
                mine = [c for c in owned[tenant].chunks() if matches(c[2], flt)]
                # Never another tenant's chunk ...
                for h in hits:
                    assert h.metadata.get("owner") == tenant, f"step {step}: {tenant!r} saw {h.metadata!r}"
                    assert h.document_id in owned[tenant].docs
                    texts, meta = owned[tenant].docs[h.document_id]
                    assert h.text in texts and h.metadata == meta
                    assert matches(h.metadata, flt)
                # ... and the filter does not hide the tenant's own matching chunks either.
                assert len(hits) == min(top_k, len(mine)), f"step {step}: {len(hits)} hits, {len(mine)} owned"

        # Final check: each tenant's stored chunk count is exactly what it owns.
        for tenant in TENANTS:
            count = await store.count(ChunkFilter(tenant), Deadline.after(5))
            assert count == len(owned[tenant].chunks()), tenant
    finally:
        await store.close()
