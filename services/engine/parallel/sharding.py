"""Which slice of each weight a tensor-parallel rank owns (Megatron-style), as pure math.

For `size` ranks and a model with H query heads, K KV heads, intermediate size I and vocab V:

    k_proj, v_proj        rows of KV heads [K*r//size, K*(r+1)//size)          column-parallel
    q_proj                rows of the query heads those KV heads serve         column-parallel
    o_proj                the same columns as q_proj's rows                     row-parallel (all-reduce after)
    gate_proj, up_proj    rows [r*I/size, (r+1)*I/size)                         column-parallel
    down_proj             the same columns                                      row-parallel (all-reduce after)
    embed_tokens, lm_head rows [r*Vp, (r+1)*Vp), Vp = ceil(V/size), zero-padded vocab-parallel
    norms, rope_freqs     whole                                                 replicated

Heads are split by KV group (a KV head and the H/K query heads that read it), so attention needs no
communication. With K >= size each rank owns K/size groups; when size does not divide K the split
is as even as it gets (SmolLM2's 3 groups over 2 ranks: 1 and 2), which costs balance, not
correctness. With K < size (8 KV heads on 16 ranks, or MQA) every rank keeps one KV head,
replicated on the size/K ranks that split its query heads; that needs size % K == 0 and
(size/K) | (H/K).

The weights arrive in HF naming with q/k/v and gate/up still separate (the model fuses them at load),
so a rank's shard loads through the unchanged `LlamaModel.load_hf_state_dict` into a model built
from `local_config()`: the same architecture with fewer heads, a narrower MLP and a vocab slice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from stageserve.common.errors import InvalidArgumentError
from stageserve.engine.config import ModelConfig


@dataclass(frozen=True)
class TPRank:
    """This process's place in a tensor-parallel group, before the model's shape is known."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise InvalidArgumentError("tensor_parallel_size", f"rank {self.rank} of {self.size} is out of range")


@dataclass(frozen=True)
class Region:
    """The part of one weight a rank owns: [start, stop) along `dim`, zero-padded to `length` rows."""

    dim: int
    start: int
    stop: int
    length: int


_Q = ("self_attn.q_proj.weight", "self_attn.q_proj.bias")
_KV = ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias")
_MLP_IN = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class ModelShard:
    """One rank's share of one model; construction checks that the model splits `size` ways."""

    config: ModelConfig  # the full model
    rank: int
    size: int

    def __post_init__(self) -> None:
        TPRank(self.rank, self.size)
        c, n = self.config, self.size
        if c.num_kv_heads < n and (n % c.num_kv_heads or c.num_heads % n):
            raise InvalidArgumentError(
                "tensor_parallel_size",
                f"{n} ranks cannot split the {c.num_kv_heads} KV heads / {c.num_heads} attention heads of {c.name}: "
                f"with fewer KV heads than ranks, the KV heads must divide the ranks and the ranks the heads",
            )
        if c.intermediate_size % n:
            raise InvalidArgumentError(
                "tensor_parallel_size", f"{n} does not divide the intermediate size {c.intermediate_size} of {c.name}"
            )

    # -- per-rank sizes ---------------------------------------------------------------------------

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold each KV head (1 unless there are fewer KV heads than ranks)."""
        return max(1, self.size // self.config.num_kv_heads)

    def _kv_bounds(self, rank: int) -> tuple[int, int]:
        k, n = self.config.num_kv_heads, self.size
        if k >= n:
            return k * rank // n, k * (rank + 1) // n
        head = rank // self.kv_replicas
        return head, head + 1

    @property
    def kv_head_start(self) -> int:
        return self._kv_bounds(self.rank)[0]

    @property
    def kv_heads_per_rank(self) -> int:
        start, stop = self._kv_bounds(self.rank)
        return stop - start

    @property
    def q_head_start(self) -> int:
        if self.kv_replicas == 1:
            return self.kv_head_start * (self.config.num_heads // self.config.num_kv_heads)
        return self.rank * self.heads_per_rank

    @property
    def heads_per_rank(self) -> int:
        if self.kv_replicas == 1:
            return self.kv_heads_per_rank * (self.config.num_heads // self.config.num_kv_heads)
        return self.config.num_heads // self.size

    @property
    def is_even(self) -> bool:
        return self.config.num_kv_heads % self.size == 0 or self.kv_replicas > 1

    @property
    def intermediate_per_rank(self) -> int:
        return self.config.intermediate_size // self.size

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def local_config(self) -> ModelConfig:
        """The shape of this rank's model: hidden size, layers and head_dim stay, the rest shrinks."""
        return dataclasses.replace(
            self.config,
            num_heads=self.heads_per_rank,
            num_kv_heads=self.kv_heads_per_rank,
            intermediate_size=self.intermediate_per_rank,
            vocab_size=self.vocab_per_rank,
        )

    def for_rank(self, rank: int) -> ModelShard:
        return dataclasses.replace(self, rank=rank)

    @property
    def max_kv_heads_per_rank(self) -> int:
        return max(self.for_rank(r).kv_heads_per_rank for r in range(self.size))

    def kv_owner_ranks(self) -> list[int]:
        """One rank per distinct group of KV heads, in head order: whose pages make up every head once."""
        return list(range(0, self.size, self.kv_replicas))

    # -- slicing ----------------------------------------------------------------------------------

    def region(self, name: str, shape: tuple[int, ...]) -> Region | None:
        """This rank's part of weight `name` (HF naming) of full shape `shape`; None if replicated."""
        hd = self.config.head_dim
        q_start, q = self.q_head_start * hd, self.heads_per_rank * hd
        if name.endswith(_Q):
            return Region(0, q_start, q_start + q, q)
        if name.endswith(_KV):
            kv = self.kv_heads_per_rank * hd
            return Region(0, self.kv_head_start * hd, self.kv_head_start * hd + kv, kv)
        if name.endswith("self_attn.o_proj.weight"):
            return Region(1, q_start, q_start + q, q)
        if name.endswith(_MLP_IN):
            i = self.intermediate_per_rank
            return Region(0, self.rank * i, (self.rank + 1) * i, i)
        if name.endswith("mlp.down_proj.weight"):
            i = self.intermediate_per_rank
            return Region(1, self.rank * i, (self.rank + 1) * i, i)
        if name in _VOCAB:
            start = min(self.vocab_start, shape[0])
            return Region(0, start, min(start + self.vocab_per_rank, shape[0]), self.vocab_per_rank)
        return None

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's copy of its slice: owns its memory, so the full tensor can be freed."""
        region = self.region(name, tuple(tensor.shape))
        if region is None:
            return tensor
        return pad_to(tensor.narrow(region.dim, region.start, region.stop - region.start).clone(), region)

    def shard_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.apply(name, t) for name, t in state.items()}


def pad_to(part: torch.Tensor, region: Region) -> torch.Tensor:
    """Zero rows up to `region.length` along `region.dim` (the last vocab shard when V % size != 0)."""
    missing = region.length - part.shape[region.dim]
    if missing == 0:
        return part
    pad_shape = list(part.shape)
    pad_shape[region.dim] = missing
    return torch.cat([part, part.new_zeros(pad_shape)], dim=region.dim)


def gather_kv_heads(per_rank: list[torch.Tensor], shard: ModelShard) -> torch.Tensor:
    """Every rank's pages `[2, n, block_size, kv_per_rank, head_dim]` -> all KV heads once, in order."""
    return torch.cat([per_rank[r] for r in shard.kv_owner_ranks()], dim=3)


def local_kv_heads(pages: torch.Tensor, shard: ModelShard) -> torch.Tensor:
    """All KV heads' pages `[2, n, block_size, num_kv_heads, head_dim]` -> this rank's heads."""
    return pages.narrow(3, shard.kv_head_start, shard.kv_heads_per_rank)
