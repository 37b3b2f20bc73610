"""4-bit weights on tensor cores from the tile layout (Gluon, mma.sync m16n8k16 in bfloat16), batch 1 up.

`out[M, N] = x[M, K] @ dequant(w)[N, K].T` for INT4 with offsets (group 64 or 128; GGUF Q4 blocks of 32
through the dequantize-first path at the end), computed as out.T = W x.T
like quant_mm_gluon.py, but from weights stored at load in the layout of `quant_ref.tile_int4` (Marlin's
idea): each lane's 16-byte load holds exactly the codes of its A fragments for four 16 x 16 tiles, so

    ((word >> 4s) & 0x000F000F) | 0x43004300      (s = 0..3: one shift and one lop3 per two codes)

is already the A operand's register s as two bfloat16 values 128 + q. No shared memory and no shuffles sit
between the load and the MMA (quant_mm_gluon.py's row layout goes through shared memory to reach that
layout), and a code costs about one instruction at any batch: the batch, padded to 8, is the MMA's N.

A K step of BLOCK_K = 64 or 128 codes lies in one scale group: with p = sum (128 + q) x (the MMA) and
X = sum x over the step, each output adds s p + (o - 128 s) X. Groups smaller than a step (Q4_0/Q4_1's 32)
take quant_wg_tiles.py's path instead: each pair of codes becomes s q + o in bfloat16 before the MMA
(`dequant_operand`), which accumulates straight into the output. The next step's words load while the current
ones are unpacked; K splits (a float32 workspace summed in a fixed order) fill the SMs on narrow shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from stageserve.kernels.quant_mm_gluon import GluonMmaConfig, launch_split_k
from stageserve.kernels.quant_ref import TILE_COLS, TILE_ROWS


@dataclass(frozen=True)
class TileMmaConfig(GluonMmaConfig):
    """quant_mm_gluon's launch configuration (block_n a multiple of 16 * num_warps here), named apart, plus
    how many K steps of words are loaded ahead of the one being multiplied (1 or 2)."""

    prefetch: int = 1

    def label(self) -> str:
        return "tiles_" + super().label().removeprefix("tc_") + ("" if self.prefetch == 1 else f"_p{self.prefetch}")


# Launch configurations the engine's tuner times per shape and batch bucket; the first is the default. On one
# H100 (2026-12-05, benchmarks/results/quant_tiles_sweep_h100_2026-12-05.log) 256 x 8 won batch 1 and 4 on the
# wide shapes and 128 x 4 batch 16. Batch 1 was short of bytes in flight (1.0-2.0 TB/s): the fixed splits give
# it more programs than split_k()'s >= 8 K steps, and prefetch 2 twice the loads per thread.
CONFIGS = (TileMmaConfig(128, 4), TileMmaConfig(256, 8), TileMmaConfig(64, 4), TileMmaConfig(128, 8),
           TileMmaConfig(64, 2), TileMmaConfig(128, 4, 8), TileMmaConfig(256, 8, 8), TileMmaConfig(128, 4, prefetch=2),
           TileMmaConfig(256, 8, prefetch=2), TileMmaConfig(64, 4, prefetch=2))  # fmt: skip


# The words of the tile layout as a program's registers hold them: [TI, TJ, g, t, jj] (16-row stripes, 64-column
# blocks of a K step, lane 4 g + t, four consecutive words = 16 bytes per thread). quant_wg_tiles.py shares these.
@gluon.jit
def tile_word_offsets(pid_n, N, stride_wn, TI: gl.constexpr, TJ: gl.constexpr, WL: gl.constexpr):
    """Word offsets [TI, TJ, 8, 4, 4] (WL) of program pid_n's stripes at K = 0, and the stripe indices [TI]
    (stripes past N redo the last, whose outputs are not stored)."""
    wi = gl.arange(0, TI, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, WL)))))
    wj = gl.arange(0, TJ, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, WL)))))
    wg = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, WL)))))
    wt = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, WL)))))
    ww = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, WL)))))
    stripes = gl.minimum(pid_n * TI + wi, N // 16 - 1).to(gl.int64)
    w_off = (stripes[:, None, None, None, None] * stride_wn + wj[None, :, None, None, None] * 128
             + wg[None, None, :, None, None] * 16 + wt[None, None, None, :, None] * 4 + ww[None, None, None, None, :])  # fmt: skip
    return w_off, stripes


@gluon.jit
def tile_operand(p0, p1, p2, p3, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, AL: gl.constexpr):
    """The four registers s = r + 2 c of each fragment (int32 words of bfloat16 pairs: rows g + 8 r, columns
    + 8 c, the e = 0 value low) -> the [BLOCK_N, BLOCK_K] A operand in layout AL, with no data movement."""
    regs = gl.join(gl.join(p0, p1), gl.join(p2, p3))  # [TI, TJ, g, t, jj, r, c]
    lo = regs.to(gl.int16).to(gl.bfloat16, bitcast=True)
    hi = (regs >> 16).to(gl.int16).to(gl.bfloat16, bitcast=True)
    v = gl.join(lo, hi)  # [TI, TJ, g, t, jj, r, c, e]
    # row 16 i + 8 r + g, column 64 j + 16 jj + 8 c + 2 t + e
    a = gl.reshape(gl.permute(v, [0, 5, 2, 1, 4, 6, 3, 7]), [BLOCK_N, BLOCK_K])
    return gl.convert_layout(a, AL, assert_trivial=True)


@gluon.jit
def _dequant_pairs(codes, s, o):
    """int32 words of bfloat16 pairs 128 + q (low half first) -> the pairs q * s + o: q exactly (fma with 1 and
    -128), then one rounding (fma with the row's scale and offset pairs)."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 one, m128, q; mov.b32 one, 0x3F803F80; mov.b32 m128, 0xC300C300;\n"
        "fma.rn.bf16x2 q, $1, one, m128; fma.rn.bf16x2 $0, q, $2, $3; }",
        "=r,r,r,r", [codes, s, o], dtype=gl.int32, is_pure=True, pack=1)  # fmt: skip


@gluon.jit
def _bf16_pair(v):
    """float32 -> int32 word holding the bfloat16 value twice."""
    h = v.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return h | (h << 16)


@gluon.jit
def dequant_operand(w, s_ptr, o_ptr, s_lo, stride_sn, k0, GROUP: gl.constexpr, BLOCK_N: gl.constexpr,
                    BLOCK_K: gl.constexpr, AL: gl.constexpr, WL: gl.constexpr):  # fmt: skip
    """A step's words [TI, TJ, g, t, jj] -> the A operand of weights s q + o in bfloat16, two fma.rn.bf16x2 per
    pair of codes. s_lo [TI, 1, 8, 1, 1]: offsets of the lane's rows 16 i + g in the scales (row 16 i + 8 + g is
    8 rows on). A group that holds the whole step takes one scale per row; smaller groups (a multiple of 16:
    a word's codes lie in one 16-column tile) one per row and word."""
    if GROUP % BLOCK_K == 0:
        at = s_lo + k0 // GROUP
    else:
        TJ: gl.constexpr = BLOCK_K // 64
        wj = gl.arange(0, TJ, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, WL)))))
        ww = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, WL)))))
        at = s_lo + ((k0 + 64 * wj[None, :, None, None, None] + 16 * ww[None, None, None, None, :]) // GROUP)
    s0 = _bf16_pair(gl.load(s_ptr + at).to(gl.float32))
    s1 = _bf16_pair(gl.load(s_ptr + (at + 8 * stride_sn)).to(gl.float32))
    o0 = _bf16_pair(gl.load(o_ptr + at).to(gl.float32))
    o1 = _bf16_pair(gl.load(o_ptr + (at + 8 * stride_sn)).to(gl.float32))
    # register s = r + 2 c of the fragment: rows g + 8 r, columns + 8 c; each the pair (128 + q) -> w
    p0 = _dequant_pairs((w & 0x000F000F) | 0x43004300, s0, o0)
    p1 = _dequant_pairs(((w >> 4) & 0x000F000F) | 0x43004300, s1, o1)
    p2 = _dequant_pairs(((w >> 8) & 0x000F000F) | 0x43004300, s0, o0)
    p3 = _dequant_pairs(((w >> 12) & 0x000F000F) | 0x43004300, s1, o1)
    return tile_operand(p0, p1, p2, p3, BLOCK_N, BLOCK_K, AL)


@gluon.jit
def scale_row_offsets(stripes, stride_sn, WL: gl.constexpr):
    """[TI, 1, 8, 1, 1] offsets of rows 16 i + g (lane 4 g + t) in the scales, for dequant_operand."""
    wg = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, WL)))))
    return (stripes * 16)[:, None, None, None, None] * stride_sn + (wg * stride_sn)[None, None, :, None, None]


@gluon.jit
def _tc_tiles_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,  # stride_wn: words per 16-row stripe of the tile layout (2 K)
    steps_per_split, stride_split,  # split K: program (., ., z) takes K steps [z, z + 1) * steps_per_split and
                                    # writes float32 partial sums at out_ptr + z stride_split
    GROUP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_MB: gl.constexpr, BLOCK_K: gl.constexpr,
    PREFETCH: gl.constexpr,
):  # fmt: skip
    WARPS: gl.constexpr = gl.num_warps()
    TI: gl.constexpr = BLOCK_N // 16  # 16-row tiles per program
    TJ: gl.constexpr = BLOCK_K // 64  # 64-column blocks per step (a lane's 16-byte load covers one)
    # words [TI, TJ, g, t, jj]: lane 4 g + t, four consecutive words (16 bytes) per thread
    WL: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4], [1, 1, 8, 4, 1], [WARPS, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    BL: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)

    pid_n = gl.program_id(0)
    m0 = gl.program_id(1) * BLOCK_MB
    w_off, stripes = tile_word_offsets(pid_n, N, stride_wn, TI, TJ, WL)
    # x.T [BLOCK_K, BLOCK_MB] loads straight into the B operand's registers (pairs of consecutive k): the
    # offsets are made in a blocked layout and converted once, outside the loop
    XL: gl.constexpr = gl.BlockedLayout([2, 1], [4, 8], [1, WARPS], [0, 1])
    xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, XL))
    xm = gl.arange(0, BLOCK_MB, layout=gl.SliceLayout(0, XL))
    x_off = gl.convert_layout(gl.minimum(m0 + xm, M - 1).to(gl.int64)[None, :] * stride_xm + xk[:, None], BL)
    # X = sum x over a step, for every output row, from the tensor cores: ones times x.T (they idle at small M)
    ones = gl.full([BLOCK_N, BLOCK_K], 1.0, gl.bfloat16, AL)
    sn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    s_rows = gl.minimum(sn, N - 1).to(gl.int64) * stride_sn
    if GROUP % BLOCK_K != 0:
        s_lo = scale_row_offsets(stripes, stride_sn, WL)

    k_start = gl.program_id(2) * steps_per_split * BLOCK_K
    k_end = gl.minimum(K, k_start + steps_per_split * BLOCK_K)
    acc = gl.zeros([BLOCK_N, BLOCK_MB], gl.float32, MMA)
    # the next PREFETCH steps' words load while this one is unpacked and multiplied (steps past the split's
    # end reload the last: a select keeps the alignment a min would lose); a 64-column block is 128 words
    w_next = gl.load(w_ptr + (w_off + k_start * 2))
    if PREFETCH == 2:
        w_after = gl.load(w_ptr + (w_off + gl.where(k_start + BLOCK_K < k_end, k_start + BLOCK_K, k_start) * 2))
    for k0 in range(k_start, k_end, BLOCK_K):
        w = w_next
        k_ahead = k0 + PREFETCH * BLOCK_K
        k_ahead = gl.where(k_ahead < k_end, k_ahead, k0)
        if PREFETCH == 2:
            w_next = w_after
            w_after = gl.load(w_ptr + (w_off + k_ahead * 2))
        else:
            w_next = gl.load(w_ptr + (w_off + k_ahead * 2))
        if GROUP % BLOCK_K == 0:  # the step in one group: raw codes on the tensor cores, the group's scale after
            p0 = (w & 0x000F000F) | 0x43004300  # register s = r + 2 c of the fragment: rows g + 8 r, columns + 8 c
            p1 = ((w >> 4) & 0x000F000F) | 0x43004300
            p2 = ((w >> 8) & 0x000F000F) | 0x43004300
            p3 = ((w >> 12) & 0x000F000F) | 0x43004300
            a = tile_operand(p0, p1, p2, p3, BLOCK_N, BLOCK_K, AL)
            b = gl.load(x_ptr + (x_off + k0)).to(gl.bfloat16)  # [BLOCK_K, BLOCK_MB]
            part = mma_v2(a, b, gl.zeros([BLOCK_N, BLOCK_MB], gl.float32, MMA))
            xs = mma_v2(ones, b, gl.zeros([BLOCK_N, BLOCK_MB], gl.float32, MMA))
            g = k0 // GROUP
            s = gl.load(s_ptr + s_rows + g).to(gl.float32)
            o = gl.load(o_ptr + s_rows + g).to(gl.float32)
            acc += s[:, None] * part + (o - 128.0 * s)[:, None] * xs
        else:  # smaller groups (GGUF's blocks of 32): the codes become weights before the MMA
            a = dequant_operand(w, s_ptr, o_ptr, s_lo, stride_sn, k0, GROUP, BLOCK_N, BLOCK_K, AL, WL)
            acc = mma_v2(a, gl.load(x_ptr + (x_off + k0)).to(gl.bfloat16), acc)
    om = m0 + gl.arange(0, BLOCK_MB, layout=gl.SliceLayout(0, MMA))
    dst = out_ptr + gl.program_id(2) * stride_split + om.to(gl.int64)[None, :] * stride_om + sn[:, None]
    gl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=(om < M)[None, :] & (sn < N)[:, None])


def step_k(group: int) -> int:
    """Codes per K step: one group of 64 or 128 (128 codes inside a larger one); 64 for groups under 64."""
    return min(group, 128) if group >= TILE_COLS else TILE_COLS


def supports(n: int, k: int, group: int, bits: int, has_offsets: bool) -> bool:
    """4-bit codes with offsets, N a multiple of 16, K whole steps of 64-column blocks, groups a multiple of 16
    (a word's codes in one group). A step inside one group scales after the MMA; smaller groups before it."""
    block_k = step_k(group)
    return (bits == 4 and has_offsets and n % TILE_ROWS == 0 and group % 16 == 0 and block_k % TILE_COLS == 0
            and k % block_k == 0)  # fmt: skip


def launch(x, tiles, scales, offsets, out, *, m, n, k, group, config: TileMmaConfig, sms: int) -> None:
    """Launch on prepared tensors (quant_tiles.quant_mm_tiles checks them): quant_mm_gluon's grid, batch
    tiles and K splits."""
    assert config.block_n % (16 * config.num_warps) == 0, f"{config}: block_n must be a multiple of 16 * num_warps"
    launch_split_k(_tc_tiles_kernel, x, tiles, scales, offsets, out, m=m, n=n, k=k, group=group,
                   block_k=step_k(group), config=config, sms=sms, PREFETCH=config.prefetch)  # fmt: skip
