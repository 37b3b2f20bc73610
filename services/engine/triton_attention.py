"""Attention through the Triton kernels in `stageserve.kernels`: the GPU fast path behind `AttentionBackend`.

Per layer and step: new keys/values go into the paged cache (one scatter kernel, or fused with RoPE
through `forward_rope`), then every query attends over the cache:

    every sequence brings <= max_decode_query_len tokens   -> paged_decode_attention (GQA-grouped, split-KV)
    otherwise (prefill, chunked prefill, mixed batches)     -> prefill_attention (FlashAttention-2 tiling)

Nothing here waits on the device: grid sizes come from the host copies in `AttentionMetadata`, and the
one host-to-device copy (`query_start_loc`, only when some sequence brings more than one token) is
staged through pinned memory, made on the step's first layer and kept in `meta.backend_state` for the rest.
"""

from __future__ import annotations

import torch

from stageserve.engine.attention import AttentionBackend, AttentionMetadata, max_query_len
from stageserve.kernels.paged_decode_attention import MAX_ROWS, paged_decode_attention
from stageserve.kernels.prefill_attention import prefill_attention
from stageserve.kernels.rope_cache import rope_and_cache, write_kv_cache


class TritonAttention(AttentionBackend):
    """Triton paged attention. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests)."""

    fuses_rope = True  # offers forward_rope: takes un-rotated q/k and rotates them while writing the cache

    def __init__(self, *, max_decode_query_len: int = 8):
        self.max_decode_query_len = max_decode_query_len

    def max_uniform_query_len(self, group: int) -> int:
        """The longest query run per sequence that `paged_decode_attention` takes at this GQA group size
        (a CUDA graph of such steps needs no host copy of the query starts; see `CudaGraphRunner`)."""
        return min(self.max_decode_query_len, MAX_ROWS // group)

    def forward(self, q, k, v, kv_cache, meta, scale):
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        return self._attend(q, kv_cache, meta, scale)

    def forward_rope(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], not yet rotated
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], not yet rotated
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        rope: tuple[torch.Tensor, torch.Tensor],  # the step's (cos, sin), each [num_tokens, 1, head_dim // 2]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """`forward` on rotated q/k, with the rotation fused into the cache write (one kernel instead of ~10)."""
        cos, sin = (t.reshape(t.shape[0], -1) for t in rope)  # [num_tokens, head_dim // 2]
        q = rope_and_cache(q, k, v, None, cos, sin, kv_cache, meta.slot_mapping)
        return self._attend(q, kv_cache, meta, scale)

    def _attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.is_decode_only:
            return paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len)
        query_start_loc, longest = self._step_tensors(meta, q.device)
        group = q.shape[1] // kv_cache.shape[3]
        if longest <= self.max_uniform_query_len(group):
            return paged_decode_attention(
                q, kv_cache, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len,
                query_start_loc=query_start_loc, max_query_len=longest,
            )  # fmt: skip
        return prefill_attention(q, kv_cache, meta.block_tables, meta.seq_lens, query_start_loc, scale, longest)

    def _step_tensors(self, meta: AttentionMetadata, device: torch.device) -> tuple[torch.Tensor, int]:
        """query_start_loc on the device and the longest query run, made on the step's first layer."""
        state = meta.backend_state.get("triton_query_start_loc")
        if state is None:
            host = torch.tensor(meta.query_start_loc, dtype=torch.int32)
            if device.type == "cuda":
                host = host.pin_memory()  # a pageable copy would make the host wait for queued kernels
            state = (host.to(device, non_blocking=True), max_query_len(meta.query_start_loc))
            meta.backend_state["triton_query_start_loc"] = state
        return state
