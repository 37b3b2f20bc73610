"""Pure-torch references of `quant_matmul`'s kernels (dequantize, then matmul in float32), and the 4-bit packing.

Kept apart from the kernels so the engine can quantize and run the CPU path without importing Triton
(which decorates kernels at import, before the kernel tests can switch on the interpreter).
"""

from __future__ import annotations

import torch


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] of 0..15, in k order (low nibble first)."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of 0..15 -> uint8 [N, K // 2], the inverse of `unpack_int4`."""
    q = q.to(torch.uint8).reshape(q.shape[0], -1, 2)
    return q[..., 0] | (q[..., 1] << 4)


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The float32 weight [N, K] that every kernel here computes with."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    n, k = q.shape
    group = k // scales.shape[1]
    w = q.float().view(n, -1, group) * scales.float().unsqueeze(-1)
    if offsets is not None:
        w = w + offsets.float().unsqueeze(-1)
    return w.view(n, k)


def quant_matmul_ref(x: torch.Tensor, qweight, scales, offsets, bits: int) -> torch.Tensor:
    """Dequantize, then matmul in float32: [M, K] -> [M, N] in x's dtype. The CPU execution path."""
    return (x.float() @ dequantize_ref(qweight, scales, offsets, bits).t()).to(x.dtype)
