"""Prefix caching on the real model: fewer computed tokens, identical output, tenants isolated."""

from __future__ import annotations

import pytest

from stageserve.sample.params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def run(engine, request_id: str, prompt: list[int], salt: str | None = None):
    request = engine.add_request(request_id, prompt, GREEDY, cache_salt=salt)
    while not request.is_finished:
        engine.step()
    return request


@pytest.fixture(scope="module")
def shared_prefix(tokenizer) -> list[int]:
    text = (
        "You are a careful assistant. Answer every question about astronomy precisely, citing the "
        "relevant physical laws, and keep each answer under three sentences. The user is a student "
        "preparing for an exam on planets, stars and galaxies, and values clear explanations. When a "
        "question is ambiguous, state the assumption you make before answering, and never invent data."
    )
    ids = tokenizer.encode(text)
    assert len(ids) >= 64
    return ids


def test_second_request_computes_only_uncached_tokens(make_engine, tokenizer, shared_prefix):
    engine = make_engine()
    first = shared_prefix + tokenizer.encode(" Why is the sky blue?")
    second = shared_prefix + tokenizer.encode(" How far away is the Moon?")

    # The baseline for `second` runs under its own salt, so it cannot help the cached run below.
    baseline = run(engine, "baseline", second, salt="baseline-only")
    assert baseline.num_cached_tokens == 0
    run(engine, "warm", first)

    before = engine.counters.computed_tokens
    request = run(engine, "hit", second)
    computed = engine.counters.computed_tokens - before

    expected_hit = (len(shared_prefix) // 16) * 16  # whole blocks of the shared prefix
    assert request.num_cached_tokens == expected_hit >= 64
    # Prefill computes only the uncached tail; each later step computes one token.
    assert computed == (len(second) - expected_hit) + (GREEDY.max_tokens - 1)
    assert request.output_token_ids == baseline.output_token_ids


def test_cache_salt_isolates_tenants(make_engine, shared_prefix):
    engine = make_engine()
    engine.add_request("a", shared_prefix, GREEDY, cache_salt="tenant-a")
    engine.step()  # a's prefill: its full blocks are now cached under tenant-a's salt
    b = engine.add_request("b", shared_prefix, GREEDY, cache_salt="tenant-b")
    engine.step()
    assert b.num_cached_tokens == 0
    assert not engine.kv.shared_block_ids("a", "b")

    same = engine.add_request("a2", shared_prefix, GREEDY, cache_salt="tenant-a")
    engine.step()
    assert same.num_cached_tokens > 0
    assert engine.kv.shared_block_ids("a", "a2")
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.stats().num_used_blocks == 0
