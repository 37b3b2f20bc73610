"""FP8 activation quantization and the small-batch FP8 GEMV against the torch expressions they replace."""

from __future__ import annotations

import pytest
import torch

from stageserve.engine.quant.formats import quantize_fp8
from stageserve.kernels._common import interpreting
from stageserve.kernels.fp8 import fp8_gemv, quantize_rows_fp8
from stageserve.kernels.testing import rel_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mk", [(1, 64), (3, 200), (5, 4096)])
def test_quantize_rows_matches_torch(device, gen, dtype, mk):
    x = (torch.randn(*mk, generator=gen, device=device) * 3).to(dtype)
    x[0, 0] = 0.0
    q, scale = quantize_rows_fp8(x)
    q_ref, scale_ref = quantize_fp8(x, per_row=True)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (mk[0], 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    if interpreting():  # Triton 3.9's interpreter rounds to e4m3 its own way (124.3 -> 64, 83.99 -> 88):
        # each code within one binade of torch's (or both within the subnormals)
        a, b = q.float(), q_ref.float()
        assert bool(((a - b).abs() <= b.abs().clamp_min(2**-6)).all())
    else:  # the same codes, up to the last bit of x / scale before the cast at rare ties
        assert (q.float() == q_ref.float()).float().mean() > 0.999

def test_quantize_rows_zero_row(device):
    q, scale = quantize_rows_fp8(torch.zeros(2, 32, device=device))
    assert torch.all(scale > 0) and torch.all(q.float() == 0)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_gemv(device, gen, m, per_row):
    n, k = 72, 256  # N not a multiple of the block: masked rows
    w = torch.randn(n, k, generator=gen, device=device) * 0.05
    wq, ws = quantize_fp8(w, per_row)
    xq, xs = quantize_fp8(torch.randn(m, k, generator=gen, device=device), True)
    ref = (xq.float() * xs) @ (wq.float() * ws).t()
    out = fp8_gemv(xq, xs, wq, ws.contiguous(), torch.float32)
    assert rel_error(out, ref) < 1e-5


def test_fp8_gemv_rejects_bad_inputs(device, gen):
    wq, ws = quantize_fp8(torch.randn(16, 64, device=device), True)
    xq, xs = quantize_fp8(torch.randn(9, 64, device=device), True)
    with pytest.raises(AssertionError, match="rows"):
        fp8_gemv(xq, xs, wq, ws, torch.float32)
    with pytest.raises(AssertionError, match="wq"):
        fp8_gemv(xq[:1], xs[:1], wq[:, :32].contiguous(), ws, torch.float32)
