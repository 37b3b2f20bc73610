"""Dequantize-fused matmuls for grouped 4-bit and 8-bit weights: `out[M, N] = x[M, K] @ dequant(w)[N, K].T`.

One weight layout serves INT4 (asymmetric, group 64/128), GGUF Q4_0/Q4_1 (group 32), INT8 (per channel)
and GGUF Q8_0 (group 32):

    qweight  4-bit: uint8 [N, K // 2], byte b of a row holds q[2b] (low nibble) and q[2b + 1] (high), q in 0..15
             8-bit: int8  [N, K], q in -128..127
    scales   [N, K // group] float16/float32
    offsets  [N, K // group] same dtype, or None:   w[n, k] = q[n, k] * scales[n, g] + offsets[n, g],  g = k // group

    quant_gemv  small batches (decode): each program owns BLOCK_N output rows and streams them once for all
                BLOCK_M <= 8 inputs, so at batch 1 every weight byte is read exactly once. Tiles stay 2-D/3-D
                and element-wise (one reduction at the very end), which Triton compiles to plain FMAs.
    quant_mm    larger batches: [BLOCK_M, BLOCK_N] tiles; each K step dequantizes a tile of words into k
                order in registers and runs one tensor-core dot.
    dequantize  the weight in the activation dtype, for the dequantize + cuBLAS GEMM fallback at large batch.
    quant_gemv_gluon, quant_mm_gluon   CUDA only: the GEMV with explicit register layouts (quant_gemv_gluon.py)
                and 4-bit codes on tensor cores (quant_mm_gluon.py); the engine's tuner times them with the rest.
    quant_mm_tiles   CUDA only: INT4 on tensor cores from weights re-laid at load in the MMA's fragment order
                (quant_ref.tile_int4, quant_tc_tiles.py, quant_wg_tiles.py): their entry points are in quant_tiles.py.

Code p of word j of a row is element PER * j + p (PER = 8 nibbles or 4 bytes a word), so a "plane" (code p
of every word in a tile) meets the inputs x[PER * j + p]: strided loads of x, which are few (x is tiny
next to the weight) and stay in L1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stageserve.kernels._common import (
    FLOAT_DTYPES,
    check_launch_device,
    check_tensor,
    dot_flags,
    gluon_capable,
    gemv_block_n,
    interpreting,
    mma,
    next_pow2,
    num_sms,
)
from stageserve.kernels.quant_ref import dequantize_ref, pack_int4, quant_matmul_ref, unpack_int4  # noqa: F401 (re-exported)

SCALE_DTYPES = (torch.float16, torch.float32)
GEMV_MAX_M = 8  # quant_gemv unrolls its rows and does M multiply-adds per weight; past this quant_mm's dots win


# -- kernels ------------------------------------------------------------------------------------------
#
# Every kernel reads the codes as int32 words (8 nibbles or 4 bytes; the byte layout above makes code i of
# word j element PER * j + i) and turns them into float32 with bit operations instead of int-to-float
# conversions, which run at a sixteenth of the FMA rate on Hopper:
#   4-bit: bits(0x4B000000 | q)          = 2**23 + q          -> subtract 2**23
#   8-bit: bits(0x4B000080 ^ (q & 0xFF)) = 2**23 + (q + 128)  -> subtract 2**23 + 128   (q two's complement)
# Both subtractions are exact, so every code becomes exactly its integer value.


@triton.jit
def _codes(words, shift: tl.constexpr, BITS: tl.constexpr):
    """Code `shift / BITS` of every int32 word, as float32 (exact integers)."""
    v = (words >> shift) & ((1 << BITS) - 1)
    if BITS == 4:
        return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        return (v ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _plane(w, s, o, shift: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """Code `shift / BITS` of every word, dequantized with its word's group scale (and offset)."""
    q = _codes(w, shift, BITS)
    if not PER_CHANNEL:
        q = q * s
        if HAS_OFFSET:
            q += o
    return q


@triton.jit
def _k_order(w, s, o, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_OFFSET: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):  # fmt: skip
    """Words [BLOCK_N, BLOCK_W] -> dequantized float32 [BLOCK_N, BLOCK_W * PER] in k order. Each join adds
    an in-register axis (one bit of the code's index p, most significant first), so the reshape that
    flattens them moves no data."""
    if BITS == 4:
        t = tl.join(
            tl.join(tl.join(_plane(w, s, o, 0, 4, PER_CHANNEL, HAS_OFFSET), _plane(w, s, o, 16, 4, PER_CHANNEL, HAS_OFFSET)),
                    tl.join(_plane(w, s, o, 8, 4, PER_CHANNEL, HAS_OFFSET), _plane(w, s, o, 24, 4, PER_CHANNEL, HAS_OFFSET))),
            tl.join(tl.join(_plane(w, s, o, 4, 4, PER_CHANNEL, HAS_OFFSET), _plane(w, s, o, 20, 4, PER_CHANNEL, HAS_OFFSET)),
                    tl.join(_plane(w, s, o, 12, 4, PER_CHANNEL, HAS_OFFSET), _plane(w, s, o, 28, 4, PER_CHANNEL, HAS_OFFSET))),
        )  # fmt: skip
        return tl.reshape(t, [BLOCK_N, BLOCK_W * 8])
    else:
        t = tl.join(
            tl.join(_plane(w, s, o, 0, 8, PER_CHANNEL, HAS_OFFSET), _plane(w, s, o, 16, 8, PER_CHANNEL, HAS_OFFSET)),
            tl.join(_plane(w, s, o, 8, 8, PER_CHANNEL, HAS_OFFSET), _plane(w, s, o, 24, 8, PER_CHANNEL, HAS_OFFSET)),
        )  # fmt: skip
        return tl.reshape(t, [BLOCK_N, BLOCK_W * 4])


@triton.jit
def _code_base(dtype: tl.constexpr):
    """What `_k_order_codes` adds to every code: 128 in bfloat16, 1024 in float16, 0 in float32."""
    if dtype == tl.bfloat16:
        return 128.0
    elif dtype == tl.float16:
        return 1024.0
    else:
        return 0.0


@triton.jit
def _pair_planes(w, shift: tl.constexpr, dtype: tl.constexpr):
    """Codes shift/4 and shift/4 + 4 of every 4-bit word as (C + q) in `dtype`, exactly: one shift and one
    lop3 make both halves of an int32 the 16-bit patterns of C + q (0x4300 | q is 128 + q in bfloat16,
    0x6400 | q is 1024 + q in float16). float32 takes the 2**23 trick per code."""
    if dtype == tl.float32:
        return _codes(w, shift, 4), _codes(w, shift + 16, 4)
    else:
        if dtype == tl.bfloat16:
            t = ((w >> shift) & 0x000F000F) | 0x43004300
        else:
            t = ((w >> shift) & 0x000F000F) | 0x64006400
        return t.to(tl.int16).to(dtype, bitcast=True), (t >> 16).to(tl.int16).to(dtype, bitcast=True)


@triton.jit
def _k_order_codes(w, dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """4-bit words [BLOCK_N, BLOCK_W] -> C + q in `dtype`, [BLOCK_N, BLOCK_W * 8] in k order (as _k_order)."""
    p0, p4 = _pair_planes(w, 0, dtype)
    p1, p5 = _pair_planes(w, 4, dtype)
    p2, p6 = _pair_planes(w, 8, dtype)
    p3, p7 = _pair_planes(w, 12, dtype)
    t = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    return tl.reshape(t, [BLOCK_N, BLOCK_W * 8])


@triton.jit
def _load_words(w_ptr, s_ptr, o_ptr, rn64, n_ok, col, c_ok, stride_wn, stride_sn,
                GROUP: tl.constexpr, PER: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_OFFSET: tl.constexpr):  # fmt: skip
    """A [BLOCK_N, BLOCK_W] tile of words and, per word, its group's scale and offset (L1-cached repeats)."""
    mask = n_ok[:, None] & c_ok[None, :]
    w = tl.load(w_ptr + rn64[:, None] * stride_wn + col[None, :], mask=mask, other=0)
    s = w  # unused placeholders when PER_CHANNEL / no offsets
    o = w
    if not PER_CHANNEL:
        at = rn64[:, None] * stride_sn + (col // (GROUP // PER))[None, :]  # each word lies in one group
        s = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            o = tl.load(o_ptr + at, mask=mask, other=0.0).to(tl.float32)
    return w, s, o


@triton.jit
def _quant_gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K // PER] int32 words
    s_ptr,  # [N, K // GROUP] (or [N, 1] with PER_CHANNEL)
    o_ptr,  # same as s, read only with HAS_OFFSET
    out_ptr,  # [M, N]
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr,  # 4 or 8
    GROUP: tl.constexpr,  # elements per scale (unused with PER_CHANNEL)
    PER_CHANNEL: tl.constexpr,  # one scale per row, applied after the whole K loop
    HAS_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input rows per program: each weight tile is unpacked once for all of them
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,  # words per row per K step
    K_ORDER: tl.constexpr,  # dequantize the tile into k order (one contiguous x load) instead of code planes
):  # fmt: skip
    """Every tensor is 2-D or 3-D and element-wise until one reduction at the end. A [BLOCK_N, BLOCK_W]
    tile of words is taken apart code by code ("planes": code p of every word), each plane multiplied
    with the inputs it meets (x[PER * word + p], a strided load that stays in L1) and summed per word;
    the word sums are scaled by their group's scale (and the group's offset times the inputs' sum). With
    K_ORDER the planes are dequantized and joined back into k order instead, which costs a multiply-add
    per weight more but loads x contiguously, once per tile."""
    PER: tl.constexpr = 32 // BITS
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    rm = tl.minimum(tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M), M - 1)  # rows past M redo M - 1 (not stored)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    cs = tl.arange(0, BLOCK_W)
    num_words = K // PER
    if K_ORDER:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_W * PER], dtype=tl.float32)
        ks = tl.arange(0, BLOCK_W * PER)
        for w0 in range(0, num_words, BLOCK_W):
            col = w0 + cs
            c_ok = col < num_words
            w, s, o = _load_words(w_ptr, s_ptr, o_ptr, rn64, n_ok, col, c_ok, stride_wn, stride_sn, GROUP, PER, PER_CHANNEL, HAS_OFFSET)
            tile = _k_order(w, s, o, BITS, PER_CHANNEL, HAS_OFFSET, BLOCK_N, BLOCK_W)  # [BLOCK_N, BLOCK_W * PER]
            x = tl.load(x_rows + (w0 * PER + ks)[None, :], mask=(w0 * PER + ks < K)[None, :], other=0.0).to(tl.float32)
            acc += tile[None, :, :] * x[:, None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_W], dtype=tl.float32)
        for w0 in range(0, num_words, BLOCK_W):
            col = w0 + cs  # [BLOCK_W] word index
            c_ok = col < num_words
            w, s, o = _load_words(w_ptr, s_ptr, o_ptr, rn64, n_ok, col, c_ok, stride_wn, stride_sn, GROUP, PER, PER_CHANNEL, HAS_OFFSET)
            part = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_W], dtype=tl.float32)
            xsum = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
            for p in tl.static_range(PER):
                x = tl.load(x_rows + (col * PER + p)[None, :], mask=c_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_W]
                part += _codes(w, p * BITS, BITS)[None, :, :] * x[:, None, :]
                if HAS_OFFSET:
                    xsum += x
            if PER_CHANNEL:
                acc += part
            else:
                acc += part * s[None, :, :]
                if HAS_OFFSET:
                    acc += xsum[:, None, :] * o[None, :, :]
    out_val = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    if PER_CHANNEL:
        out_val *= tl.load(s_ptr + rn64 * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, out_val.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & n_ok[None, :])


@triton.jit
def _quant_mm_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr, out_ptr,  # as in _quant_gemv_kernel
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,  # BLOCK_W * PER >= 16: the dot's depth
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """Per K step a [BLOCK_N, BLOCK_W] tile of words is dequantized in registers into k order and meets a
    contiguous [BLOCK_M, BLOCK_W * PER] tile of x in one tensor-core dot."""
    PER: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_W * PER
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    rn64 = rn.to(tl.int64)
    cs = tl.arange(0, BLOCK_W)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for w0 in range(0, K // PER, BLOCK_W):
        w, s, o = _load_words(w_ptr, s_ptr, o_ptr, rn64, n_ok, w0 + cs, cs < BLOCK_W, stride_wn, stride_sn, GROUP, PER, PER_CHANNEL, HAS_OFFSET)
        tile = _k_order(w, s, o, BITS, PER_CHANNEL, HAS_OFFSET, BLOCK_N, BLOCK_W).to(dot_dtype)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_rows + w0 * PER, mask=m_ok[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
        acc += mma(x, tl.trans(tile), DOT_PRECISION, DOT_UPCAST)
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + rn64 * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _quant_mm_t_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr, out_ptr,  # as in _quant_gemv_kernel; out is [SPLIT, M, N] with K split
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om, stride_split, words_per_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, GATHER: tl.constexpr, CODES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """out.T = W x.T: the dequantized [BLOCK_N, BLOCK_K] weight tile is the dot's first operand, which on
    Hopper wgmma takes from registers (no shared-memory round trip for the tile), and x.T [BLOCK_K, BLOCK_M]
    the second, loaded through the pipeline. BLOCK_N >= 64 fills the MMA's rows whatever the batch, so
    BLOCK_M can be as small as the batch. Program axis 2 takes `words_per_split` words of K."""
    PER: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_W * PER
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok, n_ok = rm < M, rn < N
    rn64 = rn.to(tl.int64)
    cs = tl.arange(0, BLOCK_W)
    xt = x_ptr + rm[None, :].to(tl.int64) * stride_xm + tl.arange(0, BLOCK_K)[:, None]  # [BLOCK_K, BLOCK_M]
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    w_begin = tl.program_id(2) * words_per_split
    for w0 in range(w_begin, tl.minimum(w_begin + words_per_split, K // PER), BLOCK_W):
        if CODES:  # 4-bit codes exactly as C + q in the dot's dtype; the step's group scale and offset after it
            w = tl.load(w_ptr + rn64[:, None] * stride_wn + (w0 + cs)[None, :], mask=n_ok[:, None], other=0)
            tile = _k_order_codes(w, dot_dtype, BLOCK_N, BLOCK_W)
            x = tl.load(xt + w0 * PER, mask=m_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
            part = mma(tile, x, DOT_PRECISION, DOT_UPCAST)
            xs = tl.sum(x.to(tl.float32), axis=0)  # [BLOCK_M]
            at = rn64 * stride_sn + (w0 * PER) // GROUP
            s = tl.load(s_ptr + at, mask=n_ok, other=0.0).to(tl.float32)
            o = tl.load(o_ptr + at, mask=n_ok, other=0.0).to(tl.float32)
            acc += s[:, None] * part + (o - _code_base(dot_dtype) * s)[:, None] * xs[None, :]
        elif GATHER:
            kk = tl.arange(0, BLOCK_K)
            wv = tl.load(w_ptr + rn64[:, None] * stride_wn + (w0 + kk // PER)[None, :], mask=n_ok[:, None], other=0)
            f = _codes(wv >> ((kk % PER) * BITS)[None, :], 0, BITS)
            if not PER_CHANNEL:
                at = rn64[:, None] * stride_sn + ((w0 * PER + kk) // GROUP)[None, :]
                f = f * tl.load(s_ptr + at, mask=n_ok[:, None], other=0.0).to(tl.float32)
                if HAS_OFFSET:
                    f += tl.load(o_ptr + at, mask=n_ok[:, None], other=0.0).to(tl.float32)
            tile = f.to(dot_dtype)
        else:
            w, s, o = _load_words(w_ptr, s_ptr, o_ptr, rn64, n_ok, w0 + cs, cs < BLOCK_W, stride_wn, stride_sn, GROUP, PER, PER_CHANNEL, HAS_OFFSET)
            tile = _k_order(w, s, o, BITS, PER_CHANNEL, HAS_OFFSET, BLOCK_N, BLOCK_W).to(dot_dtype)  # [BLOCK_N, BLOCK_K]
        if not CODES:
            x = tl.load(xt + w0 * PER, mask=m_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
            acc += mma(tile, x, DOT_PRECISION, DOT_UPCAST)
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + rn64 * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + tl.program_id(2) * stride_split + rm[None, :].to(tl.int64) * stride_om + rn[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, o_ptr, out_ptr,  # out: [N, K]
    N, K,
    stride_wn, stride_sn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    PER: tl.constexpr = 32 // BITS
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w0 = tl.program_id(1) * BLOCK_W
    cs = tl.arange(0, BLOCK_W)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    w, s, o = _load_words(w_ptr, s_ptr, o_ptr, rn64, n_ok, w0 + cs, cs < BLOCK_W, stride_wn, stride_sn, GROUP, PER, PER_CHANNEL, HAS_OFFSET)
    tile = _k_order(w, s, o, BITS, PER_CHANNEL, HAS_OFFSET, BLOCK_N, BLOCK_W)
    if PER_CHANNEL:
        tile *= tl.load(s_ptr + rn64 * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    k = w0 * PER + tl.arange(0, BLOCK_W * PER)
    tl.store(out_ptr + rn64[:, None] * stride_on + k[None, :], tile.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


# -- wrappers -----------------------------------------------------------------------------------------


def _check_weight(qweight, scales, offsets, bits: int, k: int, device) -> tuple[int, int, bool]:
    """Assert the layout above; returns (N, group, per_channel)."""
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    n = qweight.shape[0]
    check_tensor(qweight, "qweight", shape=(n, k // (8 // bits)), dtypes=(torch.uint8 if bits == 4 else torch.int8,), device=device)
    assert qweight.stride(0) == qweight.shape[1], "qweight must be contiguous"
    group = check_groups(scales, offsets, n, k, device)
    per_channel = scales.shape[1] == 1
    assert per_channel or group % 32 == 0, f"group size {group} must be a multiple of 32"
    assert per_channel or offsets is not None or bits == 8, "4-bit weights need offsets (their q is unsigned)"
    return n, group, per_channel


def check_groups(scales, offsets, n: int, k: int, device) -> int:
    """Assert the scales' and offsets' layout for an [N, K] weight; returns the group size."""
    num_groups = scales.shape[1]
    assert num_groups >= 1 and k % num_groups == 0, f"K={k} is not a multiple of the {num_groups} scale groups"
    check_tensor(scales, "scales", shape=(n, num_groups), dtypes=SCALE_DTYPES, device=device)
    if offsets is not None:
        check_tensor(offsets, "offsets", shape=(n, num_groups), dtypes=(scales.dtype,), device=device)
        assert offsets.stride(0) == scales.stride(0), "offsets and scales must share a row stride"
    return k // num_groups


def _k_tile(k: int, group: int, per_channel: bool) -> int:
    """The GROUP the kernels take: the group size, or with per-channel scales (where the kernels never read
    GROUP) a power of two dividing K, so that every K shares one compiled variant. Asserts the K multiple
    of 32 that the fused kernel's K steps need."""
    if not per_channel:
        return group
    tile = next((t for t in (128, 64, 32) if k % t == 0), None)
    assert tile is not None, f"per-channel K={k} must be a multiple of 32"
    return tile


def _prepare(x, qweight, scales, offsets, bits, out):
    m, k = x.shape
    device = x.device
    check_launch_device(device)
    check_tensor(x, "x", shape=(m, k), dtypes=FLOAT_DTYPES, device=device)
    n, group, per_channel = _check_weight(qweight, scales, offsets, bits, k, device)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=device)
    check_tensor(out, "out", shape=(m, n), dtypes=(x.dtype,), device=device)
    return m, n, k, _k_tile(k, group, per_channel), per_channel, out


def _words(qweight: torch.Tensor) -> torch.Tensor:
    """The codes as int32 words (8 nibbles or 4 bytes each): the kernels' loads are then 4-16 bytes wide.
    Its stride(0) is the row stride in words the kernels take."""
    return qweight.view(torch.int32)


def quant_gemv(
    x: torch.Tensor,  # [M, K], M <= GEMV_MAX_M
    qweight: torch.Tensor,  # [N, K // 2] uint8 (4-bit) or [N, K] int8
    scales: torch.Tensor,  # [N, K // group]
    offsets: torch.Tensor | None,  # [N, K // group]
    bits: int,
    *,
    block_n: int | None = None,
    block_w: int | None = None,  # words per row per K step
    k_order: bool = False,
    num_warps: int | None = None,
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    m, n, k, tile, per_channel, out = _prepare(x, qweight, scales, offsets, bits, out)
    assert 1 <= m <= GEMV_MAX_M, f"quant_gemv takes 1..{GEMV_MAX_M} rows, got {m}; use quant_mm"
    num_words = k * bits // 32
    if block_n is None:
        block_n = 4 if interpreting() else gemv_block_n(n, num_sms(x.device))
    if block_w is None:  # 4 KiB of weight per program per step at 4 warps: two 16-byte loads per thread
        block_w = 16 if interpreting() else max(4, 1024 // block_n)
    block_w = min(block_w, next_pow2(num_words))
    block_m = next_pow2(m)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    words = _words(qweight)
    _quant_gemv_kernel[grid](
        x, words, scales, scales if offsets is None else offsets, out, m, n, k,
        x.stride(0), words.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP=tile, PER_CHANNEL=per_channel, HAS_OFFSET=offsets is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w, K_ORDER=k_order,
        num_warps=num_warps or (1 if interpreting() else 4),
    )  # fmt: skip
    return out


def quant_gemv_gluon(
    x: torch.Tensor,  # [M, K], M <= GEMV_MAX_M (rows past quant_gemv_gluon's MAX_M run in further programs)
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    *,
    config=None,  # a quant_gemv_gluon.GluonGemvConfig; default its CONFIGS[0]
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    """quant_gemv with explicit register layouts (kernels/quant_gemv_gluon.py): 16-byte loads of weights and
    inputs, two instructions per code before its FMA. CUDA only (Gluon has no interpreter); `gluon_supports`
    says whether a weight's K and group fit its chunks."""
    from stageserve.kernels import quant_gemv_gluon as qg

    m, n, k, tile, per_channel, out = _prepare(x, qweight, scales, offsets, bits, out)
    assert 1 <= m <= GEMV_MAX_M, f"quant_gemv_gluon takes 1..{GEMV_MAX_M} rows, got {m}; use quant_mm"
    assert gluon_capable(x.device), "quant_gemv_gluon needs a CUDA device of compute capability >= 8.0"
    assert qg.supports(k, tile, per_channel, bits), f"K={k}, group {tile}: not a whole number of {qg.VEC_WORDS}-word chunks per group"
    qg.launch(x, _words(qweight), scales, offsets, out, m=m, n=n, k=k, group=tile, per_channel=per_channel, bits=bits,
              config=config or qg.CONFIGS[0])  # fmt: skip
    return out


def _gluon_fit(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[int, int, bool] | None:
    """(K, group as the kernels take it, per_channel) of a weight the Gluon kernels could run where it lies:
    on a Gluon-capable device, with K a multiple of 32 split into whole groups; else None."""
    if not gluon_capable(qweight.device):
        return None
    k = qweight.shape[1] * (8 // bits)
    if k % 32 or k % scales.shape[1]:
        return None
    per_channel = scales.shape[1] == 1
    return k, _k_tile(k, k // scales.shape[1], per_channel), per_channel


def gluon_supports(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> bool:
    """Whether quant_gemv_gluon can run this weight on its device (and this Triton has Gluon: 3.4 on)."""
    try:
        from stageserve.kernels import quant_gemv_gluon as qg
    except ImportError:
        return False
    fit = _gluon_fit(qweight, scales, bits)
    return fit is not None and qg.supports(*fit, bits)


def quant_mm_gluon(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K // 2] uint8: 4-bit codes only
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    *,
    config=None,  # a quant_mm_gluon.GluonMmaConfig; default its CONFIGS[0]
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    """4-bit weights on tensor cores (kernels/quant_mm_gluon.py), for batches from a few rows up. CUDA only;
    `mm_gluon_supports` says whether a weight fits."""
    from stageserve.kernels import quant_mm_gluon as qmg

    m, n, k, tile, per_channel, out = _prepare(x, qweight, scales, offsets, bits, out)
    if m == 0:
        return out
    assert gluon_capable(x.device), "quant_mm_gluon needs a CUDA device of compute capability >= 8.0"
    assert offsets is not None and qmg.supports(k, tile, per_channel, bits), f"quant_mm_gluon: {bits}-bit, group {tile}, K={k} does not fit"
    qmg.launch(x, _words(qweight), scales, offsets, out, m=m, n=n, k=k, group=tile, config=config or qmg.CONFIGS[0],
               sms=num_sms(x.device))
    return out


def mm_gluon_supports(qweight: torch.Tensor, scales: torch.Tensor, offsets, bits: int) -> bool:
    """Whether quant_mm_gluon can run this weight on its device (and this Triton has Gluon: 3.4 on)."""
    try:
        from stageserve.kernels import quant_mm_gluon as qmg
    except ImportError:
        return False
    fit = _gluon_fit(qweight, scales, bits)
    return fit is not None and offsets is not None and qmg.supports(*fit, bits)


def _block_w(num_words: int, choices) -> int:
    """The largest word count per K step that divides a row (the kernels' K loops are unmasked)."""
    return next(w for w in choices if num_words % w == 0)


def _mm_tiles(m: int, num_words: int, bits: int, x: torch.Tensor, block_m: int | None, block_w: int | None) -> tuple[int, int]:
    """The tiled kernels' default batch rows and words per K step (small tiles on the interpreter). Float32
    inputs take half the K step: three pipeline stages of 128-deep float32 tiles overflow Hopper's 227 KiB of
    shared memory."""
    if block_m is None:
        block_m = 16 if interpreting() else min(128, max(16, next_pow2(m)))
    if block_w is None:
        choices = (16, 8, 4) if bits == 4 else (32, 16, 8)
        block_w = (4 if bits == 4 else 8) if interpreting() else _block_w(num_words, choices[x.element_size() // 4 :])
    return block_m, block_w


def quant_mm(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_w: int | None = None,  # words per row per K step; BLOCK_W * PER >= 16 (the dot's depth)
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    m, n, k, tile, per_channel, out = _prepare(x, qweight, scales, offsets, bits, out)
    if m == 0:
        return out
    num_words = k * bits // 32
    block_m, block_w = _mm_tiles(m, num_words, bits, x, block_m, block_w)
    if block_n is None:  # small M is weight-bound: narrow tiles for more programs; large M: wider for reuse
        block_n = 16 if interpreting() else (64 if block_m <= 64 else 128)
    assert block_w * 32 // bits >= 16 and num_words % block_w == 0, f"K={k}: {num_words} words per row, block_w={block_w}"
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    words = _words(qweight)
    _quant_mm_kernel[grid](
        x, words, scales, scales if offsets is None else offsets, out, m, n, k,
        x.stride(0), words.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP=tile, PER_CHANNEL=per_channel, HAS_OFFSET=offsets is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w, **dot_flags(x.dtype),
        num_warps=num_warps or (1 if interpreting() else (8 if block_m >= 64 else 4)),
        num_stages=num_stages or (1 if interpreting() else 3),
    )  # fmt: skip
    return out


def codes_fit(bits: int, group: int, has_offsets: bool) -> bool:
    """Whether quant_mm_t can put this weight's codes on the tensor cores as they are (`codes=True`):
    4-bit codes with offsets, in groups of a multiple of 16 (a K step lies inside one group)."""
    return bits == 4 and has_offsets and group % 16 == 0


def quant_mm_t(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,  # >= 64 on a GPU (the MMA's rows)
    block_w: int | None = None,
    split_k: int | None = None,  # K splits (None: about two programs per SM); partial sums in float32, summed in a fixed order
    gather: bool = False,  # build the tile element by element from gathered words instead of by joins
    codes: bool = False,  # 4-bit with offsets: codes on the tensor cores, each K step's group scale after
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    """quant_mm with the operands swapped (out.T = W x.T): the weight tile fills the MMA's rows, the batch its
    columns, so a batch of 16 is not padded to a 64-row tile and narrow shapes (`down`) can split K."""
    m, n, k, tile, per_channel, out = _prepare(x, qweight, scales, offsets, bits, out)
    if m == 0:
        return out
    num_words = k * bits // 32
    if codes:
        assert codes_fit(bits, tile, offsets is not None), f"codes: 4-bit codes with offsets in groups of 16n, not {bits}-bit group {tile}"
    auto_w = block_w is None
    block_m, block_w = _mm_tiles(m, num_words, bits, x, block_m, block_w)
    if codes and auto_w:  # a K step inside one group
        block_w = next(w for w in (block_w, 8, 4, 2) if w <= block_w and tile % (8 * w) == 0)
    if block_n is None:
        block_n = 16 if interpreting() else 128
    assert block_w * 32 // bits >= 16 and num_words % block_w == 0, f"K={k}: {num_words} words per row, block_w={block_w}"
    assert not codes or tile % (8 * block_w) == 0, f"codes: a K step of {8 * block_w} codes crosses a group of {tile}"
    steps = num_words // block_w
    grid_nm = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if split_k is None:
        split_k = 1 if interpreting() else max(1, min(2 * num_sms(x.device) // grid_nm, steps // 4, 8))
    per_split = triton.cdiv(steps, max(1, min(split_k, steps))) * block_w
    splits = triton.cdiv(num_words, per_split)
    dst = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    words = _words(qweight)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)
    _quant_mm_t_kernel[grid](
        x, words, scales, scales if offsets is None else offsets, dst, m, n, k,
        x.stride(0), words.stride(0), scales.stride(0), dst.stride(-2), dst.stride(0) if splits > 1 else 0, per_split,
        BITS=bits, GROUP=tile, PER_CHANNEL=per_channel, HAS_OFFSET=offsets is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w, GATHER=gather, CODES=codes, **dot_flags(x.dtype),
        num_warps=num_warps or (1 if interpreting() else (8 if block_n >= 128 else 4)),
        num_stages=num_stages or (1 if interpreting() else (2 if gather and block_m * block_n >= 128 * 128 else 3)),
    )  # fmt: skip
    if splits > 1:
        torch.sum(dst, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(dst.sum(dim=0))
    return out


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int, dtype: torch.dtype,
    *, out: torch.Tensor | None = None,  # [N, K]
) -> torch.Tensor:  # [N, K] in dtype
    n = qweight.shape[0]
    k = qweight.shape[1] * (8 // bits)
    check_launch_device(qweight.device)
    _, group, per_channel = _check_weight(qweight, scales, offsets, bits, k, qweight.device)
    tile = _k_tile(k, group, per_channel)
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    check_tensor(out, "out", shape=(n, k), dtypes=(dtype,), device=qweight.device)
    assert dtype in FLOAT_DTYPES
    words = _words(qweight)
    num_words = words.shape[1]
    block_n, block_w = (16, 4) if interpreting() else (32, _block_w(num_words, (32, 16, 8, 4)))
    _dequantize_kernel[(triton.cdiv(n, block_n), num_words // block_w)](
        words, scales, scales if offsets is None else offsets, out, n, k,
        words.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP=tile, PER_CHANNEL=per_channel, HAS_OFFSET=offsets is not None,
        BLOCK_N=block_n, BLOCK_W=block_w,
    )  # fmt: skip
    return out
