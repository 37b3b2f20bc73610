"""A 2-rank tensor-parallel engine on CPU (rank 0 here, rank 1 a gloo child process) against TP=1.

Through the real engine path: scheduling, chunked prefill, decode steps, the sampler, and the KV
reads and writes a transfer makes. Each test starts one child process (a few seconds each).
"""

from __future__ import annotations

import time

import pytest
import torch

from stageserve.cli import build_parser, engine_config_from_args
from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.loader.weights import load_model
from stageserve.sample.params import SamplingParams

PROMPTS = [list(range(3, 23)), [9, 8, 7, 1]]  # 20 tokens: two prefill chunks at a 16-token budget


def engine(shape: str, tp: int, model=None) -> LLMEngine:
    config = EngineConfig(num_blocks=32, block_size=4, max_num_batched_tokens=16, tensor_parallel_size=tp, device="cpu", dtype="float32")
    return LLMEngine(model or f"dummy:{shape}", config)


def run(eng: LLMEngine) -> tuple[list[list[int]], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Greedy tokens, every step's logits, one layer's KV pages of a prefilled prompt, and pages written then read."""
    logits, sampler = [], eng.runner.sampler

    def recording(step_logits, rows):
        logits.append(step_logits.clone())
        return sampler(step_logits, rows)

    eng.runner.sampler = recording
    requests = eng.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    eng.add_request("held", PROMPTS[0], SamplingParams(max_tokens=1, temperature=0.0), prefill_only=True)
    while eng.has_unfinished():
        eng.step()
    held_pages = eng.runner.read_kv(1, eng.held_block_ids("held"))
    blocks = eng.reserve("incoming", 8, SamplingParams(max_tokens=1))
    m = eng.model_config
    written = torch.randn(2, len(blocks), 4, m.num_kv_heads, m.head_dim, generator=torch.Generator().manual_seed(1))
    eng.runner.write_kv(0, blocks, written)
    assert torch.equal(eng.runner.read_kv(0, blocks), written)
    return [r.output_token_ids for r in requests], logits, held_pages, written


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["tiny-qwen2", "tiny-gqa3"])  # replicated KV head + padded vocab; uneven KV groups
def test_two_gloo_ranks_give_the_logits_of_one(shape):
    tokens, logits, pages, _ = run(engine(shape, 1))
    tp = engine(shape, 2)
    try:
        tp_tokens, tp_logits, tp_pages, _ = run(tp)
        assert tp_tokens == tokens
        assert len(tp_logits) == len(logits) and tp_logits[0].shape[1] == tp.model_config.vocab_size
        for a, b in zip(tp_logits, logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tp_pages, pages, rtol=1e-4, atol=1e-5)  # every KV head, gathered from both ranks
        # A rank that dies fails the next step with its name instead of hanging rank 0.
        child = tp.runner.children[0]
        child.kill()
        child.wait()
        tp.add_request("after", [1, 2, 3], SamplingParams(max_tokens=1))
        with pytest.raises(RuntimeError, match="rank 1 exited"):
            tp.step()
        started = time.monotonic()
        tp.runner.close()  # STOP is not broadcast to a dead rank (gloo once hung there for good)
        assert time.monotonic() - started < 5
    finally:
        tp.runner.close()


@pytest.mark.slow
def test_a_rank_that_cannot_load_fails_start_up_clearly():
    loaded = load_model("dummy:tiny")
    loaded.source = "dummy:no-such-shape"  # rank 0 has its weights; rank 1 reloads by name and fails
    with pytest.raises(RuntimeError, match="failed to load its shard"):
        engine("tiny", 2, model=loaded)


def test_cli_flags_derive_from_the_config():
    args = build_parser().parse_args(["generate", "hi", "--local", "--tensor-parallel-size", "2"])
    assert engine_config_from_args(args).tensor_parallel_size == 2
