"""Quantized projections on the CPU: PyTorch's packed weight-only kernels for small batches in bfloat16.

A decode step at batch 1 on a CPU is bound by reading the weights from DRAM, so the weights should stay
packed there. PyTorch ships two weight-only kernels for CPU:

    torch._weight_int8pack_mm(x, q [N, K] int8, scales [N])                 int8, one scale per row
    aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)    4-bit, w = (q - 8) s + z per group

Both are fast for bfloat16 inputs at a few rows and slow for float32 (no vectorized path) or for many rows
(prefill), where a dense matmul wins. So a `CpuPlan` picks per call: rows <= `max_rows` in bfloat16 take
the packed kernel; everything else takes a dense matmul with the weight dequantized once (in the input's
dtype; in float32 this is the reference: exact codes times exact scales, summed in float32).

The 4-bit kernel wants scale and zero in the input's dtype, so bfloat16 rounds each group's scale (GGUF's
float16 d loses 3 of its 10 mantissa bits); `stageserve eval-quality --dtype bfloat16` measures the effect.
Formats it cannot take (Q8_0's grouped int8, N not a multiple of 16, groups other than 32..256) stay dense.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stageserve.engine.quant.formats import PackedWeight
from stageserve.kernels.quant_ref import unpack_int4

INT4_GROUPS = (32, 64, 128, 256)


def packed_kernel(p: PackedWeight, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The packed weight-only kernel for `p` with `dtype` inputs, or None where PyTorch has none that fits."""
    if dtype != torch.bfloat16:
        return None
    n, k = p.shape
    per_channel = p.scales.shape[1] == 1
    if p.bits == 8 and per_channel and p.offsets is None and hasattr(torch, "_weight_int8pack_mm"):
        q, scales = p.qweight.contiguous(), p.scales[:, 0].to(dtype).contiguous()
        return lambda x: torch._weight_int8pack_mm(x, q, scales)
    int4 = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if p.bits != 4 or p.offsets is None or p.group_size not in INT4_GROUPS or n % 16 or int4 is None:
        return None
    group = p.group_size
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(p.qweight).to(torch.int32), 1)
    except RuntimeError:  # a shape this PyTorch's packer does not take
        return None
    scales, offsets = p.scales.float(), p.offsets.float()
    zeros = offsets + 8 * scales  # q s + o == (q - 8) s + (o + 8 s)
    scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()  # [K / group, N, 2]
    return lambda x: int4(x, packed, group, scales_and_zeros)


class CpuPlan:
    """How one quantized layer computes on the CPU, per input dtype and row count (see the module doc)."""

    def __init__(self, packed: PackedWeight, mode: str, max_rows: int):
        self.packed = packed
        self.mode = mode  # "auto" (packed kernels where they fit) or "reference" (always dense float32)
        self.max_rows = max_rows
        self._dense: dict[torch.dtype, torch.Tensor] = {}
        self._kernels: dict[torch.dtype, Callable | None] = {}

    def path(self, x: torch.Tensor) -> str:
        """'packed' or 'dense' for this input."""
        if self.mode != "auto" or not 0 < x.shape[0] <= self.max_rows:
            return "dense"
        if x.dtype not in self._kernels:
            self._kernels[x.dtype] = packed_kernel(self.packed, x.dtype)
        return "dense" if self._kernels[x.dtype] is None else "packed"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N] in x's dtype
        if self.path(x) == "packed":
            return self._kernels[x.dtype](x.contiguous())
        dtype = torch.float32 if self.mode == "reference" else x.dtype
        if dtype not in self._dense:
            self._dense[dtype] = self.packed.dequantize().to(dtype)  # made once per dtype
        return (x.to(dtype) @ self._dense[dtype].t()).to(x.dtype)
