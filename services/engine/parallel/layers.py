"""The collectives of a tensor-parallel model, added around an already loaded per-rank `LlamaModel`.

The per-rank model is an ordinary `LlamaModel` built from `ModelShard.local_config()`, so attention,
the fused ops and the attention backends need no change. Wrapping the four modules below after load
leaves the linears themselves (plain, or quantized) untouched:

    embed_tokens  vocab slice; ids of other ranks give zeros; all-reduce     -> [n, hidden] on all ranks
    o_proj        row-parallel: partial sums over this rank's heads; all-reduce
    down_proj     row-parallel: partial sums over this rank's MLP slice; all-reduce
    lm_head       vocab slice; all-gather, padding dropped                   -> [n, vocab] on all ranks
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stageserve.engine.parallel.comm import TPCommunicator
from stageserve.engine.parallel.sharding import ModelShard


class AllReduceOutput(nn.Module):
    """A row-parallel layer: the inner layer's partial sums, summed over ranks."""

    def __init__(self, inner: nn.Module, comm: TPCommunicator):
        super().__init__()
        self.inner, self.comm = inner, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.inner(x))


class VocabParallelEmbedding(nn.Module):
    def __init__(self, inner: nn.Embedding, comm: TPCommunicator, vocab_start: int):
        super().__init__()
        self.inner, self.comm = inner, comm
        self.vocab_start, self.num_local = vocab_start, inner.weight.shape[0]

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, hidden]
        local = input_ids - self.vocab_start
        foreign = (local < 0) | (local >= self.num_local)
        x = F.embedding(local.clamp(0, self.num_local - 1), self.inner.weight)
        return self.comm.all_reduce(x.masked_fill(foreign.unsqueeze(-1), 0))


class VocabParallelHead(nn.Module):
    def __init__(self, inner: nn.Module, comm: TPCommunicator, vocab_size: int):
        super().__init__()
        self.inner, self.comm, self.vocab_size = inner, comm, vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab]
        return self.comm.all_gather_last_dim(self.inner(hidden))[:, : self.vocab_size]


def apply_tensor_parallel(model: nn.Module, comm: TPCommunicator, shard: ModelShard) -> None:
    """Wrap a loaded per-rank `LlamaModel` in place (a tied head keeps sharing the embedding's slice)."""
    for layer in model.layers:
        layer.self_attn.o_proj = AllReduceOutput(layer.self_attn.o_proj, comm)
        layer.mlp.down_proj = AllReduceOutput(layer.mlp.down_proj, comm)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, comm, shard.vocab_start)
    model.lm_head = VocabParallelHead(model.lm_head, comm, shard.config.vocab_size)
