"""4-bit weights on Hopper's warpgroup MMA from the tile layout (Gluon, wgmma m64nNk16 in bfloat16), batch 16 up.

`out[M, N] = x[M, K] @ dequant(w)[N, K].T` for INT4 with offsets (group 64 or 128, or GGUF Q4's 32: a scale
per word), computed as out.T = W x.T
from weights in `quant_ref.tile_int4`'s layout, like quant_tc_tiles.py. wgmma takes its A operand from
registers in the same per-warp fragments as mma.sync, so a lane's 16-byte load is still exactly its A
registers for four 16 x 16 tiles; the batch, padded to a multiple of 16, is the MMA's N (up to 256), and x.T
is its B operand in shared memory.

Where quant_tc_tiles.py multiplies the raw codes 128 + q and applies each group's scale to a float32 partial
sum per K step, here the codes become the weights themselves before the MMA, two at a time:

    q = (128 + q) * 1 - 128                    exact in bfloat16 (one fma.rn.bf16x2)
    w = q * s + o                              rounded once (one fma.rn.bf16x2)

so the MMA accumulates straight into the output tile: one accumulator of BLOCK_MB columns per 16 rows and
no per-step float32 work, which is what lets a wide batch tile fit in registers. The scale and offset are
rounded to bfloat16 first (within 2^-9 of each); the weight then matches a dequantize to bfloat16 followed by
a GEMM. x tiles arrive by cp.async in two shared-memory buffers: step j + 1's copy lands while step j is
unpacked and multiplied. Each step waits for its own MMA before the next unpack, because wgmma reads its A
registers while it runs; with one MMA left in flight the results were wrong on an H200 whenever the MMA
outlasted the next unpack (2026-12-06). A second warpgroup, or a second program on the SM, overlaps them
instead. Keeping the previous step's A registers alive across the wait (and so one MMA in flight) is left
to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from stageserve.kernels.quant_mm_gluon import launch_split_k
from stageserve.kernels.quant_tc_tiles import (  # noqa: F401 (step_k, supports: the same fit)
    dequant_operand,
    scale_row_offsets,
    step_k,
    supports,
    tile_word_offsets,
)

# cp.async global -> shared: `async_load` from Triton 3.7 (the device image has 3.6, which names it otherwise)
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # (3.6's name)


@dataclass(frozen=True)
class WgmmaConfig:
    block_n: int = 128  # output features per program: 64 per warpgroup and repeat
    num_warps: int = 4  # a multiple of 4 (whole warpgroups)
    block_mb: int = 128  # largest batch tile (columns of the accumulator); smaller batches take the next power of 2
    split_k: int | None = None  # K splits; None: quant_mm_gluon.split_k()'s choice

    def label(self) -> str:
        return f"wg_{self.block_n}x{self.num_warps}_m{self.block_mb}" + ("" if self.split_k is None else f"_s{self.split_k}")


# Launch configurations the engine's tuner times per shape and batch bucket; the first is the default: on one
# H200 (2026-12-06, benchmarks/results/quant_wg_fixed_sweep_h200_2026-12-06.log) 64 x 4 with 128 columns won
# every shape at batch 256 and most at 64, 128 x 8 the batch-16 ones. Accumulator registers per thread are
# block_n * batch tile / (32 * num_warps): 64 at 64 x 4 with 128 columns.
# 64 x 4 with a 256-column tile spills (sm_90a, 255 registers): 256 columns take two warpgroups.
CONFIGS = (WgmmaConfig(64, 4, 128), WgmmaConfig(128, 8, 128), WgmmaConfig(128, 8, 256), WgmmaConfig(64, 4, 64),
           WgmmaConfig(128, 4, 64))  # fmt: skip


@gluon.jit
def _wg_tiles_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,  # stride_wn: words per 16-row stripe of the tile layout (2 K)
    steps_per_split, stride_split,  # split K, as in quant_tc_tiles.py
    GROUP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_MB: gl.constexpr, BLOCK_K: gl.constexpr,
):  # fmt: skip
    WARPS: gl.constexpr = gl.num_warps()
    TI: gl.constexpr = BLOCK_N // 16  # 16-row stripes per program
    TJ: gl.constexpr = BLOCK_K // 64  # 64-column blocks per step (a lane's 16-byte load covers one)
    # words [TI, TJ, g, t, jj]: lane 4 g + t, four consecutive words (16 bytes) per thread
    WL: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4], [1, 1, 8, 4, 1], [WARPS, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_MB, 16])
    AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_MB, BLOCK_K], gl.bfloat16)
    TK: gl.constexpr = BLOCK_K // 8  # threads along a row of x: 16 bytes of bfloat16 each (cp.async)
    XL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TK, TK], [WARPS, 1], [1, 0])

    pid_n = gl.program_id(0)
    m0 = gl.program_id(1) * BLOCK_MB
    w_off, stripes = tile_word_offsets(pid_n, N, stride_wn, TI, TJ, WL)
    s_lo = scale_row_offsets(stripes, stride_sn, WL)  # a lane's rows 16 i + g (and 16 i + 8 + g) in the scales
    xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, XL))
    xm = gl.arange(0, BLOCK_MB, layout=gl.SliceLayout(1, XL))
    x_off = gl.minimum(m0 + xm, M - 1).to(gl.int64)[:, None] * stride_xm + xk[None, :]  # rows past M redo M - 1
    # x tiles: step j's MMA reads buffer j % 2 while step j + 1's copy lands in the other; the barrier at the
    # top of step j (every warp past its wait for step j - 1's MMA) frees buffer (j + 1) % 2
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_MB, BLOCK_K], XS)

    k_start = gl.program_id(2) * steps_per_split * BLOCK_K
    k_end = gl.minimum(K, k_start + steps_per_split * BLOCK_K)
    acc = gl.zeros([BLOCK_N, BLOCK_MB], gl.float32, MMA)
    w_next = gl.load(w_ptr + (w_off + k_start * 2))  # a 64-column block of a stripe is 128 words
    _async_load(x_smem.index(0), x_ptr + (x_off + k_start))
    async_copy.commit_group()
    step = 0
    for k0 in range(k_start, k_end, BLOCK_K):
        w = w_next  # the next step's words and x tile load while this one is unpacked and multiplied
        k_next = k0 + BLOCK_K
        k_next = gl.where(k_next < k_end, k_next, k0)  # (a select keeps the alignment a min would lose)
        w_next = gl.load(w_ptr + (w_off + k_next * 2))
        _cta_barrier()
        _async_load(x_smem.index((step + 1) % 2), x_ptr + (x_off + k_next))
        async_copy.commit_group()
        a = dequant_operand(w, s_ptr, o_ptr, s_lo, stride_sn, k0, GROUP, BLOCK_N, BLOCK_K, AL, WL)
        async_copy.wait_group(1)  # this step's x tile (this thread's part of it)
        fence_async_shared()
        _cta_barrier()  # (every thread's part)
        acc = warpgroup_mma(a, x_smem.index(step % 2).permute((1, 0)), acc, is_async=True)
        # wait for this step's MMA before the next step's unpacking reuses registers: wgmma reads its A operand
        # from registers while it runs (leaving one in flight gave wrong results on an H200 whenever the MMA
        # outlasted the next unpack); a second warpgroup, or a second program on the SM, overlaps instead
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        step += 1
    async_copy.wait_group(0)
    sn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    om = m0 + gl.arange(0, BLOCK_MB, layout=gl.SliceLayout(0, MMA))
    dst = out_ptr + gl.program_id(2) * stride_split + om.to(gl.int64)[None, :] * stride_om + sn[:, None]
    gl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=(om < M)[None, :] & (sn < N)[:, None])


def block_mb(m: int, config: WgmmaConfig) -> int:
    """Batch rows per program: the batch padded to a power of two >= 16, at most the config's tile."""
    return min(config.block_mb, max(16, 1 << (m - 1).bit_length()))


def launch(x, tiles, scales, offsets, out, *, m, n, k, group, config: WgmmaConfig, sms: int) -> None:
    """Launch on prepared tensors (quant_tiles.quant_mm_wg_tiles checks them)."""
    assert config.num_warps % 4 == 0 and config.block_n % (16 * config.num_warps) == 0, f"{config}: bad shape"
    launch_split_k(_wg_tiles_kernel, x, tiles, scales, offsets, out, m=m, n=n, k=k, group=group,
                   block_k=step_k(group), config=config, sms=sms, batch_tile=block_mb(m, config))  # fmt: skip
