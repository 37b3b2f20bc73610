"""rms_norm and fused_add_rms_norm against the model's RMSNorm semantics."""

from __future__ import annotations

import pytest
import torch

from stageserve.engine.model import RMSNorm
from stageserve.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from stageserve.kernels.testing import TOLERANCE, rel_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(n, hidden, dtype, device, gen):
    x = (torch.randn(n, hidden, generator=gen, device=device) * 2).to(dtype)
    residual = torch.randn(n, hidden, generator=gen, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(dtype)
    return x, residual, weight


def test_reference_is_the_model_norm(device, gen):
    x, _, weight = inputs(3, 64, torch.bfloat16, device, gen)
    norm = RMSNorm(64, eps=1e-5).to(device=device, dtype=torch.bfloat16)
    norm.weight.data.copy_(weight)
    assert torch.equal(rms_norm_ref(x, weight, 1e-5), norm(x))


@pytest.mark.parametrize("hidden", [64, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(device, gen, dtype, hidden):
    x, _, weight = inputs(5, hidden, dtype, device, gen)
    out = torch.full_like(x, float("nan"))
    rms_norm(x, weight, 1e-6, out=out)
    assert rel_error(out, rms_norm_ref(x, weight, 1e-6)) < TOLERANCE[dtype]


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(device, gen, dtype, in_place):
    x, residual, weight = inputs(7, 1000, dtype, device, gen)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    out = torch.full_like(x, float("nan"))
    res_out = residual if in_place else torch.full_like(x, float("nan"))
    got_out, got_res = fused_add_rms_norm(x, residual, weight, 1e-5, out=out, residual_out=res_out)
    assert got_out is out and got_res is res_out
    assert torch.equal(got_res, ref_res)  # one rounded add: bit-exact
    assert rel_error(got_out, ref_out) < TOLERANCE[dtype]


def test_strided_rows(device, gen):
    """Rows of a wider buffer (e.g. a slice of a fused projection): only the last dim must be contiguous."""
    wide, _, weight = inputs(4, 200, torch.float32, device, gen)
    x = wide[:, :100]
    out = rms_norm(x, weight[:100], 1e-5)
    assert rel_error(out, rms_norm_ref(x, weight[:100], 1e-5)) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [576, 2048, 4096, 5120, 8192])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_full(device, gen, dtype, hidden):
    x, residual, weight = inputs(4099, hidden, dtype, device, gen)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    out, res = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(res, ref_res)
    assert rel_error(out, ref_out) < TOLERANCE[dtype]
