"""The non-attention element-wise ops of a decoder layer, in two implementations.

`TorchOps` is the CPU default and the reference; `TritonOps` fuses the residual add into RMSNorm
and SiLU into the multiply, so a layer makes two fewer passes over its activations. The model takes
one of them at construction and never branches on the device itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dtype)

    @classmethod
    def add_rms_norm(
        cls, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual)."""
        residual = residual + x
        return cls.rms_norm(residual, weight, eps), residual

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """[n, 2 * I] -> [n, I]: silu(gate) * up."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonOps:
    name = "triton"

    @staticmethod
    def rms_norm(x, weight, eps):
        from stageserve.kernels.rms_norm import rms_norm

        return rms_norm(x, weight, eps)

    @staticmethod
    def add_rms_norm(x, residual, weight, eps):
        from stageserve.kernels.rms_norm import fused_add_rms_norm

        return fused_add_rms_norm(x, residual, weight, eps)

    @staticmethod
    def silu_and_mul(gate_up):
        from stageserve.kernels.activation import silu_and_mul

        return silu_and_mul(gate_up)
