"""RMSNorm, alone or fused with the residual add that precedes it in every decoder layer.

Semantics match `stageserve.engine.model.RMSNorm`: normalize in float32, cast back to the input dtype,
then multiply by the weight (so the product rounds once more, as in the model). The fused form also
returns the new residual `x + residual`, rounded to the input dtype exactly as `x + residual` is in the
model, and normalizes that rounded sum. One program per row; the whole row stays in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stageserve.kernels._common import FLOAT_DTYPES, cast_to, check_launch_device, check_tensor, interpreting, next_pow2


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[n, hidden] -> [n, hidden], as the model's RMSNorm."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [n, hidden]
    residual_ptr,  # [n, hidden]; read when HAS_RESIDUAL
    weight_ptr,  # [hidden]
    out_ptr,  # [n, hidden]
    residual_out_ptr,  # [n, hidden]; written when HAS_RESIDUAL (may alias residual_ptr)
    hidden,
    eps,
    stride_x, stride_r, stride_o, stride_ro,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = cast_to(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty)  # rounded as the model's add
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = cast_to(xf * rstd, x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, cast_to(out, out_ptr.dtype.element_ty), mask=ok)


def _launch(x, residual, weight, eps, out, residual_out):
    n, hidden = x.shape
    device = x.device
    check_launch_device(device)
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, device=device)
    check_tensor(weight, "weight", shape=(hidden,), dtypes=(x.dtype,), device=device)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    check_tensor(out, "out", shape=(n, hidden), dtypes=(x.dtype,), device=device)
    if residual is not None:
        check_tensor(residual, "residual", shape=(n, hidden), dtypes=(x.dtype,), device=device)
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        check_tensor(residual_out, "residual_out", shape=(n, hidden), dtypes=(x.dtype,), device=device)
    if n == 0:
        return out, residual_out
    block = next_pow2(hidden)
    num_warps = 1 if interpreting() else min(16, max(1, block // 512))
    _rms_norm_kernel[(n,)](
        x, residual if residual is not None else x, weight, out,
        residual_out if residual_out is not None else out,
        hidden, eps,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        residual_out.stride(0) if residual_out is not None else 0,
        BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=num_warps,
    )  # fmt: skip
    return out, residual_out


def rms_norm(
    x: torch.Tensor,  # [n, hidden]
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    *,
    out: torch.Tensor | None = None,  # [n, hidden]
) -> torch.Tensor:  # [n, hidden]
    return _launch(x, None, weight, eps, out, None)[0]


def fused_add_rms_norm(
    x: torch.Tensor,  # [n, hidden]
    residual: torch.Tensor,  # [n, hidden]
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    *,
    out: torch.Tensor | None = None,  # [n, hidden]
    residual_out: torch.Tensor | None = None,  # [n, hidden]; pass `residual` to update it in place
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [n, hidden], x + residual [n, hidden])
    """Each program reads its whole row before writing, so `residual_out` may be `residual` (or `x`)."""
    return _launch(x, residual, weight, eps, out, residual_out)
