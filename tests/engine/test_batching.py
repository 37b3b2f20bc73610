"""Continuous batching, chunked prefill and preemption never change what a request generates."""

from __future__ import annotations

import random

import pytest

from stageserve.sample.params import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def mixed_prompts(tokenizer) -> list[list[int]]:
    """Eight prompts from 1 to ~300 tokens, so some span several chunks and blocks."""
    rng = random.Random(7)
    words = "the of and a to in is was for on that with as by at from his her it an".split()
    lengths = [1, 5, 17, 40, 64, 130, 200, 300]
    prompts = []
    for n in lengths:
        text = " ".join(rng.choice(words) for _ in range(n))
        prompts.append(tokenizer.encode(text)[:n])
    return prompts


@pytest.fixture(scope="module")
def alone(make_engine, mixed_prompts) -> list[list[int]]:
    engine = make_engine(enable_prefix_caching=False)
    return [engine.generate([p], GREEDY)[0].output_token_ids for p in mixed_prompts]


def test_batch_invariance_with_chunked_prefill(make_engine, mixed_prompts, alone):
    # A 64-token budget cuts the long prompts into chunks that share steps with running decodes.
    engine = make_engine(max_num_batched_tokens=64, enable_prefix_caching=False)
    batched = engine.generate(mixed_prompts, GREEDY)
    assert [r.output_token_ids for r in batched] == alone
    assert engine.counters.steps > 16  # the prompts really were chunked


def test_preemption_recomputes_to_the_same_output(make_engine, mixed_prompts, alone):
    # 48 blocks x 16 = 768 tokens cannot hold all eight requests (~860 tokens with outputs) at once.
    engine = make_engine(num_blocks=48, enable_prefix_caching=False)
    batched = engine.generate(mixed_prompts, GREEDY)
    assert engine.counters.preemptions > 0
    assert [r.output_token_ids for r in batched] == alone
    assert engine.kv.stats().num_free_blocks == 48
