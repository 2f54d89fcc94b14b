"""The exact key: formatting differences hit, anything that changes the answer or the tenant misses."""

from __future__ import annotations

from dataclasses import replace

from libs.chat import ChatMessage, GenerationParams, Role
from services.cache.domain import CacheKey, Namespace
from services.cache.keys import exact_entry_id, exact_key

NS = Namespace("acme", model_class="fast", system_prompt_hash="sp1", prompt_version="v1")
PARAMS = GenerationParams(temperature=0.0, max_output_tokens=256, stop=("\n\n", "END"))


def key(*turns: tuple[Role, str], ns: Namespace = NS, model: str = "gpt-x",
        params: GenerationParams = PARAMS) -> CacheKey:
    return CacheKey(ns, model, tuple(ChatMessage(role, text) for role, text in turns), params)


BASE = key((Role.SYSTEM, "You are terse."), (Role.USER, "What is 2+2?"), (Role.ASSISTANT, "4"),
           (Role.USER, "And 3+3?"))


def test_key_is_a_stable_sha256_hex() -> None:
    assert exact_key(BASE) == exact_key(BASE)
    assert len(exact_key(BASE)) == 64
    assert exact_entry_id(exact_key(BASE)).startswith("exact:")


def test_whitespace_and_unicode_normalization_hit() -> None:
    # Extra spaces, newlines, tabs, and a decomposed "é" (e + combining acute) vs the composed one.
    a = key((Role.USER, "Résumé   of\n\tthe  plan "))
    b = key((Role.USER, "  Re\u0301sume\u0301 of the plan"))
    assert exact_key(a) == exact_key(b)


def test_stop_sequence_order_does_not_matter() -> None:
    reordered = replace(BASE, params=replace(PARAMS, stop=("END", "\n\n")))
    assert exact_key(reordered) == exact_key(BASE)


def test_every_turn_counts() -> None:
    other_earlier_turn = key((Role.SYSTEM, "You are terse."), (Role.USER, "What is 2+2?"), (Role.ASSISTANT, "four"),
                             (Role.USER, "And 3+3?"))
    only_last_turn = key((Role.USER, "And 3+3?"))
    assert exact_key(other_earlier_turn) != exact_key(BASE)
    assert exact_key(only_last_turn) != exact_key(BASE)


def test_role_and_name_count() -> None:
    a = key((Role.USER, "hi"))
    b = key((Role.ASSISTANT, "hi"))
    c = CacheKey(NS, "gpt-x", (ChatMessage(Role.USER, "hi", name="bob"),), PARAMS)
    assert len({exact_key(a), exact_key(b), exact_key(c)}) == 3


def test_answer_changing_params_model_and_namespace_count() -> None:
    variants = [
        replace(BASE, params=replace(PARAMS, temperature=0.5)),
        replace(BASE, params=replace(PARAMS, top_p=0.9)),
        replace(BASE, params=replace(PARAMS, max_output_tokens=512)),
        replace(BASE, params=replace(PARAMS, stop=("END",))),
        replace(BASE, params=replace(PARAMS, seed=7)),
        replace(BASE, model="gpt-y"),
        replace(BASE, namespace=replace(NS, tenant_id="globex")),
        replace(BASE, namespace=replace(NS, model_class="smart")),
        replace(BASE, namespace=replace(NS, system_prompt_hash="sp2")),
        replace(BASE, namespace=replace(NS, prompt_version="v2")),
    ]
    hashes = {exact_key(v) for v in variants}
    assert len(hashes) == len(variants)
    assert exact_key(BASE) not in hashes


def test_fields_cannot_bleed_into_each_other() -> None:
    # Structured hashing: moving text between fields never yields the same key.
    a = replace(BASE, namespace=Namespace("ab", "c"))
    b = replace(BASE, namespace=Namespace("a", "bc"))
    assert exact_key(a) != exact_key(b)
