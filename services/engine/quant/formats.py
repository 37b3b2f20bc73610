"""Weight formats: quantizers from float weights, the GGUF block repacker, and `PackedWeight`.

Every integer format ends in one layout (`stageserve.kernels.quant_matmul`): integer codes `q` along K,
and per (row, group) a scale and an offset with `w = q * scale + offset`:

    format      bits  group  q        scale           offset
    int8        8     K      -127..127  amax / 127      none (symmetric, per output channel)
    int4        4     64/128 0..15    (max - min)/15  min (asymmetric)
    gguf q8_0   8     32     int8     d               none
    gguf q4_0   4     32     0..15    d               -8 d
    gguf q4_1   4     32     0..15    d               m

So GGUF blocks are repacked once at load (nibbles in k order, fp16 d/m as scale/offset columns) and
the same kernels serve them. Rows are independent, so a weight shards by output rows or, at group
boundaries, by input columns (`PackedWeight.narrow`), its scales with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stageserve.kernels.quant_ref import dequantize_ref, pack_int4, tile_int4, untile_int4

GGUF_TYPES = ("q4_0", "q4_1", "q8_0")
GGUF_GROUP = 32
_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


@dataclass
class PackedWeight:
    """A [N, K] weight as integer codes plus per-group scales/offsets (see the module docstring)."""

    qweight: torch.Tensor  # [N, K // 2] uint8 (4-bit) or [N, K] int8
    scales: torch.Tensor  # [N, K // group] float16 or float32 (a single column: per channel)
    offsets: torch.Tensor | None  # like scales, or None
    bits: int
    fmt: str  # "int8", "int4", "q4_0", ... (for reporting; the math depends only on the tensors)
    # "rows" (above), or "tiles": 4-bit codes as int32 [N // 16, 2 K] in the tensor cores' fragment order
    # (quant_ref.tile_int4), made last at load (after fusing and sharding) for kernels/quant_tc_tiles.py
    layout: str = "rows"

    @property
    def shape(self) -> tuple[int, int]:
        if self.layout == "tiles":
            return self.qweight.shape[0] * 16, self.qweight.shape[1] // 2
        return self.qweight.shape[0], self.qweight.shape[1] * (8 // self.bits)

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def rows_qweight(self) -> torch.Tensor:
        """The codes in the rows layout, whichever layout holds them."""
        return untile_int4(self.qweight, *self.shape) if self.layout == "tiles" else self.qweight

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        return dequantize_ref(self.rows_qweight(), self.scales, self.offsets, self.bits)

    def tiled(self) -> PackedWeight:
        """The same 4-bit weight in the "tiles" layout (N a multiple of 16, K of 64)."""
        assert self.bits == 4 and self.layout == "rows", "only 4-bit weights in rows tile"
        return PackedWeight(tile_int4(self.qweight), self.scales, self.offsets, self.bits, self.fmt, "tiles")

    def to(self, device: torch.device) -> PackedWeight:
        move = lambda t: None if t is None else t.to(device).contiguous()  # noqa: E731
        return PackedWeight(move(self.qweight), move(self.scales), move(self.offsets), self.bits, self.fmt, self.layout)

    def narrow(self, dim: int, start: int, length: int) -> PackedWeight:
        """Rows (dim 0: a column-parallel shard) or input columns (dim 1: a row-parallel shard) of the weight."""
        if self.layout != "rows":
            raise ValueError("a tiled weight does not shard: shard first, then tile")
        if dim == 0:
            take = lambda t: None if t is None else t[start : start + length].contiguous()  # noqa: E731
            return PackedWeight(take(self.qweight), take(self.scales), take(self.offsets), self.bits, self.fmt)
        group = self.group_size
        if self.scales.shape[1] == 1:
            raise ValueError("a per-channel weight's columns shard with the whole scale column: use dequantize")
        if start % group or length % group:
            raise ValueError(f"column shard [{start}, {start + length}) does not fall on group boundaries ({group})")
        pack = 8 // self.bits
        q = self.qweight[:, start // pack : (start + length) // pack].contiguous()
        cols = lambda t: None if t is None else t[:, start // group : (start + length) // group].contiguous()  # noqa: E731
        return PackedWeight(q, cols(self.scales), cols(self.offsets), self.bits, self.fmt)


def cat_rows(parts: list[PackedWeight]) -> PackedWeight | None:
    """Stack weights along N (the fused q/k/v and gate/up projections); None if their layouts differ."""
    first = parts[0]
    same = all(
        p.layout == "rows" and p.bits == first.bits and p.shape[1] == first.shape[1] and p.group_size == first.group_size
        and (p.offsets is None) == (first.offsets is None) and p.scales.dtype == first.scales.dtype
        for p in parts
    )  # fmt: skip
    if not same:
        return None
    offsets = None if first.offsets is None else torch.cat([p.offsets for p in parts])
    fmt = first.fmt if all(p.fmt == first.fmt for p in parts) else "mixed"
    return PackedWeight(
        torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), offsets, first.bits, fmt
    )


# -- quantizers (float [N, K] in, any dtype; computed in float32) ------------------------------------


def quantize_int8(w: torch.Tensor) -> PackedWeight:
    """Symmetric per-output-channel INT8: q = round(w / s), s = amax(row) / 127."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)  # [N, 1]
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return PackedWeight(q, scale, None, 8, "int8")


def quantize_int4(w: torch.Tensor, group_size: int) -> PackedWeight:
    """Asymmetric INT4 per group along K: w ~ q s + m with m the group's minimum, q = round((w - m) / s).

    The offset is a float (not an integer zero point -z s), so both ends of the range are exact and
    every weight is within half a step: an integer zero point rounds the grid and clips up to a step.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the INT4 group size {group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    scale, offset = int4_grid(g.amin(dim=-1), g.amax(dim=-1))
    return int4_packed(int4_codes(g, scale[..., None], offset[..., None]), scale, offset)


def int4_grid(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT4's (scale, offset) for groups spanning [lo, hi], rounded to float16 first (as the weight stores
    them), since the codes are computed against the stored values."""
    return ((hi - lo) / 15).clamp_min(1e-8).half().float(), lo.half().float()


def int4_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The nearest of INT4's 16 levels q * scale + offset to each weight (scale and offset broadcast to w),
    as float codes 0..15."""
    return torch.round((w - offset) / scale).clamp(0, 15)


def int4_packed(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> PackedWeight:
    """An INT4 PackedWeight from codes [N, K] (any shape that flattens to it by rows) and its groups'
    scales and offsets [N, K / group]."""
    n = scale.shape[0]
    return PackedWeight(pack_int4(codes.reshape(n, -1).to(torch.uint8)), scale.half(), offset.half(), 4, "int4")


def quantize_gguf(w: torch.Tensor, fmt: str) -> PackedWeight:
    """GGUF Q4_0/Q4_1/Q8_0 blocks of 32, with ggml's reference rounding, already in the kernels' layout."""
    n, k = w.shape
    if k % GGUF_GROUP:
        raise ValueError(f"in_features {k} is not a multiple of the GGUF block size {GGUF_GROUP}")
    g = w.float().reshape(n, k // GGUF_GROUP, GGUF_GROUP)
    if fmt == "q8_0":
        d = g.abs().amax(dim=-1) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d)).unsqueeze(-1)
        q = torch.round(g * inv).to(torch.int8).reshape(n, k)
        return PackedWeight(q, d.half(), None, 8, fmt)
    if fmt == "q4_0":
        idx = g.abs().argmax(dim=-1, keepdim=True)
        d = (g.gather(-1, idx) / -8).squeeze(-1)  # the signed extreme maps to q = 0
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d)).unsqueeze(-1)
        q = torch.clamp(torch.trunc(g * inv + 8.5), max=15)
        return PackedWeight(pack_int4(q.reshape(n, k)), d.half(), (-8 * d.half().float()).half(), 4, fmt)
    if fmt == "q4_1":
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        d = (hi - lo) / 15
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d)).unsqueeze(-1)
        q = torch.clamp(torch.trunc((g - lo.unsqueeze(-1)) * inv + 0.5), max=15)
        return PackedWeight(pack_int4(q.reshape(n, k)), d.half(), lo.half(), 4, fmt)
    raise ValueError(f"unknown GGUF type {fmt!r} (supported: {', '.join(GGUF_TYPES)})")


def repack_gguf(raw: np.ndarray, fmt: str, k: int) -> PackedWeight:
    """GGUF block bytes [N, K / 32 * block_bytes] (as the file stores them) -> the kernels' layout.

    Q4 blocks hold weights j and j + 16 in byte j's low and high nibble; here they are put back in k order.
    """
    if fmt not in _BLOCK_BYTES:
        raise ValueError(f"unknown GGUF type {fmt!r}")
    n, nb = raw.shape[0], k // GGUF_GROUP
    if k % GGUF_GROUP or raw.shape[1] != nb * _BLOCK_BYTES[fmt]:
        raise ValueError(f"{fmt} row of {raw.shape[1]} bytes does not hold {k} weights")
    blocks = np.ascontiguousarray(raw).reshape(n, nb, _BLOCK_BYTES[fmt])
    f16 = lambda lo: torch.from_numpy(blocks[..., lo : lo + 2].copy().view(np.float16)[..., 0])  # noqa: E731
    d = f16(0)  # [N, nb]
    if fmt == "q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
        return PackedWeight(q, d, None, 8, fmt)
    qs = torch.from_numpy(blocks[..., 4:].copy() if fmt == "q4_1" else blocks[..., 2:].copy())  # [N, nb, 16]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, k)
    offsets = f16(2) if fmt == "q4_1" else (-8 * d.float()).half()
    return PackedWeight(pack_int4(q), d, offsets, 4, fmt)


# -- FP8 e4m3 ---------------------------------------------------------------------------------------

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float [R, C] -> (float8_e4m3fn [R, C], float32 scale [R, 1] if per_row else [1, 1]); x ~ q * scale."""
    amax = x.abs().amax(dim=1, keepdim=True) if per_row else x.abs().amax().reshape(1, 1)
    scale = (amax.float() / FP8_MAX).clamp_min(1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
