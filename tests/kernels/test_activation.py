"""silu_and_mul against float32 torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stageserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from stageserve.kernels.testing import TOLERANCE, rel_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_reference_is_the_model_mlp(device, gen):
    x = torch.randn(3, 40, generator=gen, device=device)
    gate, up = x.split(20, dim=-1)
    assert torch.allclose(silu_and_mul_ref(x), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inter", [128, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(device, gen, dtype, inter):
    x = (torch.randn(5, 2 * inter, generator=gen, device=device) * 3).to(dtype)
    out = torch.full((5, inter), float("nan"), dtype=dtype, device=device)
    silu_and_mul(x, out=out)
    assert rel_error(out, silu_and_mul_ref(x)) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [1536, 11008, 14336])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_full(device, gen, dtype, inter):
    x = (torch.randn(2051, 2 * inter, generator=gen, device=device) * 3).to(dtype)
    assert rel_error(silu_and_mul(x), silu_and_mul_ref(x)) < TOLERANCE[dtype]
