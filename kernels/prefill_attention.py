"""Prefill / extend attention over the paged KV cache (FlashAttention-2 tiling, online softmax).

A sequence brings L new tokens on top of a cached prefix (chunked prefill, prefix-cache hits); with
context C after this step, new token i sits at position C - L + i and sees every cached position
plus new positions up to its own. The new tokens' keys and values are already in the cache (written
by `rope_cache`), so the kernel reads all keys and values from there.

One program owns BLOCK_M query tokens of one sequence and one query head, and walks the context in
BLOCK_N-key tiles: first the tiles every row sees whole (no mask), then the few tiles across the
causal diagonal (masked). Block ids are widened to int64 before they scale strides.
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
    dot_flags,
    interpreting,
    mma,
    next_pow2,
)
from stageserve.kernels.paged_decode_attention import LOG2E, paged_attention_ref

prefill_attention_ref = paged_attention_ref  # the same function, for any query lengths


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, n0, k_base, v_base, table, last_visible, context, qk_scale,
    stride_kb, stride_ks,
    offs_n, offs_d, d_ok,
    KV_BLOCK_SIZE: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """One BLOCK_N tile of keys: the online-softmax update of (acc, m_i, l_i)."""
    pos = n0 + offs_n  # [BLOCK_N]
    n_ok = pos < context
    block = tl.load(table + pos // KV_BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    kv_off = block * stride_kb + (pos % KV_BLOCK_SIZE) * stride_ks  # [BLOCK_N] int64
    k_t = tl.load(k_base + kv_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    s = mma(q, k_t, DOT_PRECISION, DOT_UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
    if CAUSAL_MASK:
        s = tl.where(n_ok[None, :] & (pos[None, :] <= last_visible[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + kv_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    kv_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks]
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    qk_scale,
    stride_qt, stride_qh,
    stride_kv, stride_kb, stride_ks, stride_kh,
    stride_bt,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    m0 = m_block * BLOCK_M
    if m0 >= q_len:  # the grid is sized by the longest query run
        return
    context = tl.load(seq_lens_ptr + seq).to(tl.int32)
    prefix = context - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    token = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    last_visible = prefix + offs_m  # [BLOCK_M]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = kv_ptr + (head // GROUP) * stride_kh
    v_base = k_base + stride_kv
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)

    # Keys [0, prefix + m0] are visible to every row of this block.
    unmasked_end = (prefix + m0 + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, n0, k_base, v_base, table, last_visible, context, qk_scale,
            stride_kb, stride_ks, offs_n, offs_d, d_ok,
            KV_BLOCK_SIZE, False, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    block_end = prefix + tl.minimum(m0 + BLOCK_M, q_len)
    for n0 in range(unmasked_end, block_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, n0, k_base, v_base, table, last_visible, context, qk_scale,
            stride_kb, stride_ks, offs_n, offs_d, d_ok,
            KV_BLOCK_SIZE, True, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = out_ptr + token[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, cast_to(out, out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _config(block_d: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:  # exact float32 products take no tensor-core path: small tiles, or registers spill
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4 if block_d <= 64 else 8, "num_stages": 1}
    if block_d <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


def prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32/int64
    seq_lens: torch.Tensor,  # [num_seqs] int32/int64: context length after this step
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32/int64 on device
    scale: float,
    max_query_len: int,  # host int: sizes the grid
    *,
    config: dict | None = None,  # BLOCK_M, BLOCK_N, num_warps, num_stages overrides
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over cached prefix + new tokens. Launches only."""
    num_tokens, num_heads, head_dim = q.shape
    device = q.device
    check_launch_device(device)
    check_tensor(q, "q", dtypes=FLOAT_DTYPES, device=device)
    check_tensor(kv_cache, "kv_cache", shape=(2, None, None, None, head_dim), dtypes=(q.dtype,), device=device)
    _, _, kv_block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    check_tensor(block_tables, "block_tables", shape=(num_seqs, None), dtypes=INDEX_DTYPES, device=device)
    check_tensor(seq_lens, "seq_lens", shape=(num_seqs,), dtypes=INDEX_DTYPES, device=device)
    check_tensor(query_start_loc, "query_start_loc", shape=(num_seqs + 1,), dtypes=INDEX_DTYPES, device=device)
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    check_tensor(out, "out", shape=tuple(q.shape), dtypes=(q.dtype,), device=device)
    if num_tokens == 0 or max_query_len == 0:
        return out
    block_d = max(16, next_pow2(head_dim))
    cfg = {**_config(block_d, q.dtype), **(config or {})}
    grid = (triton.cdiv(max_query_len, cfg["BLOCK_M"]), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, kv_cache, block_tables, seq_lens, query_start_loc, out,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, KV_BLOCK_SIZE=kv_block_size, GROUP=num_heads // num_kv_heads,
        **dot_flags(q.dtype),
        **cfg,
    )  # fmt: skip
    return out
