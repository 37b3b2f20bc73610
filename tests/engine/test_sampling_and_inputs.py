"""Seeded sampling, stop conditions, and bad input on the real model."""

from __future__ import annotations

import pytest

from stageserve.common.errors import InvalidArgumentError, NotFoundError
from stageserve.sample.params import SamplingParams

PROMPT_TEXT = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer.encode(PROMPT_TEXT)


def sampled(seed: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=seed, ignore_eos=True)


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine, prompt):
    a = engine.generate([prompt], sampled(1234))[0].output_token_ids
    b = engine.generate([prompt], sampled(1234))[0].output_token_ids
    c = engine.generate([prompt], sampled(99))[0].output_token_ids
    assert a == b
    assert a != c


def test_seeded_request_is_independent_of_its_batch(engine, prompt, tokenizer):
    alone = engine.generate([prompt], sampled(5))[0].output_token_ids
    others = [tokenizer.encode(t) for t in ("Hello there", "import numpy as np", "The weather today")]
    batch = engine.generate(others + [prompt], [sampled(None)] * 3 + [sampled(5)])
    assert batch[-1].output_token_ids == alone


def test_stop_token_and_max_tokens(engine, prompt):
    greedy = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert greedy.status.value == "length" and len(greedy.output_token_ids) == 12
    stop_at = greedy.output_token_ids[5]
    stopped = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_at,)))[0]
    first = greedy.output_token_ids.index(stop_at)
    assert stopped.status.value == "stop"
    assert stopped.output_token_ids == greedy.output_token_ids[: first + 1]


@pytest.mark.parametrize(
    "field, prompt_ids, params",
    [
        ("prompt", [], dict(max_tokens=4)),
        ("max_tokens", [1, 2, 3], dict(max_tokens=9000)),  # 3 + 9000 > the 8192-token context
        ("prompt_token_ids", [1, 10**6], dict(max_tokens=4)),
    ],
)
def test_bad_requests_name_the_field_and_engine_keeps_serving(engine, prompt, field, prompt_ids, params):
    with pytest.raises(InvalidArgumentError) as err:
        engine.add_request("bad", prompt_ids, SamplingParams(**params))
    assert err.value.field == field
    assert "bad" not in engine.requests
    assert len(engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))[0].output_token_ids) >= 1


@pytest.mark.parametrize(
    "field, params",
    [("max_tokens", dict(max_tokens=0)), ("temperature", dict(temperature=-1.0)), ("top_p", dict(top_p=0.0)),
     ("top_p", dict(top_p=1.5)), ("top_k", dict(top_k=-2))],
)
def test_bad_sampling_params_name_the_field(field, params):
    with pytest.raises(InvalidArgumentError) as err:
        SamplingParams(**params)
    assert err.value.field == field


def test_abort_frees_blocks_and_unknown_abort_is_an_error(engine, prompt):
    free = engine.kv.stats().num_free_blocks
    engine.add_request("to-abort", prompt, SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    assert engine.kv.stats().num_free_blocks < free
    engine.abort("to-abort")
    assert engine.kv.stats().num_free_blocks == free
    with pytest.raises(NotFoundError):
        engine.abort("to-abort")


def test_pool_too_small_for_one_request_is_rejected_not_deadlocked(make_engine, prompt):
    small = make_engine(num_blocks=4)  # 64 tokens
    with pytest.raises(InvalidArgumentError) as err:
        small.add_request("big", prompt, SamplingParams(max_tokens=100))
    assert err.value.field == "max_tokens"
