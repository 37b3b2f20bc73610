"""prefill_attention against the float64 reference: fresh prompts, cached prefixes, chunks, mixed decode rows."""

from __future__ import annotations

import itertools

import pytest
import torch

from stageserve.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from stageserve.kernels.testing import TOLERANCE, make_paged_batch, rel_error

CPU_CASES = [
    (64, 1, 16, torch.float32),
    (128, 4, 32, torch.bfloat16),
    (64, 3, 16, torch.float16),
    (64, 8, 32, torch.float32),
]
# On a GPU: every head size x group x block size in bf16, and a few in fp16 / fp32 (each case compiles
# its own kernel variants, so the full product in three dtypes would spend minutes compiling).
GPU_CASES = [(d, g, bs, torch.bfloat16) for d, g, bs in itertools.product((64, 128), (1, 3, 4, 8), (16, 32))] + [
    (128, 4, 16, torch.float16),
    (64, 8, 32, torch.float16),
    (128, 1, 16, torch.float32),
    (64, 3, 32, torch.float32),
]

# (context after the step, new tokens): one token, a fresh prompt off the block grid, a chunk over a
# 17-token cached prefix, and a decode row inside a prefill batch.
CPU_SEQS = [(1, 1), (21, 21), (40, 23), (33, 1)]


def run_case(device, gen, head_dim, group, block_size, dtype, seqs, config=None, **batch_kw):
    num_kv_heads = 2 if group <= 4 else 1
    batch = make_paged_batch(
        [s for s, _ in seqs], [n for _, n in seqs], num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, block_size=block_size, dtype=dtype, device=device, generator=gen, **batch_kw,
    )  # fmt: skip
    out = torch.full_like(batch.q, float("nan"))
    prefill_attention(
        batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.scale,
        batch.max_query_len, config=config, out=out,
    )  # fmt: skip
    ref = prefill_attention_ref(
        batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens_host, batch.query_start_loc_host, batch.scale
    )
    err = rel_error(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("head_dim, group, block_size, dtype", CPU_CASES)
def test_matches_reference(device, gen, head_dim, group, block_size, dtype):
    run_case(device, gen, head_dim, group, block_size, dtype, CPU_SEQS)


def test_tiles_wider_than_blocks(device, gen):
    """BLOCK_N = 32 over 16-token blocks, BLOCK_M = 32: a key tile spans two cache blocks."""
    run_case(device, gen, 64, 2, 16, torch.float32, [(70, 40), (5, 5)], config={"BLOCK_M": 32, "BLOCK_N": 32})


def test_block_ids_past_int32_offsets(device, gen):
    block_size, num_kv_heads, head_dim = 16, 1, 64
    top = 2**31 // (block_size * num_kv_heads * head_dim) + 8
    run_case(device, gen, head_dim, 1, block_size, torch.float16, [(40, 20), (7, 7)], num_blocks=top, min_block_id=top - 16)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, group, block_size, dtype", GPU_CASES)
def test_matches_reference_full(device, gen, head_dim, group, block_size, dtype):
    seqs = [(1, 1), (17, 17), (300, 300), (1000, 137), (2049, 512), (4000, 1), (129, 128), (700, 8)]
    run_case(device, gen, head_dim, group, block_size, dtype, seqs)
