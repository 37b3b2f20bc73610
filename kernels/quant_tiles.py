"""Entry points of the 4-bit tile layout (`quant_ref.tile_int4`): weights re-laid at load so that each lane's
16-byte load is its tensor-core fragments.

    quant_mm_tiles      mma.sync from the layout, any batch (kernels/quant_tc_tiles.py)
    quant_mm_wg_tiles   Hopper's warpgroup MMA from the layout, batch 16 up (kernels/quant_wg_tiles.py)
    dequantize_tiles    the float weight, read from the layout in place: dequantize + GEMM where neither fits

Scales and offsets are as in quant_matmul (`[N, K // group]`, INT4 groups of 64/128 or GGUF Q4 blocks of 32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stageserve.kernels._common import (
    FLOAT_DTYPES,
    check_launch_device,
    check_tensor,
    gluon_capable,
    interpreting,
    num_sms,
    wgmma_capable,
)
from stageserve.kernels.quant_matmul import check_groups


@triton.jit
def _dequantize_tiles_kernel(
    t_ptr, s_ptr, o_ptr, out_ptr,  # t: int32 [N // 16, 2 K] in quant_ref.tile_int4's layout; out: [N, K]
    N, K,
    stride_t, stride_sn, stride_on,
    GROUP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr,  # stripes, 64-column blocks per program
):  # fmt: skip
    """Words are read once, coalesced: a stripe's 64-column block is 128 consecutive words [g, t, jj] (lane
    4 g + t, tile jj), and nibble (r + 2 c) + 4 e of a word is row 16 i + 8 r + g, column 64 J + 16 jj + 8 c +
    2 t + e. The codes are put in row order in registers (a permute Triton routes through shared memory), so
    the stores are row-contiguous too."""
    i = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    lane_word = tl.arange(0, 128)  # (4 g + t) * 4 + jj
    ok = (i < N // 16)[:, None, None] & (j < K // 64)[None, :, None]
    words = tl.load(t_ptr + i.to(tl.int64)[:, None, None] * stride_t + (j * 128)[None, :, None] + lane_word[None, None, :], mask=ok, other=0)
    words = tl.reshape(words, (BLOCK_S, BLOCK_J, 8, 4, 4))  # [i, J, g, t, jj]
    r = tl.arange(0, 2)
    shift = 4 * (r[:, None, None] + 2 * r[None, :, None] + 4 * r[None, None, :])  # nibble (r + 2 c) + 4 e: [r, c, e]
    q = (words[:, :, :, :, :, None, None, None] >> shift[None, None, None, None, None, :, :, :]) & 0xF
    q = tl.reshape(tl.permute(q, (0, 5, 2, 1, 4, 6, 3, 7)), (BLOCK_S * 16, BLOCK_J * 64))  # [i r g, J jj c t e]
    rows = tl.program_id(0) * BLOCK_S * 16 + tl.arange(0, BLOCK_S * 16)
    cols = tl.program_id(1) * BLOCK_J * 64 + tl.arange(0, BLOCK_J * 64)
    ok = (rows < N)[:, None] & (cols < K)[None, :]
    at = rows.to(tl.int64)[:, None] * stride_sn + (cols // GROUP)[None, :]
    s = tl.load(s_ptr + at, mask=ok, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + at, mask=ok, other=0.0).to(tl.float32)
    dst = out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :]
    tl.store(dst, (q.to(tl.float32) * s + o).to(out_ptr.dtype.element_ty), mask=ok)


def quant_mm_tiles(
    x: torch.Tensor,  # [M, K]
    tiles: torch.Tensor,  # int32 [N // 16, 2 K]: quant_ref.tile_int4 of the 4-bit codes
    scales: torch.Tensor,  # [N, K // group]
    offsets: torch.Tensor,  # [N, K // group]
    *,
    config=None,  # a quant_tc_tiles.TileMmaConfig; default its CONFIGS[0]
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    """INT4 with offsets on tensor cores from the tile layout (kernels/quant_tc_tiles.py), any batch. CUDA
    only; `tiles_supports` says whether a weight fits."""
    from stageserve.kernels import quant_tc_tiles as qt

    assert gluon_capable(x.device), "quant_mm_tiles needs a CUDA device of compute capability >= 8.0"
    return _launch_tiles(qt, "quant_mm_tiles", FLOAT_DTYPES, x, tiles, scales, offsets, config, out)


def quant_mm_wg_tiles(
    x: torch.Tensor,  # [M, K] bfloat16
    tiles: torch.Tensor,  # int32 [N // 16, 2 K]: quant_ref.tile_int4 of the 4-bit codes
    scales: torch.Tensor,  # [N, K // group]
    offsets: torch.Tensor,  # [N, K // group]
    *,
    config=None,  # a quant_wg_tiles.WgmmaConfig; default its CONFIGS[0]
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    """INT4 with offsets from the tile layout on Hopper's warpgroup MMA (kernels/quant_wg_tiles.py): the
    larger batches. CUDA compute capability 9.0 and bfloat16 x only; `wg_tiles_supports` says what fits."""
    from stageserve.kernels import quant_wg_tiles as qw

    assert wgmma_capable(x.device), "quant_mm_wg_tiles needs a Hopper GPU (compute capability 9.0)"
    if x.data_ptr() % 16 or x.stride(0) % 8 or x.stride(1) != 1:  # its x tiles move by 16-byte cp.async
        x = x.clone(memory_format=torch.contiguous_format)
    return _launch_tiles(qw, "quant_mm_wg_tiles", (torch.bfloat16,), x, tiles, scales, offsets, config, out)


def _launch_tiles(module, name: str, x_dtypes, x, tiles, scales, offsets, config, out) -> torch.Tensor:
    """Check a tile-layout kernel's operands, then run `module.launch` (module.CONFIGS[0] by default)."""
    device = x.device
    n, k, group = _check_tiled_weight(name, tiles, scales, offsets, device)
    m = x.shape[0]
    check_tensor(x, "x", shape=(m, k), dtypes=x_dtypes, device=device)
    assert module.supports(n, k, group, 4, True), f"{name}: N={n}, K={k}, group {group} does not fit"
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=device)
    check_tensor(out, "out", shape=(m, n), dtypes=(x.dtype,), device=device)
    if m:
        module.launch(x, tiles, scales, offsets, out, m=m, n=n, k=k, group=group, config=config or module.CONFIGS[0],
                      sms=num_sms(device))  # fmt: skip
    return out


def _check_tiled_weight(name: str, tiles, scales, offsets, device) -> tuple[int, int, int]:
    """Assert a weight in the tile layout (int32 [N // 16, 2 K], with offsets) on a device that can launch;
    returns (N, K, group)."""
    check_launch_device(device)
    n, k = tiles.shape[0] * 16, tiles.shape[1] // 2
    check_tensor(tiles, "tiles", shape=(n // 16, 2 * k), dtypes=(torch.int32,), device=device)
    assert offsets is not None, f"{name}: 4-bit weights need offsets (their q is unsigned)"
    return n, k, check_groups(scales, offsets, n, k, device)


def tiles_supports(n: int, k: int, group: int, bits: int, has_offsets: bool) -> bool:
    """Whether quant_mm_tiles can run such a weight (and this Triton has Gluon: 3.4 on)."""
    try:
        from stageserve.kernels import quant_tc_tiles as qt
    except ImportError:
        return False
    return qt.supports(n, k, group, bits, has_offsets)


def wg_tiles_supports(n: int, k: int, group: int, bits: int, has_offsets: bool, device: torch.device) -> bool:
    """Whether quant_mm_wg_tiles can run such a weight on `device` (a Hopper GPU, a Triton with Gluon)."""
    return wgmma_capable(device) and tiles_supports(n, k, group, bits, has_offsets)


def dequantize_tiles(
    tiles: torch.Tensor,  # int32 [N // 16, 2 K]: quant_ref.tile_int4 of 4-bit codes
    scales: torch.Tensor,  # [N, K // group]
    offsets: torch.Tensor,  # [N, K // group]
    dtype: torch.dtype,
    *, out: torch.Tensor | None = None,  # [N, K]
    blocks: tuple[int, int] | None = None,  # (stripes, 64-column blocks) per program; default by device
) -> torch.Tensor:  # [N, K] in dtype
    """`dequantize` for a weight in the tile layout, read in place (no untiling first)."""
    device = tiles.device
    n, k, group = _check_tiled_weight("dequantize_tiles", tiles, scales, offsets, device)
    assert dtype in FLOAT_DTYPES
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=device)
    check_tensor(out, "out", shape=(n, k), dtypes=(dtype,), device=device)
    block_s, block_j = blocks or ((1, 1) if interpreting() else (2, 2))
    _dequantize_tiles_kernel[(triton.cdiv(n // 16, block_s), triton.cdiv(k // 64, block_j))](
        tiles, scales, offsets, out, n, k, tiles.stride(0), scales.stride(0), out.stride(0),
        GROUP=group, BLOCK_S=block_s, BLOCK_J=block_j,
    )  # fmt: skip
    return out
