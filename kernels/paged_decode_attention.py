"""Paged attention for decode steps and short query runs (speculative verification), with split-KV.

Queries are packed per sequence (`query_start_loc`); query token i of a sequence with L new tokens
and context length C sits at position C - L + i and sees keys 0 .. C - L + i. Decode is L == 1.

One program owns (sequence, KV head, KV split). Its rows are the sequence's L query tokens times the
KV head's group of query heads (row r = token r // group, head r % group), so each K/V tile is read
from the cache once for the whole group and feeds one matrix product. Flash-decoding: when there are
too few (sequence, KV head) pairs to fill the GPU, the context is cut into splits that run in parallel
and write partial results (running max, sum of exponentials, unnormalized output, all float32); a
second kernel merges them. With one split the first kernel writes the output directly.

KV cache layout (one layer): [2, num_blocks, block_size, num_kv_heads, head_dim]; token position p of
a sequence lives in block `block_tables[seq, p // block_size]`, slot `p % block_size`. Block ids are
widened to int64 before they scale strides, so caches past 2**31 elements index correctly.
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
    num_sms,
)

LOG2E = 1.4426950408889634
MAX_ROWS = 128  # query tokens x group heads per program; longer query runs belong to prefill_attention


# ---------------------------------------------------------------------------------------------- reference


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    seq_lens: list[int],  # [num_seqs] context length after this step
    query_start_loc: list[int],  # [num_seqs + 1]
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim] float64
    """Causal attention of each sequence's new tokens over its paged context, in float64 (any query lengths).

    Shared by the decode and prefill kernels: both compute this function.
    """
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for i, context in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        num_new = end - start
        if num_new == 0:
            continue
        blocks = block_tables[i, : -(-context // block_size)].long()
        kv = kv_cache[:, blocks].reshape(2, -1, num_kv_heads, head_dim)[:, :context].double()  # [2, ctx, kvh, d]
        keys = kv[0].repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, ctx, d]
        values = kv[1].repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[start:end].double().transpose(0, 1)  # [heads, new, d]
        scores = queries @ keys.transpose(1, 2) * scale  # [heads, new, ctx]
        last_visible = torch.arange(context - num_new, context, device=q.device)[:, None]  # [new, 1]
        visible = torch.arange(context, device=q.device)[None, :] <= last_visible  # [new, ctx]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ values).transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    kv_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32/int64
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]; unused without HAS_QUERY_START_LOC (one token per sequence)
    out_ptr,  # [num_tokens, num_heads, head_dim]; written when DIRECT_OUT
    part_acc_ptr,  # [num_tokens, num_heads, num_splits, head_dim] float32, unnormalized
    part_max_ptr,  # [num_tokens, num_heads, num_splits] float32, running max (log2 domain)
    part_sum_ptr,  # [num_tokens, num_heads, num_splits] float32, sum of exp2(score - max)
    qk_scale,  # softmax scale * log2(e)
    num_splits,
    stride_qt, stride_qh,
    stride_kv, stride_kb, stride_ks, stride_kh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    stride_mt, stride_mh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_QUERY_START_LOC: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    context = tl.load(seq_lens_ptr + seq).to(tl.int32)
    if HAS_QUERY_START_LOC:
        q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
        q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    else:
        q_start = seq
        q_len = 1

    rows = tl.arange(0, BLOCK_R)
    tok = rows // GROUP  # [BLOCK_R] query token within the sequence
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_R] query head
    row_ok = tok < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    token = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_R, BLOCK_D]
    last_visible = context - q_len + tok  # [BLOCK_R]

    split_len = tl.cdiv(tl.cdiv(context, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    k_base = kv_ptr + kv_head * stride_kh
    v_base = k_base + stride_kv
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n  # [BLOCK_N] key positions
        n_ok = pos < end
        block = tl.load(table + pos // KV_BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        kv_off = block * stride_kb + (pos % KV_BLOCK_SIZE) * stride_ks  # [BLOCK_N] int64
        k_t = tl.load(
            k_base + kv_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0
        )  # [BLOCK_D, BLOCK_N]
        s = mma(q, k_t, DOT_PRECISION, DOT_UPCAST) * qk_scale  # [BLOCK_R, BLOCK_N]
        visible = n_ok[None, :] & (pos[None, :] <= last_visible[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + kv_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    mask = row_ok[:, None] & d_ok[None, :]
    if DIRECT_OUT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, cast_to(out, out_ptr.dtype.element_ty), mask=mask)
    else:
        part = part_acc_ptr + token[:, None] * stride_pt + head[:, None] * stride_ph + split * stride_ps
        tl.store(part + offs_d[None, :], acc, mask=mask)
        stat = token * stride_mt + head * stride_mh + split
        tl.store(part_max_ptr + stat, m_i, mask=row_ok)
        tl.store(part_sum_ptr + stat, l_i, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_acc_ptr,  # [num_tokens, num_heads, num_splits, head_dim] float32
    part_max_ptr,  # [num_tokens, num_heads, num_splits] float32
    part_sum_ptr,  # [num_tokens, num_heads, num_splits] float32
    num_splits,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    stride_mt, stride_mh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    stat = token * stride_mt + head * stride_mh + offs_s
    m = tl.load(part_max_ptr + stat, mask=s_ok, other=float("-inf"))  # [SPLITS_PAD]
    l = tl.load(part_sum_ptr + stat, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits weigh 0
    part = part_acc_ptr + token * stride_pt + head * stride_ph
    acc = tl.load(
        part + offs_s[:, None] * stride_ps + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0
    )  # [SPLITS_PAD, BLOCK_D]
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    out = num / tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, cast_to(out, out_ptr.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------------------------- wrapper


def decode_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    num_sms: int,
    *,
    min_split_tokens: int = 256,
    max_splits: int = 16,
    programs_per_sm: int = 4,
) -> int:
    """How many KV splits: enough (sequence, KV head, split) programs for ~`programs_per_sm` per SM, but no
    split shorter than `min_split_tokens` (short splits cost more in merging than they gain). A power of two,
    so only a handful of reduce-kernel variants get compiled."""
    programs = max(1, num_seqs * num_kv_heads)
    by_occupancy = max(1, programs_per_sm * num_sms // programs)
    by_length = max(1, max_seq_len // min_split_tokens)
    n = max(1, min(by_occupancy, by_length, max_splits))
    return 1 << (n.bit_length() - 1)


def _config(block_r: int, block_d: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return {"BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    if dtype == torch.float32:  # exact float32 products take no tensor-core path: small tiles, or registers spill
        return {"BLOCK_N": 32 if block_r <= 32 else 16, "num_warps": 4 if block_r <= 32 else 8, "num_stages": 1}
    tile = block_r * block_d
    return {
        "BLOCK_N": 64 if block_r <= 64 else 32,
        "num_warps": 4 if tile <= 64 * 128 else 8,
        "num_stages": 2,
    }


def paged_decode_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32/int64
    seq_lens: torch.Tensor,  # [num_seqs] int32/int64: context length after this step
    scale: float,
    max_seq_len: int,  # host int: sizes the split heuristic
    *,
    query_start_loc: torch.Tensor | None = None,  # [num_seqs + 1] int32/int64 on device; None: one token each
    max_query_len: int = 1,  # host int: longest query run of any sequence
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Attention of short query runs over the paged cache. Launches only; never waits on the device."""
    num_tokens, num_heads, head_dim = q.shape
    device = q.device
    check_launch_device(device)
    check_tensor(kv_cache, "kv_cache", shape=(2, None, None, None, head_dim), dtypes=(q.dtype,), device=device)
    _, _, kv_block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    check_tensor(q, "q", dtypes=FLOAT_DTYPES, device=device)
    check_tensor(block_tables, "block_tables", shape=(num_seqs, None), dtypes=INDEX_DTYPES, device=device)
    check_tensor(seq_lens, "seq_lens", shape=(num_seqs,), dtypes=INDEX_DTYPES, device=device)
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    if query_start_loc is None:
        assert num_tokens == num_seqs and max_query_len == 1, "without query_start_loc, one token per sequence"
    else:
        check_tensor(query_start_loc, "query_start_loc", shape=(num_seqs + 1,), dtypes=INDEX_DTYPES, device=device)
    group = num_heads // num_kv_heads
    block_r = max(16, next_pow2(max_query_len * group))
    assert block_r <= MAX_ROWS, f"{max_query_len} query tokens x group {group} > {MAX_ROWS}: use prefill_attention"
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    check_tensor(out, "out", shape=tuple(q.shape), dtypes=(q.dtype,), device=device)
    if num_tokens == 0:
        return out

    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_seq_len, num_sms(device))
    assert num_splits >= 1
    block_d = max(16, next_pow2(head_dim))
    config = _config(block_r, block_d, q.dtype)
    if block_n is not None:
        config["BLOCK_N"] = block_n
    direct = num_splits == 1
    if direct:  # unused placeholders; the kernel never touches them
        part_acc = part_max = part_sum = out
        pt = ph = ps = mt = mh = 0
    else:
        # Under the interpreter (tests), scratch starts as NaN so a partial that is read but never written shows.
        make = torch.full if interpreting() else (lambda shape, _v, **kw: torch.empty(shape, **kw))
        part_acc = make((num_tokens, num_heads, num_splits, head_dim), float("nan"), dtype=torch.float32, device=device)
        part_max = make((num_tokens, num_heads, num_splits), float("nan"), dtype=torch.float32, device=device)
        part_sum = make((num_tokens, num_heads, num_splits), float("nan"), dtype=torch.float32, device=device)
        pt, ph, ps = part_acc.stride(0), part_acc.stride(1), part_acc.stride(2)
        mt, mh = part_max.stride(0), part_max.stride(1)

    grid = (num_seqs, num_kv_heads, num_splits)
    _decode_split_kernel[grid](
        q, kv_cache, block_tables, seq_lens, query_start_loc if query_start_loc is not None else seq_lens,
        out, part_acc, part_max, part_sum,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        pt, ph, ps, mt, mh,
        HEAD_DIM=head_dim, BLOCK_D=block_d, KV_BLOCK_SIZE=kv_block_size, GROUP=group, BLOCK_R=block_r,
        HAS_QUERY_START_LOC=query_start_loc is not None, DIRECT_OUT=direct,
        **dot_flags(q.dtype),
        **config,
    )  # fmt: skip
    if not direct:
        _decode_reduce_kernel[(num_tokens, num_heads)](
            out, part_acc, part_max, part_sum, num_splits,
            out.stride(0), out.stride(1), pt, ph, ps, mt, mh,
            HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS_PAD=next_pow2(num_splits),
            num_warps=1 if interpreting() else 4,
        )  # fmt: skip
    return out


