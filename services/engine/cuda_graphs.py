"""CUDA graphs for decode and verify steps: one captured forward pass per (batch bucket, query length).

A decode step of a small model is mostly launch overhead (30 layers x ~10 kernels), so the whole
forward pass, logits included, is captured once per shape and replayed. Shapes: every sequence brings
exactly Q query tokens, Q = 1 for plain decode (every bucket) and Q = 2..k+1 for speculative verify steps
(buckets up to the speculation batch limit). Inputs live in static buffers that each step overwrites.

A step is padded to its shape in two ways (`pad_to_uniform_query`):

    a sequence with fewer than Q tokens   -> real tokens first, then padding tokens: input id 0, slot -1
        (no KV write), the last real position (RoPE tables stay in range); its seq_len grows by the pad
        count, so the real rows keep their causal limits and the padding rows see only unwritten slots
    fewer sequences than the bucket       -> padding sequences of Q tokens at slot -1 over block 0

Padding rows' outputs are never read. Nothing inside a replay waits on the host; the only sync of a
step is reading the sampled ids.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stageserve.engine.attention import AttentionMetadata, max_query_len

if TYPE_CHECKING:
    from stageserve.engine.runner import HostBatch

logger = logging.getLogger(__name__)


def graph_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256 + 1, 16)) + list(range(256 + 64, 4096 + 1, 64))
    return [b for b in sizes if b < max_batch] + [max_batch]


@dataclass
class UniformBatch:
    """A decode or verify step padded so that every sequence brings exactly `query_len` tokens."""

    input_ids: torch.Tensor  # [num_seqs * query_len]
    positions: torch.Tensor  # [num_seqs * query_len]
    slots: torch.Tensor  # [num_seqs * query_len], -1 on padding tokens
    seq_lens: torch.Tensor  # [num_seqs], grown by each sequence's pad count
    block_tables: torch.Tensor  # [num_seqs, width]: wide enough for the grown seq_lens
    query_len: int
    rows: list[int]  # the padded row of each requested (unpadded) sample row, in order

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def pad_to_uniform_query(
    host: HostBatch, sample_rows: list[int], block_size: int, max_blocks: int, max_len: int
) -> UniformBatch | None:
    """`host` padded to its longest query run, or None where padding would read past a block-table row
    of `max_blocks` blocks or make a sequence longer than `max_len` (the step then runs eagerly)."""
    starts = host.query_start_loc
    q = max_query_len(starts)
    if q == 1:  # plain decode: nothing to pad
        return UniformBatch(host.input_ids, host.positions, host.slots, host.seq_lens, host.block_tables, 1, sample_rows)
    rows = [padded_row(starts, q, r) for r in sample_rows]
    first = torch.tensor(starts[:-1], dtype=torch.int64)  # [num_seqs]
    lens = torch.tensor(starts[1:], dtype=torch.int64) - first  # [num_seqs]
    offsets = torch.arange(q, dtype=torch.int64)
    real = offsets[None, :] < lens[:, None]  # [num_seqs, q]
    source = first[:, None] + torch.minimum(offsets[None, :], lens[:, None] - 1)  # padding repeats the last real token
    seq_lens = host.seq_lens + (q - lens)
    longest = int(seq_lens.max())
    width = -(-longest // block_size)
    if width > max_blocks or longest > max_len:
        return None
    tables = host.block_tables
    if width > tables.shape[1]:  # the padding rows' reads past the last real block land on block 0
        tables = torch.nn.functional.pad(tables, (0, width - tables.shape[1]))
    return UniformBatch(
        input_ids=torch.where(real, host.input_ids[source], 0).flatten(),
        positions=host.positions[source].flatten(),
        slots=torch.where(real, host.slots[source], -1).flatten(),
        seq_lens=seq_lens,
        block_tables=tables,
        query_len=q,
        rows=rows,
    )


def padded_row(query_start_loc: list[int], query_len: int, row: int) -> int:
    """Where flat row `row` of a packed batch lands once every sequence is padded to `query_len` tokens."""
    seq = bisect.bisect_right(query_start_loc, row) - 1
    return seq * query_len + row - query_start_loc[seq]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bucket * query_len, vocab] float32, rewritten by every replay


class CudaGraphRunner:
    def __init__(
        self, model, kv_caches: list[torch.Tensor], max_batch: int, max_blocks_per_seq: int, max_model_len: int,
        *, verify_batch: int = 0, max_verify_query_len: int = 1,
    ):  # fmt: skip
        """Decode graphs for every bucket up to `max_batch`; verify graphs (query lengths
        2..`max_verify_query_len`) for the buckets up to the first that holds `verify_batch` sequences."""
        self.model, self.kv_caches = model, kv_caches
        self.max_batch, self.max_blocks = max_batch, max_blocks_per_seq
        self.max_model_len = max_model_len
        self.buckets = graph_buckets(max_batch)
        self.shapes = [(b, 1) for b in self.buckets]
        if verify_batch > 0 and max_verify_query_len > 1:
            upto = next((b for b in self.buckets if b >= verify_batch), self.buckets[-1])
            self.shapes += [(b, q) for b in self.buckets if b <= upto for q in range(2, max_verify_query_len + 1)]
        max_tokens = max(b * q for b, q in self.shapes)
        device = kv_caches[0].device
        # input_ids, positions, slot_mapping and seq_lens as rows of one buffer, so a step needs one copy.
        self._vectors = torch.zeros(4, max_tokens, dtype=torch.int64, device=device)
        self._vectors[2].fill_(-1)
        self._vectors[3].fill_(1)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = self._vectors.unbind(0)
        self._stage = torch.zeros(4, max_tokens, dtype=torch.int64).pin_memory()
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int64, device=device)
        self._rows = torch.zeros(max_tokens, dtype=torch.int64, device=device)  # sample rows of a padded step
        self._rows_stage = torch.zeros(max_tokens, dtype=torch.int64).pin_memory()
        # Static query starts per verify query length; a bucket uses a prefix.
        self._query_starts = {
            q: torch.arange(0, (self.max_batch + 1) * q, q, dtype=torch.int32, device=device)
            for q in {q for _, q in self.shapes if q > 1}
        }
        self.captured: dict[tuple[int, int], _Captured] = {}
        self.verify_enabled = True  # benchmarks switch it off to measure eager verify steps in the same process
        self.verify_replays = 0

    def _meta(self, bucket: int, q: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[: bucket * q],
            block_tables=self.block_tables[:bucket],
            seq_lens=self.seq_lens[:bucket],
            query_start_loc=list(range(0, bucket * q + 1, q)),
            seq_lens_host=[q] * bucket,
            # The split count is fixed at capture; each program reads its own length from seq_lens.
            max_seq_len=self.max_model_len,
        )
        if q > 1:  # what TritonAttention would otherwise build (and copy) on the step's first layer
            meta.backend_state["triton_query_start_loc"] = (self._query_starts[q][: bucket + 1], q)
        return meta

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        started = time.perf_counter()
        with torch.cuda.stream(stream):
            # Largest first, so smaller ones reuse its memory.
            for bucket, q in sorted(self.shapes, key=lambda s: (s[0] * s[1], s), reverse=True):
                for _ in range(2):  # compile every Triton kernel variant before capture
                    self._forward(bucket, q)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = self._forward(bucket, q)
                graph.replay()  # the first replay uploads the graph: here, not in a served (and timed) step
                self.captured[bucket, q] = _Captured(graph, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        verify = sorted(s for s in self.captured if s[1] > 1)
        logger.info(
            "captured CUDA graphs in %.1f s: decode batch sizes %s; verify (batch, query len) %s",
            time.perf_counter() - started, self.buckets, verify or "none",
        )  # fmt: skip

    def _forward(self, bucket: int, q: int) -> torch.Tensor:
        n = bucket * q
        hidden = self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, self._meta(bucket, q))
        return self.model.compute_logits(hidden)

    def bucket(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def can_run(self, num_seqs: int, query_len: int, max_blocks: int) -> bool:
        if max_blocks > self.max_blocks or (query_len > 1 and not self.verify_enabled):
            return False
        return (self.bucket(num_seqs), query_len) in self.captured

    def run(self, batch: UniformBatch) -> torch.Tensor:
        """One padded step in; the logits of its requested rows out, [len(batch.rows), vocab] (a view or a
        fresh gather of the replay's output, valid until the next replay).

        The four per-token vectors travel in one pinned staging buffer and one copy. Reusing the staging
        buffers is safe because every step ends with the host reading its sampled ids, after which these
        copies have long run.
        """
        n, q, width = batch.num_seqs, batch.query_len, batch.block_tables.shape[1]
        bucket = self.bucket(n)
        used, total = n * q, bucket * q
        stage = self._stage[:, :total]  # [4, bucket * q] pinned int64
        stage[0, :used], stage[1, :used], stage[2, :used] = batch.input_ids, batch.positions, batch.slots
        stage[0, used:], stage[1, used:], stage[2, used:] = 0, 0, -1
        stage[3, :n], stage[3, n:bucket] = batch.seq_lens, q
        self._vectors[:, :total].copy_(stage, non_blocking=True)
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        captured = self.captured[bucket, q]
        captured.graph.replay()
        self.verify_replays += int(q > 1)
        rows = batch.rows
        if rows == list(range(len(rows))):
            return captured.logits[: len(rows)]
        self._rows_stage[: len(rows)] = torch.tensor(rows, dtype=torch.int64)
        self._rows[: len(rows)].copy_(self._rows_stage[: len(rows)], non_blocking=True)
        return captured.logits.index_select(0, self._rows[: len(rows)])
