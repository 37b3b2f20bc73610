"""Verification inside the engine: mixed batches, greedy and seeded sampling identical to plain decoding."""

from __future__ import annotations

import pytest

from stageserve.draft.local import LocalDraft
from stageserve.draft.ngram import NgramProposer
from stageserve.engine.speculative import DraftCall
from stageserve.sample.params import SamplingParams

pytestmark = pytest.mark.slow


class Mixed:
    """N-gram proposals for some sequences, deliberately wrong ones for others, none for the rest."""

    def __init__(self, wrong: set[str], silent: set[str]):
        self.ngram, self.wrong, self.silent = LocalDraft(NgramProposer()), wrong, silent

    def propose(self, calls: list[DraftCall]):
        out = self.ngram.propose(calls)
        return [[] if _has(c.seq_id, self.silent) else [5] * c.k if _has(c.seq_id, self.wrong) else p
                for c, p in zip(calls, out)]  # fmt: skip

    def release(self, seq_id):
        self.ngram.release(seq_id)


def _has(seq_id: str, parts: set[str]) -> bool:
    return any(part in seq_id for part in parts)


def test_mixed_batch_matches_plain_decoding_and_frees_every_block(make_engine, tokenizer):
    texts = ["Repeat: one two three, one two three, one two three,", "def f(x):\n    return x\n\ndef g(x):",
             "Paris is", "List the numbers: 1, 2, 3, 4, 5,"]  # fmt: skip
    prompts = [tokenizer.encode(t) for t in texts]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.7, top_k=20, seed=3, repetition_penalty=1.2, ignore_eos=True),
    ]
    engine = make_engine(num_blocks=64, block_size=4, speculative="ngram", num_speculative_tokens=5, spec_adaptive=False)
    expected = [r.output_token_ids for r in engine.generate(prompts, params)]
    base = engine.counters.steps
    engine.set_draft(Mixed(wrong=set(), silent=set()))
    got = engine.generate(prompts, params)
    assert [r.output_token_ids for r in got] == expected
    assert engine.speculator.counters.accepted > 0
    assert engine.counters.steps - base < 4 * 12, "accepted drafts save steps"
    assert engine.kv.stats().num_used_blocks == 0


def test_rejected_drafts_roll_back_and_silent_sequences_decode_plainly(make_engine, tokenizer):
    prompts = [tokenizer.encode(t) for t in ("The cat sat on the mat. The cat", "Once upon a time", "1, 2, 3, 4,")]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = make_engine(num_blocks=64, block_size=4, speculative="ngram", num_speculative_tokens=6, spec_adaptive=False)
    expected = [r.output_token_ids for r in engine.generate(prompts, params)]
    # Request ids are gen-<step>-<index>-<ns>: sequence 0 always gets wrong drafts, sequence 2 none.
    engine.set_draft(Mixed(wrong={"-0-"}, silent={"-2-"}))
    got = [r.output_token_ids for r in engine.generate(prompts, params)]
    assert got == expected
    counters = engine.speculator.counters
    assert counters.proposed > counters.accepted  # the wrong drafts were rejected
    assert engine.kv.stats().num_used_blocks == 0
