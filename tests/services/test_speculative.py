"""Speculative decoding through the real services: prefill, decode and a draft server on port 0.

Greedy output must be token for token what the plain engine produces, whichever proposer drafts, and
a draft that dies or stalls mid-generation must change nothing and cost at most one draft timeout.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from test_draft_client import Stalling  # a draft that hangs on demand (tests/services is on sys.path)
from test_prefill_decode import Split  # the prefill + decode harness

from stageserve.common.server import ServerConfig
from stageserve.draft.model_proposer import ModelProposer, truncate_layers
from stageserve.draft.ngram import NgramProposer
from stageserve.draft.service import DraftServiceConfig
from stageserve.draft.service import start as start_draft
from stageserve.engine.config import EngineConfig
from stageserve.sample.params import SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
PASSAGE = (
    "def area(width, height):\n    return width * height\n\n"
    "def perimeter(width, height):\n    return 2 * (width + height)\n\n"
)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [
        tokenizer.encode("Rewrite this code with type hints:\n" + PASSAGE),
        tokenizer.encode("Copy the text: the cat sat on the mat. the cat sat on the mat."),
    ]


@pytest.fixture(scope="module")
def expected(make_engine, prompts):
    return [r.output_token_ids for r in make_engine(num_blocks=128).generate(prompts, GREEDY)]


async def generate_with_draft(make_engine, prompts, proposer, method: str, *, timeout_s: float = 5.0, on_token=None):
    """Run every prompt through prefill -> decode (speculating with a draft server) -> tokens."""
    draft = await start_draft(DraftServiceConfig(server=ServerConfig(host="127.0.0.1", port=0)), proposer)
    try:
        async with Split() as split:
            await split.start(
                # fixed k: every step verifies drafts, so identity is tested on every token
                make_engine(num_blocks=128), make_engine(num_blocks=128, speculative=method, spec_adaptive=False),
                draft_address=draft.address, draft_timeout_s=timeout_s,
            )
            engine = split.decode_worker.engine
            results = []
            for i, prompt in enumerate(prompts):
                if on_token is not None:
                    await on_token(draft, i)
                results.append(await split.generate(f"s{i}", prompt, GREEDY))
            # Releases are fire and forget: give the last one time to land before the draft server stops.
            deadline = time.monotonic() + 5
            while getattr(proposer, "_seqs", None) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return results, engine.speculator, engine.speculator.draft, await split.free_blocks()
    finally:
        await draft.stop(0)


def test_ngram_greedy_identity_through_the_services(make_engine, prompts, expected):
    results, speculator, client, free = asyncio.run(generate_with_draft(make_engine, prompts, NgramProposer(), "ngram"))
    assert results == expected
    assert speculator.counters.accepted > 0, "the copy task must accept some drafts"
    assert client.stats.failures == 0
    assert free == (128, 128)  # rejected drafts' blocks were freed, and every sequence released both pools


def test_self_draft_greedy_identity_through_the_services(make_engine, default_weights, prompts, expected):
    proposer = ModelProposer(
        truncate_layers(default_weights, 4), EngineConfig(num_blocks=64, device="cpu", dtype="float32"),
        device=default_weights.state_dict["model.embed_tokens.weight"].device, dtype=default_weights.state_dict["model.embed_tokens.weight"].dtype,
    )
    results, speculator, client, _ = asyncio.run(generate_with_draft(make_engine, prompts, proposer, "model"))
    assert results == expected
    assert speculator.counters.proposed > 0 and client.stats.failures == 0
    assert len(proposer._seqs) == 0, "finished sequences are released on the draft replica"


@pytest.mark.parametrize("failure", ["killed", "stalled"])
def test_draft_failure_changes_nothing_and_costs_one_timeout(make_engine, prompts, expected, failure):
    timeout_s = 0.4
    proposer = Stalling()

    async def break_draft(draft, index):
        if index == 1:  # after the first sequence decoded with speculation
            if failure == "killed":
                await draft.stop(0)
            else:
                proposer.armed.set()

    try:
        results, speculator, client, _ = asyncio.run(
            generate_with_draft(make_engine, prompts, proposer, "ngram", timeout_s=timeout_s, on_token=break_draft)
        )
    finally:
        proposer.released.set()
    assert results == expected
    assert client.stats.replicas_marked_down == 1
    assert client.stats.failures == 1, "after one failed call no step waits on the draft again"
    assert speculator.counters.draft_unavailable > 0
    # Every draft round together, the failed one included, took at most one timeout plus normal calls.
    assert speculator.counters.draft_seconds < timeout_s + 0.5
