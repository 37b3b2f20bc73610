"""Fused rotary embedding (rotate-half) on q and k, and the write of rotated k and v into the paged cache.

    q_out[t] = rope(q[t], positions[t])                          (q may be rotated in place)
    kv_cache[0, slot // block_size, slot % block_size] = rope(k[t], positions[t])
    kv_cache[1, slot // block_size, slot % block_size] = v[t]    for slot = slot_mapping[t] >= 0

rope(x, p) = cat(x1 * cos[p] - x2 * sin[p], x2 * cos[p] + x1 * sin[p]) with x1, x2 the halves of the
head. cos/sin are either tables [max_pos, head_dim // 2] indexed by `positions` (the model's float32
RotaryEmbedding buffers), or, with `positions=None`, one row per token [num_tokens, head_dim // 2] (the
model's per-step `RotaryEmbedding.lookup`, already in the activation dtype). The products are taken in
float32 and rounded once; the model's `apply_rope` rounds each bf16 product, so the two differ by about
one unit in the last place.

A negative slot skips the write (padding rows, e.g. of a captured CUDA graph). One program per token.
`write_kv_cache` is the same kernel without the rotation, for backends that receive rotated keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stageserve.kernels._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    cast_to,
    check_launch_device,
    check_tensor,
    interpreting,
    next_pow2,
)


def rope_ref(x: torch.Tensor, positions: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, heads, head_dim] rotated in float32, cast back to x's dtype."""
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    c = cos.float().reshape(x.shape[0], 1, -1)  # [num_tokens, 1, head_dim // 2]
    s = sin.float().reshape(x.shape[0], 1, -1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_cache_ref(q, k, v, positions, cos, sin, kv_cache, slot_mapping) -> torch.Tensor:
    """Returns rotated q; writes rotated k and v into kv_cache at slot_mapping (negative slots skipped)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    keep = slot_mapping >= 0
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0][slot_mapping[keep]] = rope_ref(k, positions, cos, sin)[keep]
    flat[1][slot_mapping[keep]] = v[keep]
    return rope_ref(q, positions, cos, sin)


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, stride_src_h, stride_dst_h, num_heads, cos, sin, offs_h, offs_half, half_ok,
    HALF: tl.constexpr,
):  # fmt: skip
    """Rotate [heads, head_dim] at src (token row already applied) into dst; cos/sin are [BLOCK_HALF] float32."""
    ok = (offs_h[:, None] < num_heads) & half_ok[None, :]
    src = src_ptr + offs_h[:, None] * stride_src_h + offs_half[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    dst = dst_ptr + offs_h[:, None] * stride_dst_h + offs_half[None, :]
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst, cast_to(x1 * cos[None, :] - x2 * sin[None, :], out_ty), mask=ok)
    tl.store(dst + HALF, cast_to(x2 * cos[None, :] + x1 * sin[None, :], out_ty), mask=ok)


@triton.jit
def _rope_cache_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    q_out_ptr,  # [num_tokens, num_heads, head_dim]; may alias q
    positions_ptr,  # [num_tokens]; read when HAS_POSITIONS
    cos_ptr,  # [max_pos, head_dim // 2] (by position) or [num_tokens, head_dim // 2] (by token)
    sin_ptr,  # same shape as cos
    kv_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens]
    num_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh,
    stride_cos, stride_sin,
    stride_kv, stride_kb, stride_ks, stride_kvh,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    APPLY_ROPE: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    block = slot // KV_BLOCK_SIZE
    cache_k = kv_ptr + block * stride_kb + (slot % KV_BLOCK_SIZE) * stride_ks
    offs_kv = tl.arange(0, BLOCK_HKV)
    if APPLY_ROPE:
        offs_half = tl.arange(0, BLOCK_HALF)
        half_ok = offs_half < HALF
        if HAS_POSITIONS:
            row = tl.load(positions_ptr + t).to(tl.int64)
        else:
            row = t
        cos = tl.load(cos_ptr + row * stride_cos + offs_half, mask=half_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + row * stride_sin + offs_half, mask=half_ok, other=0.0).to(tl.float32)
        offs_q = tl.arange(0, BLOCK_HQ)
        _rotate_heads(
            q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh, num_heads,
            cos, sin, offs_q, offs_half, half_ok, HALF,
        )  # fmt: skip
        if slot >= 0:
            _rotate_heads(
                k_ptr + t * stride_kt, cache_k, stride_kh, stride_kvh, num_kv_heads,
                cos, sin, offs_kv, offs_half, half_ok, HALF,
            )  # fmt: skip
    if slot >= 0:
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_kv[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_DIM)
        if not APPLY_ROPE:
            k = tl.load(k_ptr + t * stride_kt + offs_kv[:, None] * stride_kh + offs_d[None, :], mask=ok)
            tl.store(cache_k + offs_kv[:, None] * stride_kvh + offs_d[None, :], k, mask=ok)
        v = tl.load(v_ptr + t * stride_vt + offs_kv[:, None] * stride_vh + offs_d[None, :], mask=ok)
        tl.store(cache_k + stride_kv + offs_kv[:, None] * stride_kvh + offs_d[None, :], v, mask=ok)


def _launch(q, k, v, positions, cos, sin, kv_cache, slot_mapping, q_out, apply_rope: bool) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    device = k.device
    check_launch_device(device)
    check_tensor(k, "k", dtypes=FLOAT_DTYPES, device=device)
    check_tensor(v, "v", shape=tuple(k.shape), dtypes=(k.dtype,), device=device)
    check_tensor(kv_cache, "kv_cache", shape=(2, None, None, num_kv_heads, head_dim), dtypes=(k.dtype,), device=device)
    check_tensor(slot_mapping, "slot_mapping", shape=(num_tokens,), dtypes=INDEX_DTYPES, device=device)
    kv_block_size = kv_cache.shape[2]
    num_heads = 1
    if apply_rope:
        assert head_dim % 2 == 0, f"rotate-half needs an even head_dim, got {head_dim}"
        check_tensor(q, "q", shape=(num_tokens, None, head_dim), dtypes=(k.dtype,), device=device)
        check_tensor(q_out, "q_out", shape=tuple(q.shape), dtypes=(k.dtype,), device=device)
        rows = None
        if positions is not None:
            check_tensor(positions, "positions", shape=(num_tokens,), dtypes=INDEX_DTYPES, device=device)
        else:
            rows = num_tokens
        check_tensor(cos, "cos", shape=(rows, head_dim // 2), dtypes=FLOAT_DTYPES, device=device)
        check_tensor(sin, "sin", shape=tuple(cos.shape), dtypes=(cos.dtype,), device=device)
        num_heads = q.shape[1]
    else:
        q = q_out = k  # placeholders the kernel never touches
        cos = sin = k
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rope_cache_kernel[(num_tokens,)](
        q, k, v, q_out, positions if positions is not None else slot_mapping, cos, sin, kv_cache, slot_mapping,
        num_heads, num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0), q_out.stride(1),
        cos.stride(0), sin.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        HEAD_DIM=head_dim, HALF=half, BLOCK_HALF=next_pow2(max(half, 1)), BLOCK_D=next_pow2(head_dim),
        BLOCK_HQ=next_pow2(num_heads), BLOCK_HKV=next_pow2(num_kv_heads),
        KV_BLOCK_SIZE=kv_block_size, APPLY_ROPE=apply_rope, HAS_POSITIONS=positions is not None,
        num_warps=1 if interpreting() else 4,
    )  # fmt: skip


def rope_and_cache(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor | None,  # [num_tokens] int32/int64; None: cos/sin hold one row per token
    cos: torch.Tensor,  # [max_pos, head_dim // 2] float32 table, or [num_tokens, head_dim // 2] rows
    sin: torch.Tensor,  # like cos
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64; negative = skip
    *,
    q_out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]; pass q to rotate in place
) -> torch.Tensor:  # q_out: rotated q
    """Rotate q (into q_out) and k, and write rotated k and v into the cache. k and v are left as they were."""
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch(q, k, v, positions, cos, sin, kv_cache, slot_mapping, q_out, apply_rope=True)
    return q_out


def write_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64; negative = skip
) -> None:
    """Scatter already-rotated keys and values into their cache slots (`attention.write_kv` on the GPU)."""
    _launch(None, k, v, None, None, None, kv_cache, slot_mapping, None, apply_rope=False)
