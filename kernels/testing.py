"""Factories of random inputs for the kernels, shared by tests/kernels and benchmarks/gpu_kernels.py.

Every factory draws fresh random values from the generator it is given, and poisons what the kernel
should not read (cache slots past each sequence's end, unused blocks) with NaN, so a stray read shows
up as NaN in the output instead of passing unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A cache larger than this many elements is not poisoned whole (see make_paged_batch's min_block_id).
_POISON_WHOLE_CACHE_MAX = 1 << 28


@dataclass
class PagedBatch:
    """One step's attention inputs over a paged cache, packed as the runner packs them."""

    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int64, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int64: context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens_host: list[int]
    query_start_loc_host: list[int]
    scale: float

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host)

    @property
    def max_query_len(self) -> int:
        starts = self.query_start_loc_host
        return max(b - a for a, b in zip(starts, starts[1:]))

    def kv_bytes(self) -> int:
        """Bytes of K and V the step must read at least once: every context token of every sequence."""
        _, _, _, num_kv_heads, head_dim = self.kv_cache.shape
        return 2 * sum(self.seq_lens_host) * num_kv_heads * head_dim * self.kv_cache.element_size()


def make_paged_batch(
    seq_lens: list[int],
    query_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,  # on `device`
    num_blocks: int | None = None,
    min_block_id: int = 0,
) -> PagedBatch:
    """Random q and cache contents, each sequence's blocks at random distinct ids in [min_block_id, num_blocks).

    With a `num_blocks` past 2**31 / (block_size * num_kv_heads * head_dim) and `min_block_id` near it, the
    element offsets of the used blocks exceed int32 (an index-overflow test); such a cache is allocated
    uninitialized (on the CPU only the touched pages become resident) and only its used blocks and block 0
    are poisoned.
    """
    assert len(seq_lens) == len(query_lens) and all(0 < q <= s for q, s in zip(query_lens, seq_lens))
    device = torch.device(device)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    needed = sum(blocks_per_seq)
    if num_blocks is None:
        num_blocks = min_block_id + needed + 3
    assert num_blocks - min_block_id >= needed, "not enough blocks above min_block_id"
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.empty(shape, dtype=dtype, device=device)
    if kv_cache.numel() <= _POISON_WHOLE_CACHE_MAX:
        kv_cache.fill_(float("nan"))
    else:
        kv_cache[:, 0] = float("nan")
    perm = torch.randperm(num_blocks - min_block_id, generator=generator, device=device)[:needed] + min_block_id
    ids = perm.tolist()
    width = max(blocks_per_seq)
    table, at = [], 0
    for n in blocks_per_seq:
        table.append(ids[at : at + n] + [0] * (width - n))
        at += n
    block_tables = torch.tensor(table, dtype=torch.int64, device=device)
    # The used blocks: random values at positions < seq_len, NaN past the end of each sequence.
    kv_cache[:, perm] = float("nan")
    slots = torch.cat([
        block_tables[i, torch.arange(s, device=device) // block_size] * block_size
        + torch.arange(s, device=device) % block_size
        for i, s in enumerate(seq_lens)
    ])  # [sum(seq_lens)] flat slot of every context token
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[:, slots] = torch.randn(2, len(slots), num_kv_heads, head_dim, generator=generator, device=device).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], num_heads, head_dim, generator=generator, device=device).to(dtype)
    return PagedBatch(
        q=q,
        kv_cache=kv_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens_host=list(seq_lens),
        query_start_loc_host=starts,
        scale=head_dim**-0.5,
    )


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN or inf (an unwritten or poisoned element)."""
    out, ref = out.double(), ref.double().to(out.device)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# Relative-error bounds per dtype (METHOD.md: float32 far under 1e-3; bf16 between 1e-3 and 1e-2).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
