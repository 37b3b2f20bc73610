"""4-bit weights on tensor cores at small and middle batches (Gluon, mma.sync m16n8k16 in bfloat16).

`out[M, N] = x[M, K] @ dequant(w)[N, K].T` for the 4-bit formats (INT4 g64/g128, Q4_0/Q4_1), computed as
out.T = W x.T: the weight tile is the MMA's A operand (its rows are output features), x.T the B operand
(the batch padded to a multiple of 8). At batch >= 4 a CUDA-core GEMV spends a multiply-add per code and
input row; here the tensor cores do those, and a code costs half a shift and half a lop3:

    ((w >> 4s) & 0x000F000F) | 0x43004300     two bfloat16 values 128 + q (exact), codes s and s + 4 of word w

A K step of BLOCK_K = GROUP or 128 codes lies in one scale group, so with p = sum (128 + q) x (the MMA) and
X = sum x over the step (from the B tile), the step adds s p + (o - 128 s) X per output. The pairs come out
in the order (word j, shift s, half h) -> k = 8 j + s + 4 h, and the x tile is loaded in that same order, so
the weights keep quant_matmul's layout. The tile reaches the A operand's registers through shared memory
(the layout conversion Gluon inserts); x loads 16 bytes at a time in k order, is permuted in registers into
the pairs' order and converted into the B operand's layout. The next K step's words load while the current
ones are unpacked, and K splits (a float32 workspace summed in a fixed order) keep about two programs per SM
on narrow shapes such as `down`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

BLOCK_K_MAX = 128


@dataclass(frozen=True)
class GluonMmaConfig:
    block_n: int = 64  # output features per program: 16 per warp and MMA repeat
    num_warps: int = 4
    split_k: int | None = None  # K splits; None: enough for about two programs per SM (split_k())

    def label(self) -> str:
        return f"tc_{self.block_n}x{self.num_warps}" + ("" if self.split_k is None else f"_s{self.split_k}")


# Launch configurations: the engine's tuner times all of them per shape and batch bucket; the first is the
# default. 128 x 4 holds a 64-row batch tile only with spills (sm_90a: 255 registers), so batches past 32
# take 64-row tiles or 8 warps.
CONFIGS = (GluonMmaConfig(64, 4), GluonMmaConfig(128, 4), GluonMmaConfig(32, 2), GluonMmaConfig(128, 8), GluonMmaConfig(64, 4, 1))


@gluon.jit
def _quant_mm_gluon_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr, out_ptr,  # as in quant_matmul._quant_gemv_kernel (w_ptr: int32 words)
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    steps_per_split, stride_split,  # split K: program (., ., z) takes K steps [z, z + 1) * steps_per_split and
                                    # writes float32 partial sums at out_ptr + z stride_split
    GROUP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_MB: gl.constexpr, BLOCK_K: gl.constexpr,
):  # fmt: skip
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK_W: gl.constexpr = BLOCK_K // 8  # words per row per step
    TW: gl.constexpr = BLOCK_W // 4 if BLOCK_W >= 4 else 1  # threads along a row: 16 bytes each
    WL: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TW, TW], [WARPS, 1], [1, 0])  # words [N, W]
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    BL: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)

    pid_n = gl.program_id(0)
    m0 = gl.program_id(1) * BLOCK_MB
    wn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WL))
    wj = gl.arange(0, BLOCK_W, layout=gl.SliceLayout(0, WL))
    w_off = gl.minimum(wn, N - 1).to(gl.int64)[:, None] * stride_wn + wj[None, :]  # rows past N redo N - 1
    # x [BLOCK_MB, BLOCK_K] as [BLOCK_MB, BLOCK_W, 2, 4] (k = 8 j + 4 h + s, 16-byte loads), turned into the
    # pairs' order (column 8 j + 2 s + h) by a permute of in-thread dims and transposed into the B operand
    XL: gl.constexpr = gl.BlockedLayout([1, 1, 2, 4], [32 // TW, TW, 1, 1], [1, WARPS, 1, 1], [3, 2, 1, 0])
    xm = gl.arange(0, BLOCK_MB, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, XL))))
    xj = gl.arange(0, BLOCK_W, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, XL))))
    xh = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, XL))))
    xs_ = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, XL))))
    x_off = (gl.minimum(m0 + xm, M - 1).to(gl.int64)[:, None, None, None] * stride_xm  # rows past M redo M - 1
             + xj[None, :, None, None] * 8 + xh[None, None, :, None] * 4 + xs_[None, None, None, :])  # fmt: skip
    # per-row scale and offset of the step's group
    sn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    s_rows = gl.minimum(sn, N - 1).to(gl.int64) * stride_sn

    k_start = gl.program_id(2) * steps_per_split * BLOCK_K  # a multiple of BLOCK_K: 16-byte aligned loads
    k_end = gl.minimum(K, k_start + steps_per_split * BLOCK_K)
    acc = gl.zeros([BLOCK_N, BLOCK_MB], gl.float32, MMA)
    w_next = gl.load(w_ptr + (w_off + k_start // 8))
    for k0 in range(k_start, k_end, BLOCK_K):
        w = w_next  # the next step's words load while this one is unpacked and multiplied
        k_next = k0 + BLOCK_K
        k_next = gl.where(k_next < k_end, k_next, k0)  # (a select keeps the alignment a min would lose)
        w_next = gl.load(w_ptr + (w_off + k_next // 8))
        p0 = ((w >> 0) & 0x000F000F) | 0x43004300
        p1 = ((w >> 4) & 0x000F000F) | 0x43004300
        p2 = ((w >> 8) & 0x000F000F) | 0x43004300
        p3 = ((w >> 12) & 0x000F000F) | 0x43004300
        pairs = gl.reshape(gl.join(gl.join(p0, p2), gl.join(p1, p3)), [BLOCK_N, BLOCK_K // 2])  # column 4 j + s
        lo = pairs.to(gl.int16).to(gl.bfloat16, bitcast=True)
        hi = (pairs >> 16).to(gl.int16).to(gl.bfloat16, bitcast=True)
        a = gl.convert_layout(gl.reshape(gl.join(lo, hi), [BLOCK_N, BLOCK_K]), AL)  # column 8 j + 2 s + h
        x = gl.load(x_ptr + (x_off + k0))  # [BLOCK_MB, BLOCK_W, 2, 4]
        xt = gl.permute(gl.reshape(gl.permute(x, [0, 1, 3, 2]), [BLOCK_MB, BLOCK_K]), [1, 0])
        b = gl.convert_layout(xt.to(gl.bfloat16), BL)
        part = mma_v2(a, b, gl.zeros([BLOCK_N, BLOCK_MB], gl.float32, MMA))
        x_sum = gl.sum(gl.sum(gl.sum(x.to(gl.float32), axis=3), axis=2), axis=1)  # [BLOCK_MB]
        xs = gl.convert_layout(x_sum, gl.SliceLayout(0, MMA))
        g = k0 // GROUP
        s = gl.load(s_ptr + s_rows + g).to(gl.float32)
        o = gl.load(o_ptr + s_rows + g).to(gl.float32)
        acc += s[:, None] * part + (o - 128.0 * s)[:, None] * xs[None, :]
    om = m0 + gl.arange(0, BLOCK_MB, layout=gl.SliceLayout(0, MMA))
    dst = out_ptr + gl.program_id(2) * stride_split + om.to(gl.int64)[None, :] * stride_om + sn[:, None]
    gl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=(om < M)[None, :] & (sn < N)[:, None])


def step_k(group: int) -> int:
    """Codes per K step: one group, or 128 codes inside a larger one."""
    return min(group, BLOCK_K_MAX)


def supports(k: int, group: int, per_channel: bool, bits: int) -> bool:
    """4-bit codes with offsets, K steps of whole groups (group 32..128, or 128 codes inside a larger group)."""
    block_k = step_k(group)
    return bits == 4 and not per_channel and group % 32 == 0 and group % block_k == 0 and k % block_k == 0


def block_mb(m: int, config: GluonMmaConfig) -> int:
    """Batch rows per program: the batch padded to a power of two >= 8 (an MMA's N), at most 64 (32 where a
    warp would hold 32 x 64 accumulators)."""
    cap = 32 if config.block_n // config.num_warps >= 32 else 64
    return min(cap, max(8, triton.next_power_of_2(m)))


def split_k(programs: int, steps: int, sms: int) -> int:
    """K splits that bring the grid to about two programs per SM, keeping >= 8 K steps per split."""
    return max(1, min(2 * sms // max(programs, 1), steps // 8, 16))


def launch(x, words, scales, offsets, out, *, m, n, k, group, config: GluonMmaConfig, sms: int) -> None:
    """Launch on prepared tensors (quant_matmul.quant_mm_gluon checks them)."""
    launch_split_k(_quant_mm_gluon_kernel, x, words, scales, offsets, out, m=m, n=n, k=k, group=group,
                   block_k=step_k(group), config=config, sms=sms)  # fmt: skip


def launch_split_k(
    kernel, x, words, scales, offsets, out, *, m, n, k, group, block_k, config, sms: int, batch_tile: int | None = None,
    **constexprs,
) -> None:  # fmt: skip
    """Launch a weight-tile-as-A kernel (this one's arguments, a config with block_n, num_warps and split_k)
    over [N / block_n, M / batch_tile, K splits] (default: this module's block_mb). With K split, the
    programs write float32 partial sums to a workspace that one sum reduces (in a fixed order: deterministic).
    `constexprs`: the kernel's own compile-time arguments beyond this one's."""
    mb = batch_tile or block_mb(m, config)
    grid_nm = (triton.cdiv(n, config.block_n), triton.cdiv(m, mb))
    steps = k // block_k
    splits = split_k(grid_nm[0] * grid_nm[1], steps, sms) if config.split_k is None else config.split_k
    per_split = triton.cdiv(steps, splits)
    splits = triton.cdiv(steps, per_split)
    dst = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=out.device)
    kernel[(*grid_nm, splits)](
        x, words, scales, offsets, dst, m, n, k,
        x.stride(0), words.stride(0), scales.stride(0), dst.stride(-2), per_split, dst.stride(0) if splits > 1 else 0,
        GROUP=group, BLOCK_N=config.block_n, BLOCK_MB=mb, BLOCK_K=block_k, **constexprs,
        num_warps=config.num_warps,
    )  # fmt: skip
    if splits > 1:  # float32 sums, rounded once into out's dtype (torch launches a reduce and a copy: ~4 us at batch 1)
        torch.sum(dst, dim=0, out=out)
