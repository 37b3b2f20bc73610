"""SiLU-and-mul: the MLP activation on the fused gate_up projection, `[n, 2 * I] -> [n, I]`.

out = silu(gate) * up with gate = x[:, :I], up = x[:, I:], computed in float32 and rounded once
(the model's `F.silu(gate) * up` rounds after the SiLU as well; in bf16 the two differ by about an ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stageserve.kernels._common import FLOAT_DTYPES, cast_to, check_launch_device, check_tensor, interpreting


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """[n, 2 * I] -> [n, I], in float32, cast back to x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [n, 2 * I]
    out_ptr,  # [n, I]
    inter,  # I
    stride_x, stride_o,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=ok, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, cast_to(out, out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(
    x: torch.Tensor,  # [n, 2 * I]
    *,
    out: torch.Tensor | None = None,  # [n, I]
) -> torch.Tensor:  # [n, I]
    n, width = x.shape
    device = x.device
    check_launch_device(device)
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, device=device)
    assert width % 2 == 0, f"gate_up width {width} is odd"
    inter = width // 2
    if out is None:
        out = torch.empty(n, inter, dtype=x.dtype, device=device)
    check_tensor(out, "out", shape=(n, inter), dtypes=(x.dtype,), device=device)
    if n == 0:
        return out
    block = 128 if interpreting() else 1024
    _silu_and_mul_kernel[(n, triton.cdiv(inter, block))](
        x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=1 if interpreting() else 4
    )
    return out
