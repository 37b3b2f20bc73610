"""paged_decode_attention against the float64 reference: decode and short query runs, GQA, splits, big ids."""

from __future__ import annotations

import itertools

import pytest
import torch

from stageserve.kernels.paged_decode_attention import (
    decode_num_splits,
    paged_attention_ref,
    paged_decode_attention,
)
from stageserve.kernels.testing import TOLERANCE, make_paged_batch, rel_error

# (head_dim, group, block_size, dtype): on the CPU a few combinations that cover every value once.
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

SEQ_LENS = [1, 17, 40, 33]  # 1, non-multiples of the block size, more than two blocks
SPEC_QUERY_LENS = [1, 3, 4, 2]  # verification of draft tokens: several queries per sequence


def run_case(device, gen, head_dim, group, block_size, dtype, seq_lens, query_lens, num_splits, **batch_kw):
    num_kv_heads = 2 if group <= 4 else 1
    batch = make_paged_batch(
        seq_lens, query_lens, num_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, device=device, generator=gen, **batch_kw,
    )  # fmt: skip
    out = torch.full_like(batch.q, float("nan"))  # poisoned: every element must be written
    spec = batch.max_query_len > 1
    paged_decode_attention(
        batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.scale, batch.max_seq_len,
        query_start_loc=batch.query_start_loc if spec else None, max_query_len=batch.max_query_len,
        num_splits=num_splits, out=out,
    )  # fmt: skip
    ref = paged_attention_ref(
        batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens_host, batch.query_start_loc_host, batch.scale
    )
    err = rel_error(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("query_lens", [[1] * 4, SPEC_QUERY_LENS], ids=["decode", "spec"])
@pytest.mark.parametrize("head_dim, group, block_size, dtype", CPU_CASES)
def test_matches_reference(device, gen, head_dim, group, block_size, dtype, query_lens, num_splits):
    run_case(device, gen, head_dim, group, block_size, dtype, SEQ_LENS, query_lens, num_splits)


def test_block_ids_past_int32_offsets(device, gen):
    """Blocks whose element offset exceeds 2**31: block ids are widened before they scale the strides."""
    block_size, num_kv_heads, head_dim = 16, 1, 64
    top = 2**31 // (block_size * num_kv_heads * head_dim) + 8  # past the int32 boundary for K (and all of V)
    run_case(
        device, gen, head_dim, 1, block_size, torch.float16, [40, 7], [1, 3], 2,
        num_blocks=top, min_block_id=top - 16,
    )  # fmt: skip


def test_block_ids_above_65535(device, gen):
    run_case(device, gen, 64, 4, 16, torch.bfloat16, [50, 3], [1, 1], 2, num_blocks=70_000, min_block_id=66_000)


def test_split_heuristic():
    # Few (sequence, KV head) pairs and a long context: many splits, capped at 16.
    assert decode_num_splits(1, 8, 4096, num_sms=132) == 16
    # Enough pairs to fill the GPU: one split.
    assert decode_num_splits(64, 8, 4096, num_sms=132) == 1
    # Short contexts never split, however idle the GPU.
    assert decode_num_splits(1, 1, 200, num_sms=132) == 1
    # Always a power of two, never more than the context allows.
    for seqs, length in itertools.product((1, 3, 17, 40), (1, 300, 1000, 5000, 100_000)):
        n = decode_num_splits(seqs, 8, length, num_sms=132)
        assert n & (n - 1) == 0 and 1 <= n <= max(1, length // 256)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 5])  # the direct and the split + reduce paths
@pytest.mark.parametrize("query_lens", ["decode", "spec"])
@pytest.mark.parametrize("head_dim, group, block_size, dtype", GPU_CASES)
def test_matches_reference_full(device, gen, head_dim, group, block_size, dtype, query_lens, num_splits):
    seq_lens = [1, 15, 16, 17, 300, 1000, 2049, 4000]
    qlens = [1] * len(seq_lens) if query_lens == "decode" else [1, 4, 8, 5, 8, 3, 8, 6]
    run_case(device, gen, head_dim, group, block_size, dtype, seq_lens, qlens, num_splits)
