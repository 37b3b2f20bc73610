"""The quantized GEMV with explicit register layouts (Gluon), for decode batches on the GPU.

Same weights and result as `quant_matmul.quant_gemv` (`out[M, N] = x[M, K] @ dequant(w)[N, K].T`, the layout
in quant_matmul's docstring), but every tensor's layout is written out instead of left to Triton's passes,
which give the `tl` kernel one 32-bit word per thread and load (kernels/NOTES.md). Here each thread owns
chunks of VEC = 4 consecutive words of a row (a 16-byte load: 32 nibbles or 16 bytes of codes) and the
x values those codes meet (VEC * PER contiguous elements, 16-byte loads, shared by the thread's rows):

    L5 = [BLOCK_M, BLOCK_N, BLOCK_C, VEC, PER]   inputs x rows, weight rows, chunks, words, codes per word
         size_per_thread  [BLOCK_M, RPT, 1, VEC, PER]    a thread: all M, RPT rows, one chunk per repeat
         threads_per_warp [1, TN, TC, 1, 1]              TC threads cover TC * 16 contiguous bytes of a row
         warps_per_cta    [1, num_warps, 1, 1, 1]

A code becomes a float with one shift and one lop3: masked into the top of the mantissa of 1.0f, it reads
f = 1 + u / 2^BITS (u the unsigned code). Per chunk (one group: GROUP is a multiple of the chunk) the thread
sums S = sum f x and X = sum x over the chunk's codes, and since u = 2^BITS (f - 1),

    sum q x = 2^BITS (S - X) + Q0 X        (q = u + Q0: Q0 = 0 for 4-bit codes, -128 for signed bytes)

so a code costs the shift, the lop3 and one FMA; scales and offsets apply once per chunk (or per row, for
per-channel scales). The one cross-thread reduction is at the end.

Gluon has no interpreter: CPU runs take quant_matmul's `tl` kernels, and tests/kernels/test_quant_matmul.py
checks this one against the dequantize-then-matmul reference on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

VEC_WORDS = 4  # words per thread per chunk: one 16-byte load
VEC = gl.constexpr(VEC_WORDS)
MAX_M = 4  # x rows held in registers; each weight chunk is unpacked once for all of them


@dataclass(frozen=True)
class GluonGemvConfig:
    rows_per_thread: int = 2  # RPT
    threads_n: int = 4  # TN; TC = 32 // TN threads share a row
    chunks_per_step: int = 16  # BLOCK_C: chunks of a row per K step (a multiple of TC)
    num_warps: int = 4

    def block_n(self) -> int:
        return self.rows_per_thread * self.threads_n * self.num_warps

    def label(self) -> str:
        return f"gluon_{self.rows_per_thread}x{self.threads_n}x{self.num_warps}_c{self.chunks_per_step}"


# Launch configurations: the first TUNED are what the engine's tuner times per shape (services/engine/quant/
# linear.py); benchmarks/quant.py's sweep times them all. Ordered by the 2026-12-04 H200 sweeps at batch 1
# (benchmarks/results/quant_gluon_{sweep,decode}_h200_2026-12-04.json): 16 or 32 threads covering 256-512
# contiguous bytes of a row per load instruction, and 2-4 chunks (32-64 bytes of codes) in flight per thread.
CONFIGS = (
    GluonGemvConfig(4, 2, 32, 4),
    GluonGemvConfig(2, 1, 64, 4),
    GluonGemvConfig(2, 1, 128, 4),
    GluonGemvConfig(2, 2, 32, 4),
    GluonGemvConfig(1, 1, 64, 4),
    GluonGemvConfig(4, 4, 8, 4),
    GluonGemvConfig(2, 4, 16, 4),
    GluonGemvConfig(2, 2, 64, 4),
    GluonGemvConfig(1, 2, 64, 4),
    GluonGemvConfig(1, 1, 128, 4),
    GluonGemvConfig(1, 1, 64, 2),
    GluonGemvConfig(1, 1, 128, 2),
    GluonGemvConfig(2, 2, 32, 8),
    GluonGemvConfig(1, 2, 32, 4),
)
TUNED = 4


@gluon.jit
def _quant_gemv_gluon_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr, out_ptr,  # as in quant_matmul._quant_gemv_kernel (w_ptr: int32 words)
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    code_mask,  # ((1 << BITS) - 1) << (23 - BITS), passed at run time: held in one register, where a constant
                # gets rematerialized before every lop3 that takes it with the exponent bits
    BITS: gl.constexpr, GROUP: gl.constexpr, PER_CHANNEL: gl.constexpr, HAS_OFFSET: gl.constexpr,
    BLOCK_M: gl.constexpr, RPT: gl.constexpr, TN: gl.constexpr, BLOCK_C: gl.constexpr,
    EVEN_C: gl.constexpr,  # BLOCK_C divides the chunks of a row
):  # fmt: skip
    PER: gl.constexpr = 32 // BITS
    CHUNK: gl.constexpr = VEC * PER  # codes per chunk
    TC: gl.constexpr = 32 // TN
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = RPT * TN * WARPS
    L5: gl.constexpr = gl.BlockedLayout([BLOCK_M, RPT, 1, VEC, PER], [1, TN, TC, 1, 1], [1, WARPS, 1, 1, 1], [4, 3, 2, 1, 0])
    L4: gl.constexpr = gl.SliceLayout(4, L5)  # [M, N, C, VEC]: one code of every word
    XL: gl.constexpr = gl.SliceLayout(1, L5)  # x tile [M, C, VEC, PER]
    WL: gl.constexpr = gl.SliceLayout(0, L4)  # words [N, C, VEC]
    AL: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, L5))  # per chunk sums [M, N, C]
    SL: gl.constexpr = gl.SliceLayout(0, AL)  # scales [N, C]
    OL: gl.constexpr = gl.SliceLayout(2, AL)  # result [M, N]

    pid_n = gl.program_id(0)
    m0 = gl.program_id(1) * BLOCK_M
    num_chunks = K // CHUNK

    # words [N, C, VEC]: row n, chunk c, word v -> n * stride_wn + c * VEC + v
    wn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, WL)))
    wc = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, gl.SliceLayout(2, WL)))
    wv = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, WL)))
    w_rows = gl.minimum(wn, N - 1).to(gl.int64)  # rows past N re-read row N - 1 (not stored): no load masks
    w_off = w_rows[:, None, None] * stride_wn + (wc[None, :, None] * VEC + wv[None, None, :])
    # code p of a word sits at bits BITS * p: the first half of the codes are shifted left from the word, the
    # second half from its top half (w >> 16), to the top of the mantissa
    HALF: gl.constexpr = PER // 2
    # x [M, C, VEC, PER]: input row m, element (c * VEC + v) * PER + p
    xm = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, XL))))
    xc = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, XL))))
    xv = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, XL))))
    xp = gl.arange(0, PER, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, XL))))
    xp4 = xp[None, None, None, :]
    x_rows = gl.minimum(m0 + xm, M - 1).to(gl.int64)  # rows past M redo M - 1 (not stored)
    x_off = (x_rows[:, None, None, None] * stride_xm + xc[None, :, None, None] * CHUNK
             + xv[None, None, :, None] * PER + xp4)  # fmt: skip
    # scales [N, C]
    sn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, SL))
    sc = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, SL))
    s_rows = gl.minimum(pid_n * BLOCK_N + sn, N - 1).to(gl.int64) * stride_sn

    acc = gl.zeros([BLOCK_M, BLOCK_N, BLOCK_C], gl.float32, AL)
    for c0 in range(0, num_chunks, BLOCK_C):
        if EVEN_C:  # no masks: predicated loads would also need their registers zeroed first
            w = gl.load(w_ptr + (w_off + c0 * VEC))
            x = gl.load(x_ptr + (x_off + c0 * CHUNK))
        else:
            w = gl.load(w_ptr + (w_off + c0 * VEC), mask=((c0 + wc) < num_chunks)[None, :, None], other=0)
            x = gl.load(x_ptr + (x_off + c0 * CHUNK), mask=((c0 + xc) < num_chunks)[None, :, None, None], other=0.0)
        xi = x.to(gl.float32).to(gl.int32, bitcast=True)
        hi = w >> 16
        s_fx = gl.zeros([BLOCK_M, BLOCK_N, BLOCK_C, VEC], gl.float32, L4)
        s_x = gl.zeros([BLOCK_M, BLOCK_C, VEC], gl.float32, gl.SliceLayout(1, L4))
        for p in gl.static_range(PER):
            # x_p [M, C, VEC]: picks code p's inputs out of the thread's registers (the select folds away)
            x_p = gl.sum(gl.where(xp4 == p, xi, 0), axis=3).to(gl.float32, bitcast=True)
            x_p = gl.convert_layout(x_p, gl.SliceLayout(1, L4))  # same registers, another name for the layout
            if p < HALF:
                u = (w << (23 - BITS - BITS * p)) & code_mask
            else:
                u = (hi << (23 - BITS - BITS * (p - HALF))) & code_mask
            if BITS == 4:
                f = (u | 0x3F800000).to(gl.float32, bitcast=True)
            else:  # flipping the byte's sign bit (now bit 22) gives u = q + 128
                f = (u ^ (0x3F800000 | (1 << 22))).to(gl.float32, bitcast=True)
            s_fx += f[None, :, :, :] * x_p[:, None, :, :]
            s_x += x_p
        s_fx = gl.sum(s_fx, axis=3)  # [M, N, C]
        s_x = gl.sum(s_x[:, None, :, :], axis=3)  # [M, 1, C]
        if BITS == 4:
            q_dot = (s_fx - s_x) * 16.0
        else:
            q_dot = (s_fx - s_x) * 256.0 - 128.0 * s_x
        if PER_CHANNEL:
            acc += q_dot
        else:
            g = ((c0 + sc) * CHUNK) // GROUP
            g_ok = ((c0 + sc) < num_chunks) | EVEN_C
            s_at = s_rows[:, None] + g[None, :]
            s = gl.load(s_ptr + s_at, mask=g_ok[None, :], other=0.0).to(gl.float32)
            acc += q_dot * s[None, :, :]
            if HAS_OFFSET:
                o = gl.load(o_ptr + s_at, mask=g_ok[None, :], other=0.0).to(gl.float32)
                acc += s_x * o[None, :, :]
    out = gl.sum(acc, axis=2)  # [M, N]
    on = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, OL))
    if PER_CHANNEL:
        out = out * gl.load(s_ptr + on.to(gl.int64) * stride_sn, mask=on < N, other=0.0).to(gl.float32)[None, :]
    om = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, OL))
    dst = out_ptr + om.to(gl.int64)[:, None] * stride_om + on[None, :]
    gl.store(dst, out.to(out_ptr.dtype.element_ty), mask=(om < M)[:, None] & (on < N)[None, :])


def supports(k: int, group: int, per_channel: bool, bits: int) -> bool:
    """Whether the kernel's chunks fit the weight: K a multiple of a chunk, and each chunk in one group."""
    chunk = VEC_WORDS * 32 // bits
    return k % chunk == 0 and (per_channel or group % chunk == 0)


def launch(x, words, scales, offsets, out, *, m, n, k, group, per_channel, bits, config: GluonGemvConfig) -> None:
    """Launch on prepared tensors (quant_matmul.quant_gemv_gluon checks them)."""
    block_m = 1 if m == 1 else min(MAX_M, triton.next_power_of_2(m))
    tc = 32 // config.threads_n
    assert config.chunks_per_step % tc == 0, f"{config}: chunks_per_step must be a multiple of {tc}"
    grid = (triton.cdiv(n, config.block_n()), triton.cdiv(m, block_m))
    _quant_gemv_gluon_kernel[grid](
        x, words, scales, scales if offsets is None else offsets, out, m, n, k,
        x.stride(0), words.stride(0), scales.stride(0), out.stride(0), ((1 << bits) - 1) << (23 - bits),
        BITS=bits, GROUP=group, PER_CHANNEL=per_channel, HAS_OFFSET=offsets is not None,
        BLOCK_M=block_m, RPT=config.rows_per_thread, TN=config.threads_n, BLOCK_C=config.chunks_per_step,
        EVEN_C=(k // (VEC_WORDS * 32 // bits)) % config.chunks_per_step == 0,
        num_warps=config.num_warps,
    )  # fmt: skip
