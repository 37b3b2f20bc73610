"""rope_and_cache and write_kv_cache: rotated q, rotated k and v in exactly their slots, nothing else touched."""

from __future__ import annotations

import pytest
import torch

from stageserve.engine.config import ModelConfig
from stageserve.engine.model import RotaryEmbedding, apply_rope
from stageserve.kernels.rope_cache import rope_and_cache, rope_cache_ref, rope_ref, write_kv_cache
from stageserve.kernels.testing import TOLERANCE, rel_error

CPU_CASES = [(64, 4, 2, 16, torch.float32), (128, 3, 1, 32, torch.bfloat16), (64, 8, 1, 16, torch.float16)]
GPU_CASES = [
    (d, g * kv, kv, bs, dt)
    for d in (64, 128)
    for g, kv in ((1, 8), (3, 3), (4, 8), (8, 8))
    for bs in (16, 32)
    for dt in (torch.bfloat16, torch.float32)
]


def rotary(head_dim: int, max_pos: int, device) -> RotaryEmbedding:
    config = ModelConfig(
        architecture="llama", vocab_size=8, hidden_size=head_dim, intermediate_size=8, num_layers=1,
        num_heads=1, num_kv_heads=1, head_dim=head_dim, max_position_embeddings=max_pos, rope_theta=500000.0,
    )  # fmt: skip
    rope = RotaryEmbedding(config).to(device)
    rope.reset_tables()
    return rope


def tables(head_dim: int, max_pos: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's float32 cos/sin tables [max_pos, head_dim // 2]."""
    rope = rotary(head_dim, max_pos, device)
    return rope.cos, rope.sin


def make_inputs(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, gen, num_blocks=None, min_block=0):
    num_blocks = num_blocks or 8
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen, device=device).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen, device=device)
    span = (num_blocks - min_block) * block_size
    slots = torch.randperm(span, generator=gen, device=device)[:num_tokens] + min_block * block_size
    cache = torch.empty(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    if cache.is_cuda or cache.numel() < 1 << 26:  # poison, so check_cache can see stray writes (cheap on a GPU)
        cache.fill_(float("nan"))
    return q, k, v, positions, slots, cache


def check_cache(cache, ref_cache, slots, dtype):
    """The written slots match the reference; every other slot is still NaN (nothing stray was written)."""
    _, nb, bs, h, d = cache.shape
    flat, ref_flat = cache.view(2, nb * bs, h, d), ref_cache.view(2, nb * bs, h, d)
    written = slots[slots >= 0]
    assert rel_error(flat[:, written], ref_flat[:, written]) < TOLERANCE[dtype]
    untouched = torch.ones(nb * bs, dtype=torch.bool, device=cache.device)
    untouched[written] = False
    assert flat[:, untouched].isnan().all()


def test_reference_is_the_model_rope(device, gen):
    rope = rotary(64, 4096, device)
    x = torch.randn(5, 3, 64, generator=gen, device=device)
    positions = torch.tensor([0, 1, 7, 100, 4095], device=device)
    model = apply_rope(x, *rope.lookup(positions, x.dtype))
    assert torch.allclose(rope_ref(x, positions, rope.cos, rope.sin), model, atol=1e-5)
    # By-token rows (the model's per-step lookup) are the same function.
    assert torch.equal(rope_ref(x, None, *rope.lookup(positions, x.dtype)), rope_ref(x, positions, rope.cos, rope.sin))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("head_dim, num_heads, num_kv_heads, block_size, dtype", CPU_CASES)
def test_rope_and_cache(device, gen, head_dim, num_heads, num_kv_heads, block_size, dtype, in_place):
    q, k, v, positions, slots, cache = make_inputs(11, num_heads, num_kv_heads, head_dim, block_size, dtype, device, gen)
    slots[3] = -1  # a padding row: rotated q, no cache write
    cos, sin = tables(head_dim, 4096, device)
    k_before, v_before, q_before = k.clone(), v.clone(), q.clone()
    ref_cache = cache.clone()
    ref_q = rope_cache_ref(q, k, v, positions, cos, sin, ref_cache, slots)
    q_out = q if in_place else torch.full_like(q, float("nan"))
    got = rope_and_cache(q, k, v, positions, cos, sin, cache, slots, q_out=q_out)
    assert got is q_out
    assert rel_error(got, ref_q) < TOLERANCE[dtype]
    assert torch.equal(k, k_before) and torch.equal(v, v_before)
    if not in_place:
        assert torch.equal(q, q_before)
    check_cache(cache, ref_cache, slots, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_per_token(device, gen, dtype):
    """positions=None: cos/sin are the model's per-step rows (RotaryEmbedding.lookup, in the activation dtype)."""
    q, k, v, positions, slots, cache = make_inputs(7, 4, 2, 64, 16, dtype, device, gen)
    rope = rotary(64, 4096, device)
    cos, sin = (t.reshape(7, -1) for t in rope.lookup(positions, dtype))  # [num_tokens, head_dim // 2]
    ref_cache = cache.clone()
    ref_q = rope_cache_ref(q, k, v, None, cos, sin, ref_cache, slots)
    assert rel_error(rope_and_cache(q, k, v, None, cos, sin, cache, slots), ref_q) < TOLERANCE[dtype]
    check_cache(cache, ref_cache, slots, dtype)
    model_q = apply_rope(q, *rope.lookup(positions, dtype))  # rounds each bf16 product: about an ulp away
    assert rel_error(ref_q, model_q) < TOLERANCE[dtype]


def test_strided_qkv_views(device, gen):
    """q, k, v as the model makes them: column slices of one fused qkv projection output."""
    num_heads, num_kv_heads, head_dim = 4, 2, 64
    qkv = torch.randn(6, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen, device=device)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = q.view(6, num_heads, head_dim), k.view(6, num_kv_heads, head_dim), v.view(6, num_kv_heads, head_dim)
    cache = torch.full((2, 4, 16, num_kv_heads, head_dim), float("nan"), device=device)
    positions = torch.arange(6, device=device) * 3
    slots = torch.tensor([5, 6, 7, 40, 41, 63], device=device)
    cos, sin = tables(head_dim, 64, device)
    ref_cache = cache.clone()
    ref_q = rope_cache_ref(q, k, v, positions, cos, sin, ref_cache, slots)
    assert rel_error(rope_and_cache(q, k, v, positions, cos, sin, cache, slots), ref_q) < 1e-6
    check_cache(cache, ref_cache, slots, torch.float32)


def test_write_kv_cache(device, gen):
    _, k, v, _, slots, cache = make_inputs(9, 4, 2, 64, 16, torch.bfloat16, device, gen)
    ref_cache = cache.clone()
    flat = ref_cache.view(2, -1, 2, 64)
    flat[0][slots], flat[1][slots] = k, v
    write_kv_cache(k, v, cache, slots)
    assert torch.equal(cache.view(2, -1, 2, 64)[:, slots], flat[:, slots])
    check_cache(cache, ref_cache, slots, torch.bfloat16)


def test_slots_past_int32_offsets(device, gen):
    block_size, num_kv_heads, head_dim = 16, 1, 64
    top = 2**31 // (block_size * num_kv_heads * head_dim) + 8
    q, k, v, positions, slots, cache = make_inputs(
        5, 2, num_kv_heads, head_dim, block_size, torch.float16, device, gen, num_blocks=top, min_block=top - 16
    )
    cos, sin = tables(head_dim, 4096, device)
    rope_and_cache(q, k, v, positions, cos, sin, cache, slots)
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    assert rel_error(flat[0, slots], rope_ref(k, positions, cos, sin)) < TOLERANCE[torch.float16]
    assert torch.equal(flat[1, slots], v)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, num_heads, num_kv_heads, block_size, dtype", GPU_CASES)
def test_rope_and_cache_full(device, gen, head_dim, num_heads, num_kv_heads, block_size, dtype):
    q, k, v, positions, slots, cache = make_inputs(
        3000, num_heads, num_kv_heads, head_dim, block_size, dtype, device, gen, num_blocks=4096
    )
    cos, sin = tables(head_dim, 4096, device)
    ref_cache = cache.clone()
    ref_q = rope_cache_ref(q, k, v, positions, cos, sin, ref_cache, slots)
    assert rel_error(rope_and_cache(q, k, v, positions, cos, sin, cache, slots), ref_q) < TOLERANCE[dtype]
    check_cache(cache, ref_cache, slots, dtype)
