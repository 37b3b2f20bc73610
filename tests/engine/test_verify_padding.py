"""Padding a decode/verify step to one query length per sequence (what a CUDA-graph verify step replays),
checked on the CPU: the padded batch's fields, the sample-row map, the fallbacks, and that attention of
the real rows is unchanged by the padding."""

from __future__ import annotations

import torch

from stageserve.engine.attention import TorchAttention, gather_kv
from stageserve.engine.cuda_graphs import pad_to_uniform_query, padded_row
from stageserve.engine.runner import HostBatch

BLOCK = 4


def host_batch(seq_lens: list[int], query_lens: list[int], tables: list[list[int]]) -> HostBatch:
    """Sequence i brings its last query_lens[i] tokens (positions seq_len - q .. seq_len - 1)."""
    ids, positions, slots, starts = [], [], [], [0]
    for n, q, table in zip(seq_lens, query_lens, tables):
        for p in range(n - q, n):
            ids.append(1000 + p)
            positions.append(p)
            slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
        starts.append(len(ids))
    width = max(len(t) for t in tables)
    return HostBatch(
        input_ids=torch.tensor(ids), positions=torch.tensor(positions), slots=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]), seq_lens=torch.tensor(seq_lens),
        query_start_loc=starts, seq_lens_host=list(seq_lens),
    )  # fmt: skip


def test_mixed_query_lengths_pad_to_the_longest_with_real_tokens_first():
    # A plain decode, a verify of 3 drafts (4 tokens), a verify of 1 draft (2 tokens).
    host = host_batch([5, 8, 7], [1, 4, 2], [[3, 4], [5, 6], [7, 8]])
    sample_rows = [0, 1, 2, 3, 4, 5, 6]
    batch = pad_to_uniform_query(host, sample_rows, BLOCK, max_blocks=8, max_len=64)
    assert batch is not None and batch.query_len == 4 and batch.num_seqs == 3
    assert batch.input_ids.view(3, 4).tolist() == [[1004, 0, 0, 0], [1004, 1005, 1006, 1007], [1005, 1006, 0, 0]]
    assert batch.positions.view(3, 4).tolist() == [[4, 4, 4, 4], [4, 5, 6, 7], [5, 6, 6, 6]]
    assert batch.slots.view(3, 4).tolist() == [[16, -1, -1, -1], [24, 25, 26, 27], [33, 34, -1, -1]]
    assert batch.seq_lens.tolist() == [8, 8, 9]
    assert batch.block_tables.shape == (3, 3), "widened so the padding rows of sequence 2 stay inside their row"
    assert batch.block_tables[:, :2].tolist() == host.block_tables.tolist() and batch.block_tables[:, 2].tolist() == [0] * 3
    assert batch.rows == [0, 4, 5, 6, 7, 8, 9]
    assert [padded_row(host.query_start_loc, 4, r) for r in (0, 5, 6)] == [0, 8, 9]


def test_plain_decode_passes_through_and_unsampled_rows_are_left_out():
    host = host_batch([5, 9], [1, 1], [[1, 2], [3, 4, 5]])
    batch = pad_to_uniform_query(host, [1], BLOCK, max_blocks=8, max_len=64)
    assert batch.query_len == 1 and batch.input_ids is host.input_ids and batch.seq_lens is host.seq_lens
    assert batch.rows == [1]


def test_padding_past_the_table_or_the_context_limit_falls_back():
    host = host_batch([8, 6], [1, 3], [[1, 2], [3, 4]])  # sequence 0 grows to 10 tokens: 3 blocks
    assert pad_to_uniform_query(host, [0], BLOCK, max_blocks=2, max_len=64) is None
    assert pad_to_uniform_query(host, [0], BLOCK, max_blocks=3, max_len=9) is None
    assert pad_to_uniform_query(host, [0], BLOCK, max_blocks=3, max_len=10) is not None


def attend(q, kv_cache, tables, seq_lens, starts) -> torch.Tensor:
    """Causal paged attention of each sequence's query run (the last run of its context), as the kernels do."""
    out = torch.empty_like(q)
    for i, n in enumerate(seq_lens):
        keys, values = gather_kv(kv_cache, tables[i], n)
        out[starts[i] : starts[i + 1]] = TorchAttention._attend(q[starts[i] : starts[i + 1]], keys, values, 0.125)
    return out


def test_real_rows_attend_exactly_as_without_padding():
    torch.manual_seed(0)
    heads, kv_heads, dim, num_blocks = 4, 2, 16, 16
    kv_cache = torch.randn(2, num_blocks, BLOCK, kv_heads, dim, dtype=torch.float64)
    host = host_batch([5, 8, 7, 3], [1, 4, 2, 3], [[3, 4], [5, 6], [7, 8], [9]])
    rows = list(range(host.query_start_loc[-1]))
    batch = pad_to_uniform_query(host, rows, BLOCK, max_blocks=4, max_len=64)
    q = torch.randn(len(rows), heads, dim, dtype=torch.float64)
    padded_q = torch.zeros(batch.num_seqs * batch.query_len, heads, dim, dtype=torch.float64)
    padded_q[batch.rows] = q
    expected = attend(q, kv_cache, host.block_tables, host.seq_lens_host, host.query_start_loc)
    uniform_starts = list(range(0, batch.num_seqs * batch.query_len + 1, batch.query_len))
    got = attend(padded_q, kv_cache, batch.block_tables, batch.seq_lens.tolist(), uniform_starts)
    torch.testing.assert_close(got[batch.rows], expected, rtol=0, atol=1e-12)  # masked keys only
    assert torch.isfinite(got).all(), "padding rows see only unwritten slots, but finite ones"
