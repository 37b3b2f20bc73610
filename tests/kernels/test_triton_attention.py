"""TritonAttention against TorchAttention (the engine's reference backend): decode, speculative verification,
prefill over cached prefixes, the fused RoPE path, a whole model, and (on a GPU) no host sync."""

from __future__ import annotations

import pytest
import torch

from stageserve.engine.attention import AttentionMetadata, TorchAttention
from stageserve.engine.config import ModelConfig
from stageserve.engine.model import LlamaModel, RotaryEmbedding, apply_rope
from stageserve.engine.triton_attention import TritonAttention
from stageserve.kernels.testing import TOLERANCE, make_paged_batch, rel_error

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 6, 2, 64, 16

# (context after the step, new tokens) per sequence; each batch takes a different path.
DECODE = [(1, 1), (17, 1), (40, 1)]
SPEC = [(5, 3), (17, 4), (40, 1)]  # longest run 4 <= max_decode_query_len: the decode kernel
PREFILL = [(20, 20), (40, 23), (33, 1)]  # a fresh prompt, a chunk over a cached prefix, a decode row


def make_step(seqs, dtype, device, gen):
    """A paged cache holding each sequence's context before this step, the step's new k/v, and its metadata."""
    batch = make_paged_batch(
        [s for s, _ in seqs], [n for _, n in seqs], num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=dtype, device=device, generator=gen,
    )  # fmt: skip
    slots = torch.cat([
        batch.block_tables[i, torch.arange(s - n, s, device=device) // BLOCK_SIZE] * BLOCK_SIZE
        + torch.arange(s - n, s, device=device) % BLOCK_SIZE
        for i, (s, n) in enumerate(seqs)
    ])  # fmt: skip
    flat = batch.kv_cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
    flat[:, slots] = float("nan")  # the new tokens' slots: forward must write them
    k = torch.randn(len(slots), NUM_KV_HEADS, HEAD_DIM, generator=gen, device=device).to(dtype)
    v = torch.randn(len(slots), NUM_KV_HEADS, HEAD_DIM, generator=gen, device=device).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=slots, block_tables=batch.block_tables, seq_lens=batch.seq_lens,
        query_start_loc=batch.query_start_loc_host, seq_lens_host=batch.seq_lens_host, max_seq_len=batch.max_seq_len,
    )  # fmt: skip
    return batch, k, v, meta


def fresh_meta(meta: AttentionMetadata) -> AttentionMetadata:
    """The same step for another backend (backend_state is per step and per backend)."""
    return AttentionMetadata(
        meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.seq_lens_host, meta.max_seq_len
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqs", [DECODE, SPEC, PREFILL], ids=["decode", "spec", "prefill"])
def test_forward_matches_torch_backend(device, gen, seqs, dtype):
    batch, k, v, meta = make_step(seqs, dtype, device, gen)
    # TorchAttention multiplies padded (masked) cache slots by zero probabilities: it needs them finite.
    ref_cache = batch.kv_cache.nan_to_num(0.0)
    ref = TorchAttention().forward(batch.q, k, v, ref_cache, fresh_meta(meta), batch.scale)
    out = TritonAttention().forward(batch.q, k, v, batch.kv_cache, meta, batch.scale)
    assert rel_error(out, ref) < TOLERANCE[dtype]
    slots = meta.slot_mapping
    flat, ref_flat = batch.kv_cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM), ref_cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
    assert torch.equal(flat[:, slots], ref_flat[:, slots])


@pytest.mark.parametrize("seqs", [SPEC, PREFILL], ids=["spec", "prefill"])
def test_forward_rope_matches_rope_then_forward(device, gen, seqs):
    batch, k, v, meta = make_step(seqs, torch.float32, device, gen)
    config = ModelConfig(
        architecture="llama", vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1,
        num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=128,
    )  # fmt: skip
    rotary = RotaryEmbedding(config).to(device)
    rotary.reset_tables()
    positions = torch.cat([torch.arange(s - n, s, device=device) for s, n in seqs])
    rope = rotary.lookup(positions, torch.float32)  # the model's per-step (cos, sin)
    ref_cache = batch.kv_cache.nan_to_num(0.0)
    q_rot, k_rot = apply_rope(batch.q, *rope), apply_rope(k, *rope)
    ref = TorchAttention().forward(q_rot, k_rot, v, ref_cache, fresh_meta(meta), batch.scale)
    out = TritonAttention().forward_rope(batch.q, k, v, rope, batch.kv_cache, meta, batch.scale)
    assert rel_error(out, ref) < 1e-5
    flat = batch.kv_cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
    assert rel_error(flat[0, meta.slot_mapping], k_rot) < 1e-6


def test_model_with_triton_backend(device, gen):
    """A two-layer model: a chunked prefill of two prompts, then a decode step; the same hidden states."""
    config = ModelConfig(
        architecture="llama", vocab_size=64, hidden_size=128, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    models = [LlamaModel(config, backend).to(device) for backend in (TorchAttention(), TritonAttention())]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        m.rope.reset_tables()
    caches = [[torch.zeros(2, 8, BLOCK_SIZE, 2, 32, device=device) for _ in range(2)] for _ in models]
    tables = [[3, 5, 1], [6, 2, 0]]  # block ids per sequence
    steps = [  # (context before, new tokens) per sequence
        [(0, 20), (0, 9)],
        [(20, 10), (9, 1)],
        [(30, 1), (10, 1)],
    ]
    for step in steps:
        seq_lens = [c + n for c, n in step]
        positions = [p for c, n in step for p in range(c, c + n)]
        slots = [tables[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for i, (c, n) in enumerate(step) for p in range(c, c + n)]
        starts = [0, step[0][1], step[0][1] + step[1][1]]
        ids = torch.randint(0, 64, (len(positions),), generator=gen, device=device)
        outs = []
        for model, cache in zip(models, caches):
            meta = AttentionMetadata(
                slot_mapping=torch.tensor(slots, device=device), block_tables=torch.tensor(tables, device=device),
                seq_lens=torch.tensor(seq_lens, device=device), query_start_loc=starts, seq_lens_host=seq_lens,
                max_seq_len=max(seq_lens),
            )  # fmt: skip
            with torch.inference_mode():
                outs.append(model(ids, torch.tensor(positions, device=device), cache, meta))
        assert rel_error(outs[1], outs[0]) < 1e-5


@pytest.mark.gpu
def test_no_host_sync(device, gen):
    """Decode, speculative and prefill steps, and sampling, launch without the host waiting on the device."""
    from stageserve.kernels.sampling import sample

    backend = TritonAttention()
    steps = [make_step(seqs, torch.bfloat16, device, gen) for seqs in (DECODE, SPEC, PREFILL)]
    logits = torch.randn(4, 1000, device=device)
    noise = torch.empty_like(logits).exponential_()
    knobs = (torch.ones(4, device=device), torch.full((4,), 20, device=device), torch.full((4,), 0.9, device=device))
    for batch, k, v, meta in steps:  # warm up: compile outside the checked region
        backend.forward(batch.q, k, v, batch.kv_cache, fresh_meta(meta), batch.scale)
    sample(logits, *knobs, noise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch, k, v, meta in steps:
            backend.forward(batch.q, k, v, batch.kv_cache, fresh_meta(meta), batch.scale)
        sample(logits, *knobs, noise)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
