"""FP8 (e4m3) activations and the small-batch FP8 product, for `Fp8Linear` on Hopper.

    quantize_rows_fp8  x [M, K] -> (x / scale as e4m3, scale [M, 1]) with scale = amax(|row|) / 448: one
                       kernel per step instead of the ~8 element-wise kernels of the torch expression.
    fp8_gemv           (xq * x_scale) @ (wq * w_scale).T for M <= 8, both operands e4m3: the same product as
                       `torch._scaled_mm` with row-wise scales, accumulated in float32, for the decode
                       batches where cuBLAS's FP8 GEMM is tuned for larger M. Each program streams its
                       BLOCK_N weight rows once, 16 bytes per load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stageserve.kernels._common import (
    FLOAT_DTYPES,
    check_launch_device,
    check_tensor,
    gemv_block_n,
    interpreting,
    next_pow2,
    num_sms,
)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
GEMV_MAX_M = 8


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + ks, mask=k0 + ks < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + ks, mask=k0 + ks < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_ptr + row * stride_q + k0 + ks, q.to(q_ptr.dtype.element_ty), mask=k0 + ks < K)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (e4m3 [M, K], float32 [M, 1]); the same values as `quantize_fp8(x, per_row=True)`."""
    m, k = x.shape
    check_launch_device(x.device)
    check_tensor(x, "x", shape=(m, k), dtypes=FLOAT_DTYPES, device=x.device)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block_k = min(next_pow2(k), 64 if interpreting() else 2048)
        _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block_k,
                                    num_warps=1 if interpreting() else 4)  # fmt: skip
    return q, scale


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, xs_ptr,  # [M, K] e4m3, [M] float32
    w_ptr, ws_ptr,  # [N, K] e4m3, [N] float32 (or one value, WS_STRIDE 0)
    out_ptr,  # [M, N]
    M, N, K,
    stride_xm, stride_wn, stride_om, WS_STRIDE,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rows = tl.arange(0, BLOCK_M)
    rm = tl.minimum(rows, M - 1)  # rows past M redo M - 1 (not stored)
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)  # element-wise until the end: no shuffles
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        w = tl.load(w_rows + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_rows + k0, mask=k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        acc += w[None, :, :] * x[:, None, :]
    xs = tl.load(xs_ptr + rm)
    ws = tl.load(ws_ptr + rn * WS_STRIDE, mask=n_ok, other=0.0)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, (tl.sum(acc, axis=2) * xs[:, None] * ws[None, :]).to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & n_ok[None, :])


def fp8_gemv(
    xq: torch.Tensor,  # [M, K] e4m3, M <= GEMV_MAX_M
    x_scale: torch.Tensor,  # [M, 1] float32
    wq: torch.Tensor,  # [N, K] e4m3
    w_scale: torch.Tensor,  # [N, 1] or [1, 1] float32
    out_dtype: torch.dtype,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:  # [M, N]
    m, k = xq.shape
    n = wq.shape[0]
    device = xq.device
    check_launch_device(device)
    assert 1 <= m <= GEMV_MAX_M, f"fp8_gemv takes 1..{GEMV_MAX_M} rows, got {m}"
    check_tensor(xq, "xq", shape=(m, k), dtypes=(FP8_DTYPE,), device=device)
    check_tensor(wq, "wq", shape=(n, k), dtypes=(FP8_DTYPE,), device=device)
    check_tensor(x_scale, "x_scale", shape=(m, 1), dtypes=(torch.float32,), device=device, last_dim_contiguous=False)
    assert x_scale.is_contiguous(), "x_scale must be contiguous"
    assert w_scale.dtype == torch.float32 and w_scale.is_contiguous() and w_scale.numel() in (1, n), "w_scale: [N, 1] or [1, 1] float32"
    out = torch.empty(m, n, dtype=out_dtype, device=device)
    if block_n is None:
        block_n = 4 if interpreting() else gemv_block_n(n, num_sms(device))
    if block_k is None:  # 16 bytes a thread: 2 KiB of weight per step at 4 warps
        block_k = 32 if interpreting() else max(16, 2048 // block_n)
    block_k = min(block_k, next_pow2(k))
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        xq, x_scale, wq, w_scale, out, m, n, k,
        xq.stride(0), wq.stride(0), out.stride(0), 0 if w_scale.numel() == 1 else 1,
        BLOCK_M=next_pow2(m), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=1 if interpreting() else 4,
    )  # fmt: skip
    return out
