"""TorchAttention's batched decode (all sequences in one SDPA call, contexts padded and masked) against its
per-sequence path, in every dtype it takes: the bf16/f16 form folds each KV head's query group into query rows."""

from __future__ import annotations

import pytest
import torch

from stageserve.engine.attention import AttentionMetadata, TorchAttention, gather_kv
from stageserve.kernels.testing import make_paged_batch

BLOCK_SIZE, HEAD_DIM = 16, 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(9, 3), (4, 4), (8, 1)], ids=["gqa", "mha", "mqa"])
def test_batched_decode_matches_each_sequence_alone(dtype, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    seq_lens = [1, 17, 40, 33]
    batch = make_paged_batch(
        seq_lens, [1] * len(seq_lens), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE, dtype=dtype, device="cpu", generator=gen,
    )  # fmt: skip
    cache = batch.kv_cache.nan_to_num(0.0)  # padded slots get zero weight; they must be finite
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long), block_tables=batch.block_tables, seq_lens=batch.seq_lens,
        query_start_loc=batch.query_start_loc_host, seq_lens_host=batch.seq_lens_host, max_seq_len=batch.max_seq_len,
    )  # fmt: skip
    assert meta.is_decode_only
    out = TorchAttention._decode(batch.q, cache, meta, batch.scale)
    assert out.shape == batch.q.shape and out.dtype == dtype
    for i, seq_len in enumerate(seq_lens):
        keys, values = gather_kv(cache, batch.block_tables[i], seq_len)
        alone = TorchAttention._attend(batch.q[i : i + 1], keys, values, batch.scale)
        torch.testing.assert_close(out[i : i + 1], alone, rtol=0, atol=2e-6 if dtype == torch.float32 else 8e-3)
