"""Dequantize-fused matmuls for grouped 4-bit and 8-bit weights: `out[M, N] = x[M, K] @ dequant(w)[N, K].T`.

One weight layout serves INT4 (asymmetric, group 64/128), GGUF Q4_0/Q4_1 (group 32), INT8 (per channel)
and GGUF Q8_0 (group 32):

    qweight  4-bit: uint8 [N, K // 2], byte b of a row holds q[2b] (low nibble) and q[2b + 1] (high), q in 0..15
             8-bit: int8  [N, K], q in -128..127
    scales   [N, K // group] float16/float32
    offsets  [N, K // group] same dtype, or None:   w[n, k] = q[n, k] * scales[n, g] + offsets[n, g],  g = k // group

Both kernels sum q * x over a group before scaling (sum_k (q s + o) x = s sum_k q x + o sum_k x), so no
element is ever dequantized: a group costs one multiply-add per output instead of one per weight.

    quant_gemv  small batches (decode): each program owns BLOCK_N output rows for BLOCK_M <= 8 inputs and
                streams its rows of the weight once, so at batch 1 every weight byte is read exactly once.
    quant_mm    larger batches: [BLOCK_M, BLOCK_N] tiles, each group a tensor-core dot of x against the raw
                integers (exact in bf16/fp16), scaled in float32 after the dot.
    dequantize  the weight in the activation dtype, for the dequantize + cuBLAS GEMM fallback at large batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stageserve.kernels._common import FLOAT_DTYPES, check_launch_device, check_tensor, dot_flags, interpreting, mma, next_pow2
from stageserve.kernels.quant_ref import dequantize_ref, pack_int4, quant_matmul_ref, unpack_int4  # noqa: F401 (re-exported)

SCALE_DTYPES = (torch.float16, torch.float32)
GEMV_MAX_M = 8  # the 4-D register tile of quant_gemv grows with BLOCK_M; past this quant_mm is the better kernel


# -- kernels ------------------------------------------------------------------------------------------

# Triton 3.9's interpreter converts integers to bfloat16 by reinterpreting bits; going through float32
# there gives the GPU's (exact) conversion. Fixed at import, like TRITON_INTERPRET itself.
_INTERPRET = tl.constexpr(interpreting())


@triton.jit
def _int_to(q, dtype: tl.constexpr):
    """Small integers to a float dtype (exact: |q| <= 128)."""
    if _INTERPRET:
        return q.to(tl.float32).to(dtype)
    else:
        return q.to(dtype)


@triton.jit
def _quant_gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K // PACK]
    s_ptr,  # [N, K // GROUP] (or [N, 1] with PER_CHANNEL)
    o_ptr,  # same as s, read only with HAS_OFFSET
    out_ptr,  # [M, N]
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr,  # 4 or 8
    GROUP: tl.constexpr,  # elements per scale, or the K tile when PER_CHANNEL
    PER_CHANNEL: tl.constexpr,  # one scale per row, applied after the whole K loop
    HAS_OFFSET: tl.constexpr,
    GROUPS: tl.constexpr,  # groups per K step
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    PACK: tl.constexpr = 8 // BITS
    COLS: tl.constexpr = GROUP // PACK  # bytes of one row in one group
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = rn < N, rm < M
    gs = tl.arange(0, GROUPS)
    cs = tl.arange(0, COLS)
    num_groups = K // GROUP
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        g = g0 + gs  # [GROUPS]
        g_ok = g < num_groups
        byte = g[:, None] * COLS + cs[None, :]  # [GROUPS, COLS]
        w = tl.load(
            w_ptr + rn64[:, None, None] * stride_wn + byte[None, :, :],
            mask=n_ok[:, None, None] & g_ok[None, :, None], other=0,
        )  # [BLOCK_N, GROUPS, COLS]
        k = g[:, None] * GROUP + cs[None, :] * PACK  # [GROUPS, COLS]: first element of each byte
        x_mask = m_ok[:, None, None] & g_ok[None, :, None]
        x_at = x_ptr + rm[:, None, None] * stride_xm + k[None, :, :]
        xa = tl.load(x_at, mask=x_mask, other=0.0).to(tl.float32)  # [BLOCK_M, GROUPS, COLS]
        if BITS == 4:
            xb = tl.load(x_at + 1, mask=x_mask, other=0.0).to(tl.float32)
            lo = (w & 0xF).to(tl.float32)
            hi = (w >> 4).to(tl.float32)
            part = tl.sum(xa[:, None, :, :] * lo[None, :, :, :] + xb[:, None, :, :] * hi[None, :, :, :], axis=3)
            xsum = tl.sum(xa + xb, axis=2)  # [BLOCK_M, GROUPS]
        else:
            part = tl.sum(xa[:, None, :, :] * w.to(tl.float32)[None, :, :, :], axis=3)
            xsum = tl.sum(xa, axis=2)
        # part: [BLOCK_M, BLOCK_N, GROUPS], sums of q * x per group
        if PER_CHANNEL:
            acc += tl.sum(part, axis=2)
        else:
            sg_mask = n_ok[:, None] & g_ok[None, :]
            s = tl.load(s_ptr + rn64[:, None] * stride_sn + g[None, :], mask=sg_mask, other=0.0).to(tl.float32)
            scaled = part * s[None, :, :]  # [BLOCK_M, BLOCK_N, GROUPS]
            if HAS_OFFSET:
                o = tl.load(o_ptr + rn64[:, None] * stride_sn + g[None, :], mask=sg_mask, other=0.0).to(tl.float32)
                scaled += xsum[:, None, :] * o[None, :, :]
            acc += tl.sum(scaled, axis=2)
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + rn64 * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _quant_mm_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr, out_ptr,  # as in _quant_gemv_kernel
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    PACK: tl.constexpr = 8 // BITS
    COLS: tl.constexpr = GROUP // PACK
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    cs = tl.arange(0, COLS)
    rn64 = rn.to(tl.int64)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + rn64[:, None] * stride_wn
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, K // GROUP):
        w = tl.load(w_rows + g * COLS + cs[None, :], mask=n_ok[:, None], other=0)  # [BLOCK_N, COLS]
        k = g * GROUP + cs[None, :] * PACK
        xa = tl.load(x_rows + k, mask=m_ok[:, None], other=0.0)  # [BLOCK_M, COLS]
        if BITS == 4:  # integers 0..15 are exact in any float dtype, so the dot is exact up to accumulation
            xb = tl.load(x_rows + k + 1, mask=m_ok[:, None], other=0.0)
            part = mma(xa, tl.trans(_int_to(w & 0xF, dot_dtype)), DOT_PRECISION, DOT_UPCAST)
            part += mma(xb, tl.trans(_int_to(w >> 4, dot_dtype)), DOT_PRECISION, DOT_UPCAST)
            xsum = tl.sum(xa.to(tl.float32) + xb.to(tl.float32), axis=1)
        else:
            part = mma(xa, tl.trans(_int_to(w, dot_dtype)), DOT_PRECISION, DOT_UPCAST)
            xsum = tl.sum(xa.to(tl.float32), axis=1)
        if PER_CHANNEL:
            acc += part
        else:
            s = tl.load(s_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            acc += part * s[None, :]
            if HAS_OFFSET:
                o = tl.load(o_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                acc += xsum[:, None] * o[None, :]
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + rn64 * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, o_ptr, out_ptr,  # out: [N, K]
    N, K,
    stride_wn, stride_sn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    PACK: tl.constexpr = 8 // BITS
    COLS: tl.constexpr = GROUP // PACK
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    cs = tl.arange(0, COLS)
    w = tl.load(w_ptr + rn64[:, None] * stride_wn + g * COLS + cs[None, :], mask=n_ok[:, None], other=0)
    if PER_CHANNEL:  # one scale column
        s = tl.load(s_ptr + rn64 * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    else:
        s = tl.load(s_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    o = tl.zeros([BLOCK_N, 1], dtype=tl.float32)
    if HAS_OFFSET:
        o = tl.load(o_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    dst = out_ptr + rn64[:, None] * stride_on + g * GROUP + cs[None, :] * PACK
    dtype = out_ptr.dtype.element_ty
    if BITS == 4:
        tl.store(dst, ((w & 0xF).to(tl.float32) * s + o).to(dtype), mask=n_ok[:, None])
        tl.store(dst + 1, ((w >> 4).to(tl.float32) * s + o).to(dtype), mask=n_ok[:, None])
    else:
        tl.store(dst, (w.to(tl.float32) * s + o).to(dtype), mask=n_ok[:, None])


# -- wrappers -----------------------------------------------------------------------------------------


def _check_weight(qweight, scales, offsets, bits: int, k: int, device) -> tuple[int, int, bool]:
    """Assert the layout above; returns (N, group, per_channel)."""
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    n = qweight.shape[0]
    check_tensor(qweight, "qweight", shape=(n, k // (8 // bits)), dtypes=(torch.uint8 if bits == 4 else torch.int8,), device=device)
    assert qweight.stride(0) == qweight.shape[1], "qweight must be contiguous"
    num_groups = scales.shape[1]
    assert num_groups >= 1 and k % num_groups == 0, f"K={k} is not a multiple of the {num_groups} scale groups"
    group = k // num_groups
    check_tensor(scales, "scales", shape=(n, num_groups), dtypes=SCALE_DTYPES, device=device)
    if offsets is not None:
        check_tensor(offsets, "offsets", shape=(n, num_groups), dtypes=(scales.dtype,), device=device)
        assert offsets.stride(0) == scales.stride(0), "offsets and scales must share a row stride"
    per_channel = num_groups == 1
    assert per_channel or group % 32 == 0, f"group size {group} must be a multiple of 32"
    assert per_channel or offsets is not None or bits == 8, "4-bit weights need offsets (their q is unsigned)"
    return n, group, per_channel


def _k_tile(k: int, group: int, per_channel: bool) -> int:
    """The K step of one dot/group: the group itself, or for per-channel scales a power of two dividing K."""
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


def quant_gemv(
    x: torch.Tensor,  # [M, K], M <= GEMV_MAX_M
    qweight: torch.Tensor,  # [N, K // 2] uint8 (4-bit) or [N, K] int8
    scales: torch.Tensor,  # [N, K // group]
    offsets: torch.Tensor | None,  # [N, K // group]
    bits: int,
    *,
    block_n: int | None = None,
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    m, n, k, tile, per_channel, out = _prepare(x, qweight, scales, offsets, bits, out)
    assert 1 <= m <= GEMV_MAX_M, f"quant_gemv takes 1..{GEMV_MAX_M} rows, got {m}; use quant_mm"
    block_m = next_pow2(m)
    if block_n is None:  # few rows per program: many programs (several per SM) keep enough loads in flight
        block_n = 16 if interpreting() else 8
    # The 4-D product tile [BLOCK_M, BLOCK_N, GROUPS, COLS] is held near 8K elements (~64 registers a thread
    # at 4 warps): at batch 1 and BLOCK_N 8 that is 512 bytes of each 4-bit row per K step.
    groups = max(1, min(next_pow2(8192 // (block_m * block_n * tile)), next_pow2(k // tile)))
    if interpreting():
        groups = min(groups, 2)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _quant_gemv_kernel[grid](
        x, qweight, scales, scales if offsets is None else offsets, out, m, n, k,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP=tile, PER_CHANNEL=per_channel, HAS_OFFSET=offsets is not None, GROUPS=groups,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=1 if interpreting() else 4,
    )  # fmt: skip
    return out


def quant_mm(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    m, n, k, tile, per_channel, out = _prepare(x, qweight, scales, offsets, bits, out)
    if m == 0:
        return out
    if block_m is None:
        block_m = 16 if interpreting() else min(128, max(16, next_pow2(m)))
    if block_n is None:  # small M is weight-bound: narrow tiles for more programs; large M: wider for reuse
        block_n = 16 if interpreting() else (32 if block_m <= 32 else 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_mm_kernel[grid](
        x, qweight, scales, scales if offsets is None else offsets, out, m, n, k,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP=tile, PER_CHANNEL=per_channel, HAS_OFFSET=offsets is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, **dot_flags(x.dtype),
        num_warps=1 if interpreting() else (8 if block_m >= 64 else 4), num_stages=1 if interpreting() else 3,
    )  # fmt: skip
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
    block_n = 16 if interpreting() else 64
    _dequantize_kernel[(triton.cdiv(n, block_n), k // tile)](
        qweight, scales, scales if offsets is None else offsets, out, n, k,
        qweight.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP=tile, PER_CHANNEL=per_channel, HAS_OFFSET=offsets is not None, BLOCK_N=block_n,
    )  # fmt: skip
    return out
