"""CUDA-graph verify steps on a GPU (skipped without one), float32 on the default model: a replayed verify
step gives the eager step's logits (uniform and padded mixed query lengths), and greedy speculative
generation through the graphs equals plain greedy generation."""

from __future__ import annotations

import pytest
import torch

from stageserve.draft.local import LocalDraft
from stageserve.draft.ngram import NgramProposer
from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.sample.params import SamplingParams

pytestmark = pytest.mark.gpu
K = 4


@pytest.fixture(scope="module")
def engine(default_weights, tokenizer):
    config = EngineConfig(device="cuda", dtype="float32", num_blocks=512, max_num_seqs=8, max_graph_batch_size=8,
                          speculative="ngram", num_speculative_tokens=K, spec_adaptive=False, spec_max_batch_size=8)  # fmt: skip
    engine = LLMEngine(default_weights, config, eos_token_ids=tokenizer.stop_token_ids)
    engine.warmup()
    engine.set_draft(LocalDraft(NgramProposer()))
    assert (4, K + 1) in engine.runner.graphs.captured
    return engine


@pytest.mark.parametrize("drafts", [[3, 3, 3], [4, 1, 0, 2]], ids=["uniform", "padded-mixed"])
def test_graphed_verify_step_matches_the_eager_one(engine, tokenizer, drafts):
    texts = ["The cat sat on the mat.", "def f(x):\n    return x + 1\n", "1, 2, 3, 4, 5, 6, 7,", "Paris is the capital"]
    requests = [engine.add_request(f"v{len(drafts)}-{i}", tokenizer.encode(texts[i]),
                                   SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
                for i in range(len(drafts))]  # fmt: skip
    while any(not r.output_token_ids for r in requests):
        engine.step()
    for r, n in zip(requests, drafts):
        r.spec_token_ids = [(r.output_token_ids[-1] + 1 + j) % 1000 for j in range(n)]
    sched = engine.scheduler.schedule()
    host, sample = engine.runner._prepare_host(sched)
    rows = [row + j for _, row, n in sample for j in range(n)]
    graphs = engine.runner.graphs
    before = graphs.verify_replays
    graphed = engine.runner.forward_step(host, rows).clone()
    assert graphs.verify_replays == before + 1
    graphs.verify_enabled = False
    try:
        eager = engine.runner.forward_step(host, rows)
    finally:
        graphs.verify_enabled = True
    assert graphed.shape == (sum(drafts) + len(drafts), engine.model_config.vocab_size)
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-3)
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1))
    for r in requests:
        r.spec_token_ids = []
        engine.abort(r.request_id)


def test_greedy_speculation_through_graphs_equals_plain_greedy(engine, tokenizer):
    texts = ["Repeat: one two three, one two three, one two three,", "List the numbers: 1, 2, 3, 4, 5,",
             "def add(a, b):\n    return a + b\n\ndef sub(a, b):"]  # fmt: skip
    prompts = [tokenizer.encode(t) for t in texts]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    engine.set_draft(None)
    expected = [r.output_token_ids for r in engine.generate(prompts, params)]
    engine.set_draft(LocalDraft(NgramProposer()))
    before = engine.runner.graphs.verify_replays
    got = [r.output_token_ids for r in engine.generate(prompts, params)]
    assert got == expected
    assert engine.speculator.counters.accepted > 0
    assert engine.runner.graphs.verify_replays > before, "verify steps replayed graphs"
