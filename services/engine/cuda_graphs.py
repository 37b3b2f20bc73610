"""CUDA graphs for decode steps: one captured forward pass per batch-size bucket.

A decode step of a small model is mostly launch overhead (30 layers x ~10 kernels), so the whole
forward pass, logits included, is captured once per bucket and replayed. Inputs live in static
buffers that each step overwrites; a batch is padded up to its bucket with rows that write no KV
(slot -1) and attend to one token of block 0, and their outputs are ignored.

Nothing inside a replay waits on the host; the only sync of a step is reading the sampled ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from stageserve.engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256 + 1, 16)) + list(range(256 + 64, 4096 + 1, 64))
    return [b for b in sizes if b < max_batch] + [max_batch]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bucket, vocab] float32, rewritten by every replay


class CudaGraphRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], max_batch: int, max_blocks_per_seq: int, max_model_len: int):
        self.model, self.kv_caches = model, kv_caches
        self.max_batch, self.max_blocks = max_batch, max_blocks_per_seq
        self.max_model_len = max_model_len
        device = kv_caches[0].device
        # input_ids, positions, slot_mapping and seq_lens as rows of one buffer, so a step needs one copy.
        self._vectors = torch.zeros(4, max_batch, dtype=torch.int64, device=device)
        self._vectors[2].fill_(-1)
        self._vectors[3].fill_(1)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = self._vectors.unbind(0)
        self._stage = torch.zeros(4, max_batch, dtype=torch.int64).pin_memory()
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int64, device=device)
        self.buckets = graph_buckets(max_batch)
        self.captured: dict[int, _Captured] = {}

    def _meta(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            seq_lens=self.seq_lens[:bucket],
            query_start_loc=list(range(bucket + 1)),
            seq_lens_host=[1] * bucket,
            # The split count is fixed at capture; each program reads its own length from seq_lens.
            max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket in reversed(self.buckets):  # largest first, so smaller ones reuse its memory
                for _ in range(2):  # compile every Triton kernel variant before capture
                    self._forward(bucket)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = self._forward(bucket)
                self.captured[bucket] = _Captured(graph, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def _forward(self, bucket: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_caches, self._meta(bucket))
        return self.model.compute_logits(hidden)

    def can_run(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.max_batch and max_blocks <= self.max_blocks and bool(self.captured)

    def run(self, input_ids, positions, slot_mapping, block_tables, seq_lens) -> torch.Tensor:
        """Host tensors of one decode step in; the step's logits [num_seqs, vocab] out (a view, valid until
        the next replay).

        The four per-sequence vectors travel in one pinned staging buffer and one copy; padding rows get
        slot -1 (no KV write) and length 1. Reusing the staging buffer is safe because every step ends
        with the host reading its sampled ids, after which this copy has long run.
        """
        n, width = input_ids.shape[0], block_tables.shape[1]
        bucket = next(b for b in self.buckets if b >= n)
        stage = self._stage[:, :bucket]  # [4, bucket] pinned int64
        stage[0, :n], stage[1, :n], stage[2, :n], stage[3, :n] = input_ids, positions, slot_mapping, seq_lens
        stage[2, n:], stage[3, n:] = -1, 1
        self._vectors[:, :bucket].copy_(stage, non_blocking=True)
        self.block_tables[:n, :width].copy_(block_tables, non_blocking=True)
        self.captured[bucket].graph.replay()
        return self.captured[bucket].logits[:n]
