"""Attention over the paged KV cache, behind one interface so GPU kernels plug in without touching the model.

The KV cache of one layer is a tensor laid out as

    kv_cache[0 or 1, block_id, slot_in_block, kv_head, head_dim]     (0 = keys, 1 = values)

and a token at position p of a sequence lives in block `block_table[p // block_size]`, slot
`p % block_size`; its flat slot id is `block_id * block_size + p % block_size`.

Each step the runner builds one `AttentionMetadata` and passes it into `forward()` explicitly.

An fp8 (e4m3) cache stores k / k_scale and v / v_scale per layer (`kv_scale`, set by calibration);
TorchAttention dequantizes the pages it reads. The Triton backend does not take an fp8 cache yet.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """The shape of one step's batch, as attention needs it. Sequences are packed back to back."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int64, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int64: context length after this step (cached + new)
    query_start_loc: list[int]  # [num_seqs + 1] host ints: where each sequence's new tokens start
    seq_lens_host: list[int]  # [num_seqs] host copy of seq_lens
    max_seq_len: int
    # Per-step scratch a backend fills on the first layer and reuses on the rest (e.g. masks).
    backend_state: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence brings exactly one new token."""
        return self.query_start_loc[-1] == self.num_seqs


def max_query_len(query_start_loc: list[int]) -> int:
    """The most new tokens any one sequence brings this step (1 for pure decode)."""
    return max(b - a for a, b in zip(query_start_loc, query_start_loc[1:]))


class AttentionBackend(abc.ABC):
    """Writes a step's new keys/values into the paged cache and attends over each sequence's context.

    A backend with `fuses_rope = True` also offers `forward_rope(q, k, v, rope, kv_cache, meta, scale)`,
    which takes q and k before rotation and rotates them while writing the cache.
    """

    fuses_rope: bool = False

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


FP8_KV_DTYPE = torch.float8_e4m3fn
_FP8_MAX = 448.0


def write_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    kv_scale: tuple[float, float] | None = None,
) -> None:  # fmt: skip
    """Scatter new keys and values into their cache slots (divided by their scales into an fp8 cache)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    if kv_cache.dtype == FP8_KV_DTYPE:
        ks, vs = kv_scale or (1.0, 1.0)
        k = (k.float() / ks).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_KV_DTYPE)  # e4m3 has no inf: saturate
        v = (v.float() / vs).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_KV_DTYPE)
        flat, k, v = flat.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)  # no fp8 index_copy on CPU
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def index_blocks(kv_cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """kv_cache[:, table]: [2, *table.shape, block_size, kv_heads, head_dim] (fp8 gathered as raw bytes)."""
    if kv_cache.dtype == FP8_KV_DTYPE:
        return kv_cache.view(torch.uint8)[:, table].view(FP8_KV_DTYPE)
    return kv_cache[:, table]


def dequant_kv(
    kv: torch.Tensor, kv_scale: tuple[float, float] | None, dtype: torch.dtype
) -> torch.Tensor:  # kv: [2, ...] pages of keys and values -> the same in `dtype`
    if kv.dtype != FP8_KV_DTYPE:
        return kv
    ks, vs = kv_scale or (1.0, 1.0)
    scale = torch.tensor([ks, vs], dtype=torch.float32, device=kv.device).view(2, *([1] * (kv.dim() - 1)))
    return (kv.float() * scale).to(dtype)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `length` keys and values, each [length, num_kv_heads, head_dim]."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_blocks = -(-length // block_size)
    blocks = index_blocks(kv_cache, block_table[:num_blocks])  # [2, n, block_size, kv_heads, head_dim]
    blocks = blocks.reshape(2, num_blocks * block_size, num_kv_heads, head_dim)[:, :length]
    return blocks[0], blocks[1]


class TorchAttention(AttentionBackend):
    """Plain-torch attention (SDPA). Runs anywhere; the CPU default and the reference for GPU kernels."""

    def forward(self, q, k, v, kv_cache, meta, scale, kv_scale: tuple[float, float] | None = None):
        write_kv(k, v, kv_cache, meta.slot_mapping, kv_scale)
        if meta.is_decode_only:
            return self._decode(q, kv_cache, meta, scale, kv_scale)
        out = torch.empty_like(q)
        for i, seq_len in enumerate(meta.seq_lens_host):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            keys, values = gather_kv(kv_cache, meta.block_tables[i], seq_len)
            if kv_cache.dtype == FP8_KV_DTYPE:
                keys, values = dequant_kv(torch.stack((keys, values)), kv_scale, q.dtype)
            out[start:end] = self._attend(q[start:end], keys, values, scale)
        return out

    @staticmethod
    def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention of the last len(q) positions over the whole context."""
        num_new, context = q.shape[0], keys.shape[0]
        qh, kh, vh = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)  # [heads, len, head_dim]
        if num_new == context:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # Query i sits at position context - num_new + i and sees keys up to it.
            rows = torch.arange(context - num_new, context, device=q.device).unsqueeze(1)
            mask = torch.arange(context, device=q.device).unsqueeze(0) <= rows  # [num_new, context]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(0, 1)

    @staticmethod
    def _decode(
        q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, kv_scale=None
    ) -> torch.Tensor:
        """All sequences at once: one new token each, contexts padded to the longest and masked."""
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        num_seqs = meta.num_seqs
        max_blocks = -(-meta.max_seq_len // block_size)
        table = meta.block_tables[:, :max_blocks]
        blocks = dequant_kv(index_blocks(kv_cache, table), kv_scale, q.dtype)  # [2, seqs, max_blocks, block_size, kv_heads, head_dim]
        kv = blocks.reshape(2, num_seqs, max_blocks * block_size, num_kv_heads, head_dim).transpose(2, 3)
        mask = meta.backend_state.get("decode_mask")
        if mask is None:  # the same for every layer of the step
            positions = torch.arange(max_blocks * block_size, device=q.device)
            mask = (positions.unsqueeze(0) < meta.seq_lens.unsqueeze(1))[:, None, None, :]  # [seqs, 1, 1, ctx]
            meta.backend_state["decode_mask"] = mask
        if q.dtype == torch.float32:
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2), kv[0], kv[1], attn_mask=mask, scale=scale, enable_gqa=True
            )  # [seqs, heads, 1, head_dim]
            return out.squeeze(2)
        # In bf16/f16 the CPU kernel runs 5-7x faster with each KV head's query group as its query rows
        # (query head h reads KV head h // group, as under enable_gqa) than with one query row per head,
        # and gives the same bits; in float32 the two cost about the same and differ in the last bit.
        group = q.shape[1] // num_kv_heads
        out = F.scaled_dot_product_attention(
            q.reshape(num_seqs, num_kv_heads, group, head_dim), kv[0], kv[1], attn_mask=mask, scale=scale
        )  # [seqs, kv_heads, group, head_dim]
        return out.reshape(num_seqs, num_kv_heads * group, head_dim)
