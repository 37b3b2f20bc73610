"""Dequantize-fused matmuls against dequantize-then-matmul, for every weight format, batch 1..a few.

Weights are random integers with random scales/offsets in the formats' own layouts: INT8 per channel,
Q8_0 (int8, group 32), INT4 asymmetric (group 64/128) and Q4_0/Q4_1 (4-bit, group 32).
"""

from __future__ import annotations

import pytest
import torch

from stageserve.kernels.quant_matmul import (
    codes_fit,
    dequantize,
    dequantize_ref,
    gluon_supports,
    pack_int4,
    quant_gemv,
    quant_gemv_gluon,
    quant_mm_gluon,
    mm_gluon_supports,
    quant_matmul_ref,
    quant_mm,
    quant_mm_t,
    unpack_int4,
)
from stageserve.kernels.quant_ref import tile_int4, untile_int4
from stageserve.kernels.quant_tiles import dequantize_tiles, quant_mm_tiles, quant_mm_wg_tiles, tiles_supports, wg_tiles_supports
from stageserve.kernels.testing import TOLERANCE, rel_error

# name: (bits, group or None for per-channel, has offsets, scale dtype)
FORMATS = {
    "int8": (8, None, False, torch.float32),
    "q8_0": (8, 32, False, torch.float16),
    "int4_g128": (4, 128, True, torch.float16),
    "int4_g64": (4, 64, True, torch.float16),
    "q4_1": (4, 32, True, torch.float16),
}


def make_weight(fmt: str, n: int, k: int, gen: torch.Generator, device):
    bits, group, has_offset, sdtype = FORMATS[fmt]
    groups = 1 if group is None else k // group
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=gen, device=device, dtype=torch.int32).to(torch.uint8)
        qweight = pack_int4(q)
    else:
        qweight = torch.randint(-128, 128, (n, k), generator=gen, device=device, dtype=torch.int32).to(torch.int8)
    scales = (torch.rand(n, groups, generator=gen, device=device) * 0.02 + 0.001).to(sdtype)
    offsets = (torch.randn(n, groups, generator=gen, device=device) * 0.05).to(sdtype) if has_offset else None
    return qweight, scales, offsets, bits


def test_pack_roundtrip(device, gen):
    q = torch.randint(0, 16, (5, 64), generator=gen, device=device, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert pack_int4(q).shape == (5, 32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_kernel(device, gen, fmt):
    qweight, scales, offsets, bits = make_weight(fmt, 40, 256, gen, device)
    out = dequantize(qweight, scales, offsets, bits, torch.float32)
    assert torch.allclose(out, dequantize_ref(qweight, scales, offsets, bits), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k_order", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_gemv(device, gen, fmt, m, dtype, k_order):
    n, k = 72, 256  # N not a multiple of the block: masked rows
    qweight, scales, offsets, bits = make_weight(fmt, n, k, gen, device)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    quant_gemv(x, qweight, scales, offsets, bits, k_order=k_order, out=out)
    assert rel_error(out, quant_matmul_ref(x, qweight, scales, offsets, bits)) < TOLERANCE[dtype]


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_mm(device, gen, fmt, m, dtype):
    n, k = 40, 256
    qweight, scales, offsets, bits = make_weight(fmt, n, k, gen, device)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    quant_mm(x, qweight, scales, offsets, bits, out=out)
    assert rel_error(out, quant_matmul_ref(x, qweight, scales, offsets, bits)) < TOLERANCE[dtype]


MM_T_MODES = {"joins": {}, "gather": {"gather": True}, "codes": {"codes": True}}


def mm_t_modes(fmt: str) -> list[str]:
    """The tile builders quant_mm_t offers this format: `codes` needs 4-bit codes with offsets."""
    bits, group, has_offset, _ = FORMATS[fmt]
    return [mode for mode in MM_T_MODES if mode != "codes" or codes_fit(bits, group or 0, has_offset)]


@pytest.mark.parametrize(("m", "split_k"), [(1, 1), (5, 3), (33, 1)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quant_mm_t(device, gen, fmt, m, dtype, split_k):
    """Swapped operands, every tile builder, K split (the last split shorter than the others)."""
    n, k = 40, 384
    qweight, scales, offsets, bits = make_weight(fmt, n, k, gen, device)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    ref = quant_matmul_ref(x, qweight, scales, offsets, bits)
    for mode in mm_t_modes(fmt):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
        quant_mm_t(x, qweight, scales, offsets, bits, split_k=split_k, out=out, **MM_T_MODES[mode])
        assert rel_error(out, ref) < TOLERANCE[dtype], mode


def test_wrapper_rejects_bad_layouts(device, gen):
    qweight, scales, offsets, bits = make_weight("int4_g128", 16, 256, gen, device)
    x = torch.randn(1, 256, generator=gen, device=device)
    with pytest.raises(AssertionError, match="qweight"):
        quant_gemv(x, qweight.view(torch.int8), scales, offsets, bits)
    with pytest.raises(AssertionError, match="offsets"):
        quant_gemv(x, qweight, scales, None, bits)
    with pytest.raises(AssertionError, match="x"):
        quant_mm(x[:, :128], qweight, scales, offsets, bits)
    with pytest.raises(AssertionError, match="rows"):
        quant_gemv(torch.randn(9, 256, device=device), qweight, scales, offsets, bits)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64, 256])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("nk", [(6144, 4096), (4096, 14336)])
def test_quant_kernels_full(device, gen, fmt, m, nk):
    n, k = nk
    qweight, scales, offsets, bits = make_weight(fmt, n, k, gen, device)
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    ref = quant_matmul_ref(x, qweight, scales, offsets, bits)
    if m <= 8:
        for k_order in (False, True):
            assert rel_error(quant_gemv(x, qweight, scales, offsets, bits, k_order=k_order), ref) < TOLERANCE[torch.bfloat16]
    assert rel_error(quant_mm(x, qweight, scales, offsets, bits), ref) < TOLERANCE[torch.bfloat16]
    if m >= 2:
        for mode in mm_t_modes(fmt):
            for block_n in (64, 128):
                out = quant_mm_t(x, qweight, scales, offsets, bits, block_n=block_n, **MM_T_MODES[mode])
                assert rel_error(out, ref) < TOLERANCE[torch.bfloat16], (mode, block_n)


def test_gluon_gemv_fits():
    """The Gluon GEMV takes whole 4-word chunks, each inside one group, and never runs off CUDA."""
    from stageserve.kernels.quant_gemv_gluon import supports

    assert supports(4096, 128, False, 4) and supports(576, 64, False, 4) and supports(576, 576, True, 8)
    assert not supports(48, 48, True, 4)  # K not a multiple of a 32-nibble chunk
    assert not supports(80, 40, False, 8)  # a 16-byte chunk would straddle two 40-code groups
    qweight, scales, _, bits = make_weight("int4_g128", 8, 256, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert not gluon_supports(qweight, scales, bits)  # a CPU weight


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("nk", [(6144, 4096), (4096, 14336), (1000, 576), (36, 1536)])
def test_quant_gemv_gluon(device, gen, fmt, m, nk, dtype):
    """The Gluon GEMV at full shapes, SmolLM2's odd K (576: chunks that no step divides) and fewer rows than
    one program covers; every launch configuration at the first shape in bfloat16."""
    from stageserve.kernels.quant_gemv_gluon import CONFIGS

    n, k = nk
    qweight, scales, offsets, bits = make_weight(fmt, n, k, gen, device)
    if not gluon_supports(qweight, scales, bits):
        pytest.skip(f"{fmt} K={k}: not a whole number of chunks per group")
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    ref = quant_matmul_ref(x, qweight, scales, offsets, bits)
    for config in CONFIGS if (nk == (6144, 4096) and dtype == torch.bfloat16) else CONFIGS[:1]:
        out = quant_gemv_gluon(x, qweight, scales, offsets, bits, config=config)
        assert rel_error(out, ref) < TOLERANCE[dtype], config


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, 16, 33, 64, 100, 256])
@pytest.mark.parametrize("fmt", ["int4_g128", "int4_g64", "q4_1"])
@pytest.mark.parametrize("nk", [(6144, 4096), (1000, 576)])
def test_quant_mm_gluon(device, gen, fmt, m, nk):
    """The 4-bit tensor-core kernel against the reference, every launch configuration, batches that are and
    are not multiples of its tiles, and output rows that are not."""
    from stageserve.kernels.quant_mm_gluon import CONFIGS

    n, k = nk
    qweight, scales, offsets, bits = make_weight(fmt, n, k, gen, device)
    if not mm_gluon_supports(qweight, scales, offsets, bits):
        pytest.skip(f"{fmt} K={k}: no whole groups per K step")
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    ref = quant_matmul_ref(x, qweight, scales, offsets, bits)
    for config in CONFIGS:
        assert rel_error(quant_mm_gluon(x, qweight, scales, offsets, bits, config=config), ref) < TOLERANCE[torch.bfloat16], config


# ---- the tile layout (quant_ref.tile_int4) and its tensor-core kernel (quant_tc_tiles.py) ---------------------


def test_tile_layout_roundtrip_and_fragments():
    """Each lane's word of each 16 x 16 tile holds its mma.sync A-fragment codes: nibble s + 4e is row
    g + 8 (s % 2), column 2t + 8 (s // 2) + e of the tile, lane 4g + t; untile_int4 inverts tile_int4."""
    n, k = 48, 192
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32).to(torch.uint8)
    tiles = tile_int4(pack_int4(q))
    assert tiles.shape == (n // 16, 2 * k) and tiles.dtype == torch.int32
    assert torch.equal(untile_int4(tiles, n, k), pack_int4(q))
    assert torch.equal(tile_int4(pack_int4(q), stripes_per_pass=2), tiles)  # in passes of 32 rows
    assert torch.equal(untile_int4(tiles, n, k, stripes_per_pass=2), pack_int4(q))
    words = tiles.view(n // 16, k // 64, 32, 4).to(torch.int64) & 0xFFFFFFFF  # [stripe, 64 columns, lane, tile]
    for i, j, lane in [(0, 0, 0), (2, 11, 31), (1, 5, 13), (2, 8, 6)]:
        g, t = divmod(lane, 4)
        word = words[i, j // 4, lane, j % 4].item()
        for s in range(4):
            for e in range(2):
                assert (word >> 4 * (s + 4 * e)) & 0xF == q[16 * i + g + 8 * (s % 2), 16 * j + 2 * t + 8 * (s // 2) + e]


def test_tile_kernel_unpack_order():
    """The kernel's unpacking (shift and mask per register, joins, the permute and reshape into [rows, k]),
    replayed with torch ops on one program's words: it must give 128 + q in row and k order."""
    block_n, block_k = 32, 128
    q = torch.randint(0, 16, (block_n, block_k), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(torch.uint8)
    w = tile_int4(pack_int4(q)).view(block_n // 16, block_k // 64, 8, 4, 4)  # [TI, TJ, g, t, jj] as loaded
    regs = [((w >> 4 * s) & 0x000F000F) | 0x43004300 for s in range(4)]
    join = lambda a, b: torch.stack((a, b), dim=-1)  # noqa: E731  (gl.join: a new last axis)
    regs = join(join(regs[0], regs[1]), join(regs[2], regs[3]))  # [TI, TJ, g, t, jj, r, c]
    lo, hi = (regs & 0xFFFF).to(torch.int16), (regs >> 16).to(torch.int16)
    v = join(lo, hi).view(torch.bfloat16)  # [TI, TJ, g, t, jj, r, c, e]
    a = v.permute(0, 5, 2, 1, 4, 6, 3, 7).reshape(block_n, block_k)
    assert torch.equal(a.float(), 128 + q.float())


@pytest.mark.parametrize("group,block_k", [(128, 128), (64, 64), (32, 64), (32, 128), (48, 64)])
def test_tile_kernels_dequantize_with_the_right_scale_per_row_and_word(group, block_k):
    """dequant_operand (quant_tc_tiles.py), replayed with torch ops on one program's words at its second K
    step: the scale index per row (16 i + g, and + 8 for registers r = 1) and per word (column 64 j + 16 jj,
    for groups smaller than a step), the two bf16 fmas per pair, then the operand's permute. It must give the
    dequantized weight in row and k order, up to the bfloat16 rounding of scale, offset and result."""
    block_n, k = 32, 2 * block_k + 64 * (group == 48)  # 48: groups that straddle steps
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (block_n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = (torch.rand(block_n, k // group, generator=gen) * 0.1 + 0.01).to(torch.float16)
    offsets = (torch.randn(block_n, k // group, generator=gen) * 0.1).to(torch.float16)
    k0 = block_k  # the second step
    w = tile_int4(pack_int4(q)).view(block_n // 16, k // 64, 8, 4, 4)[:, k0 // 64 : (k0 + block_k) // 64]  # [TI, TJ, g, t, jj]
    ti, tj = w.shape[:2]
    rows = (16 * torch.arange(ti)[:, None] + torch.arange(8)[None, :])[:, None, :, None, None]  # s_lo's rows
    if group % block_k == 0:
        g_idx = torch.full((1, tj, 1, 1, 4), k0 // group)
    else:
        g_idx = (k0 + 64 * torch.arange(tj)[None, :, None, None, None] + 16 * torch.arange(4)[None, None, None, None, :]) // group
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731  (_bf16_pair rounds scale and offset)
    pair = {r: (bf(scales.float()[rows + 8 * r, g_idx]), bf(offsets.float()[rows + 8 * r, g_idx])) for r in (0, 1)}
    regs = []
    for sreg in range(4):  # register s = r + 2 c: rows + 8 r
        s_, o_ = pair[sreg % 2]
        codes = [((w >> 4 * (sreg + 4 * e)) & 0xF).float() for e in (0, 1)]  # fma(128 + q, 1, -128) = q exactly
        regs.append(torch.stack([bf(c * s_ + o_) for c in codes], dim=-1))  # [TI, TJ, g, t, jj, e]
    v = torch.stack((torch.stack((regs[0], regs[1]), dim=-2), torch.stack((regs[2], regs[3]), dim=-2)), dim=-2)
    a = v.permute(0, 5, 2, 1, 4, 6, 3, 7).reshape(block_n, block_k)  # [TI, r, g, TJ, jj, c, t, e]
    ref = dequantize_ref(pack_int4(q), scales, offsets, 4)[:, k0 : k0 + block_k]
    assert torch.allclose(a, ref, rtol=2**-7, atol=2e-3)


@pytest.mark.parametrize("nk,group", [((48, 256), 64), ((32, 192), 64), ((16, 128), 128), ((48, 192), 32)])
def test_dequantize_tiles_reads_the_tile_layout_in_place(device, gen, nk, group):
    """dequantize_tiles on tile_int4's words equals dequantizing the rows layout (K = 192: a partial column
    block; 48 rows: a partial row block)."""
    n, k = nk
    q = torch.randint(0, 16, (n, k), generator=gen, device=device, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen, device=device) * 0.1 + 0.01).to(torch.float16)
    offsets = (torch.randn(n, k // group, generator=gen, device=device) * 0.1).to(torch.float16)
    tiles = tile_int4(pack_int4(q).cpu()).to(device)
    ref = dequantize_ref(pack_int4(q), scales, offsets, 4)
    for blocks in (None, (2, 2)):  # (2, 2): partial blocks of stripes and columns at these shapes
        out = dequantize_tiles(tiles, scales, offsets, torch.float32, blocks=blocks)
        assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6), blocks


def test_tile_layout_needs_whole_tiles():
    with pytest.raises(ValueError, match="N % 16"):
        tile_int4(torch.zeros(40, 64, dtype=torch.uint8))


@pytest.mark.parametrize(
    "n,k,group,fits",
    [(6144, 4096, 128, True), (4096, 14336, 64, True), (960, 576, 32, True), (960, 576, 128, False),  # 576 % 128
     (960, 576, 48, True), (960, 576, 24, False), (40, 576, 32, False)],  # a word's 16 columns in one group; N % 16
)  # fmt: skip
def test_tile_kernels_fit_groups_of_16_and_up_in_whole_steps(n, k, group, fits):
    """Groups that hold a whole K step are scaled after the MMA; smaller ones (GGUF Q4's 32) before it."""
    from stageserve.kernels.quant_tc_tiles import step_k, supports

    assert supports(n, k, group, 4, True) == fits
    assert not supports(n, k, group, 4, False) and not supports(n, k, group, 8, True)
    assert step_k(group) == (64 if group < 64 else min(group, 128))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8, 16, 33, 64, 100, 256])
@pytest.mark.parametrize("fmt", ["int4_g128", "int4_g64", "q4_1"])
@pytest.mark.parametrize("nk", [(6144, 4096), (960, 576), (4096, 14336)])
def test_quant_mm_tiles(device, gen, fmt, m, nk):
    """INT4 from the tile layout against the reference, every launch configuration, batches that are and are
    not multiples of the MMA's 8 columns, narrow (split K) and SmolLM2-sized shapes."""
    from stageserve.kernels.quant_tc_tiles import CONFIGS

    check_tile_kernel(quant_mm_tiles, CONFIGS, tiles_supports, device, gen, fmt, m, nk)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 33, 64, 100, 256])
@pytest.mark.parametrize("fmt", ["int4_g128", "int4_g64", "q4_1"])
@pytest.mark.parametrize("nk", [(6144, 4096), (960, 576), (4096, 14336)])
def test_quant_mm_wg_tiles(device, gen, fmt, m, nk):
    """INT4 from the tile layout on warpgroup MMA (Hopper) against the reference, every launch configuration:
    batches that are and are not multiples of the batch tile, narrow (split K) and SmolLM2-sized shapes."""
    from stageserve.kernels.quant_wg_tiles import CONFIGS

    check_tile_kernel(quant_mm_wg_tiles, CONFIGS, lambda *fit: wg_tiles_supports(*fit, device), device, gen, fmt, m, nk)


def check_tile_kernel(kernel, configs, fits, device, gen, fmt: str, m: int, nk: tuple[int, int]) -> None:
    """A tile-layout kernel under every launch configuration against the reference, on a bfloat16 x; skips
    where `fits(n, k, group, bits, has_offsets)` says the weight or the device does not fit."""
    n, k = nk
    qweight, scales, offsets, bits = make_weight(fmt, n, k, gen, device)
    if not fits(n, k, k // scales.shape[1], bits, True):
        pytest.skip(f"{fmt} N={n} K={k} on {torch.cuda.get_device_name(device)}: not whole tiles, or not this GPU")
    tiles = tile_int4(qweight.cpu()).to(device)
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    ref = quant_matmul_ref(x, qweight, scales, offsets, bits)
    for config in configs:
        assert rel_error(kernel(x, tiles, scales, offsets, config=config), ref) < TOLERANCE[torch.bfloat16], config