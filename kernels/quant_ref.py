"""Pure-torch references of `quant_matmul`'s kernels (dequantize, then matmul in float32), and the 4-bit packing.

Kept apart from the kernels so the engine can quantize and run the CPU path without importing Triton
(which decorates kernels at import, before the kernel tests can switch on the interpreter).
"""

from __future__ import annotations

import torch


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] of 0..15, in k order (low nibble first)."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of 0..15 -> uint8 [N, K // 2], the inverse of `unpack_int4`."""
    q = q.to(torch.uint8).reshape(q.shape[0], -1, 2)
    return q[..., 0] | (q[..., 1] << 4)


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The float32 weight [N, K] that every kernel here computes with."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    n, k = q.shape
    group = k // scales.shape[1]
    w = q.float().view(n, -1, group) * scales.float().unsqueeze(-1)
    if offsets is not None:
        w = w + offsets.float().unsqueeze(-1)
    return w.view(n, k)


def quant_matmul_ref(x: torch.Tensor, qweight, scales, offsets, bits: int) -> torch.Tensor:
    """Dequantize, then matmul in float32: [M, K] -> [M, N] in x's dtype. The CPU execution path."""
    return (x.float() @ dequantize_ref(qweight, scales, offsets, bits).t()).to(x.dtype)


# ---- the tensor cores' tile layout of 4-bit weights (kernels/quant_tc_tiles.py) --------------------------------
#
# mma.sync m16n8k16 gives lane l (g = l // 4, t = l % 4) eight values of each 16 x 16 A tile: rows g + 8r,
# columns 2t + 8c + e (r, c, e in 0..1), as four bf16 pairs R_s, s = r + 2c, the e = 0 value in the low half.
# One 32-bit word per lane and tile holds those eight codes, nibble s + 4e = code (r, c, e), so that
# ((word >> 4s) & 0x000F000F) | 0x43004300 is R_s as the two bfloat16 values 128 + q. A 16-row stripe stores,
# per 64 columns, 32 lanes x 4 tiles along k: a lane's 16-byte load holds its words of four consecutive tiles.
TILE_ROWS, TILE_COLS = 16, 64


STRIPES_PER_PASS = 256  # 4,096 rows at a time: the int64 temporaries stay ~16 bytes per weight of one pass


def tile_int4(qweight: torch.Tensor, stripes_per_pass: int = STRIPES_PER_PASS) -> torch.Tensor:
    """uint8 [N, K // 2] (unpack_int4's layout) -> int32 [N // 16, 2 K] in the tile layout above."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if n % TILE_ROWS or k % TILE_COLS:
        raise ValueError(f"the tile layout needs N % {TILE_ROWS} == 0 and K % {TILE_COLS} == 0, got N={n}, K={k}")
    tiles = torch.empty(n // 16, 2 * k, dtype=torch.int32, device=qweight.device)
    shifts = 4 * torch.arange(8, device=qweight.device)
    for s0 in range(0, n // 16, stripes_per_pass):
        q = unpack_int4(qweight[16 * s0 : 16 * (s0 + stripes_per_pass)]).to(torch.int64)
        i = q.shape[0] // 16
        # [I, r, g, J, jj, c, t, e] -> [I, J, g, t, jj, e, c, r]: nibble e * 4 + c * 2 + r of word (I, J, lane, jj)
        q = q.view(i, 2, 8, k // 64, 4, 2, 4, 2).permute(0, 3, 2, 6, 4, 7, 5, 1).reshape(i, -1, 8)
        words = (q << shifts).sum(dim=-1)
        tiles[s0 : s0 + i] = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return tiles


def untile_int4(tiles: torch.Tensor, n: int, k: int, stripes_per_pass: int = STRIPES_PER_PASS) -> torch.Tensor:
    """The inverse of `tile_int4`: int32 [N // 16, 2 K] -> uint8 [N, K // 2]."""
    out = torch.empty(n, k // 2, dtype=torch.uint8, device=tiles.device)
    shifts = 4 * torch.arange(8, device=tiles.device, dtype=torch.int32)
    for s0 in range(0, n // 16, stripes_per_pass):
        words = tiles[s0 : s0 + stripes_per_pass]
        i = words.shape[0]
        q = (words.view(i, k // 64, 8, 4, 4, 1) >> shifts) & 0xF  # [I, J, g, t, jj, (e, c, r)]; & drops the sign
        q = q.view(i, k // 64, 8, 4, 4, 2, 2, 2).permute(0, 7, 2, 1, 4, 6, 3, 5).reshape(16 * i, k)
        out[16 * s0 : 16 * (s0 + i)] = pack_int4(q)
    return out
