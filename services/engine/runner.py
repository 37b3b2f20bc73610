"""Turns a SchedulerOutput into one forward pass over the paged KV cache, then samples.

The runner owns the model, the KV cache tensors and the sampler. It packs every scheduled
request's new tokens into one flat batch, builds the `AttentionMetadata` for it, and projects to
logits only the rows whose request has caught up with its tokens (a prefill chunk in the middle of
a prompt samples nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stageserve.engine.attention import FP8_KV_DTYPE, AttentionBackend, AttentionMetadata, TorchAttention, max_query_len
from stageserve.engine.config import EngineConfig, ModelConfig
from stageserve.engine.cuda_graphs import CudaGraphRunner, pad_to_uniform_query
from stageserve.engine.model import LlamaModel
from stageserve.engine.ops import TorchOps, TritonOps
from stageserve.engine.quant.linear import QuantSpec
from stageserve.engine.scheduler import SchedulerOutput
from stageserve.sample.sampler import SampledToken, Sampler, SamplingRow


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        state_dict: dict[str, torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_id: int | frozenset[int] | None = None,
        backend: AttentionBackend | None = None,
        max_model_len: int | None = None,
        calibration_tokens: list[int] | None = None,
    ):
        self.model_config, self.config = model_config, engine_config
        self.device, self.dtype = device, dtype
        fp8_kv = engine_config.kv_cache_dtype == "fp8_e4m3"
        self.kv_dtype = FP8_KV_DTYPE if fp8_kv else dtype
        freq_factors = state_dict.get("rope_freqs")
        if backend is None and fp8_kv:  # only the torch backend reads an fp8 cache so far
            backend = TorchAttention()
        backend, ops = backend_and_ops(engine_config.attention_backend, device) if backend is None else (backend, TorchOps)
        self.backend_name = ops.name
        quant = QuantSpec.from_engine_config(engine_config, device, dtype)
        with torch.device("meta"):  # skip random init: every weight is overwritten below
            model = LlamaModel(model_config, backend, freq_factors=freq_factors, ops=ops, quant=quant)
        model = model.to_empty(device=device).to(dtype)
        model.load_hf_state_dict(state_dict)
        model.rope.reset_tables()  # float32, whatever the weights' dtype
        if quant.awq or fp8_kv:
            from stageserve.engine.quant.calibrate import calibrate, calibration_token_ids

            tokens = calibration_tokens or calibration_token_ids(None, model_config.vocab_size)
            calibrate(model, tokens, kv_scales=fp8_kv)
        self.model = model.eval()
        # One allocation for every layer, so a KV transport can export (or read) the whole pool at once.
        self.kv_pool = self._allocate_kv_pool()  # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
        self.kv_caches = list(self.kv_pool.unbind(0))  # per-layer views
        generator = torch.Generator(device=device).manual_seed(engine_config.sampler_seed)
        self.sampler = Sampler(eos_token_id=eos_token_id, generator=generator)
        self.graphs: CudaGraphRunner | None = None
        if device.type == "cuda" and engine_config.cuda_graphs and ops is TritonOps:
            max_len = max_model_len or model_config.max_position_embeddings
            max_batch = min(engine_config.max_graph_batch_size, engine_config.max_num_seqs)
            verify_batch, verify_query_len = 0, 1
            if engine_config.speculative != "none" and engine_config.spec_verify_graphs:
                verify_batch = min(engine_config.spec_max_batch_size, max_batch)
                group = model_config.num_heads // model_config.num_kv_heads
                verify_query_len = min(engine_config.num_speculative_tokens + 1, backend.max_uniform_query_len(group))
            self.graphs = CudaGraphRunner(
                self.model, self.kv_caches, max_batch, -(-max_len // engine_config.block_size), max_len,
                verify_batch=verify_batch, max_verify_query_len=verify_query_len,
            )

    def capture_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.capture()

    def _allocate_kv_pool(self) -> torch.Tensor:
        c, m = self.config, self.model_config
        shape = (m.num_layers, 2, c.num_blocks, c.block_size, m.num_kv_heads, m.head_dim)
        return torch.zeros(shape, device=self.device, dtype=self.kv_dtype)

    def read_kv(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """A copy of one layer's pages: [2, len(block_ids), block_size, num_kv_heads, head_dim]."""
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        return self.kv_caches[layer].index_select(1, index)

    def write_kv(self, layer: int, block_ids: list[int], pages: torch.Tensor) -> None:
        """Overwrite one layer's pages; the caller has validated ids, dtype and shape."""
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        self.kv_caches[layer].index_copy_(1, index, pages.to(self.device, self.kv_dtype))

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_caches)

    @torch.inference_mode()
    def execute(
        self, sched: SchedulerOutput, on_layer: Callable[[int], None] | None = None
    ) -> list[list[SampledToken]]:
        """Run one step; returns, per scheduled request, its sampled tokens (none mid-prefill).

        A request with k draft tokens gets k + 1: row j is sampled as if the first j drafts had been
        accepted (its history includes them), so row j is exactly what a plain step would sample there.
        `on_layer(i)` is called right after layer i's forward is queued (a KV transport starts moving that
        layer's pages while the later layers compute); only steps that run the model eagerly call it.
        """
        host, sample_rows = self._prepare_host(sched)
        results: list[list[SampledToken]] = [[] for _ in sched.scheduled]
        logits = self.forward_step(host, [row + j for _, row, n in sample_rows for j in range(n)], on_layer)
        if logits is None:
            return results
        rows, owners = [], []
        for i, _, n in sample_rows:
            r = sched.scheduled[i].request
            for j in range(n):
                history = r.output_token_ids + r.spec_token_ids[:j] if j else r.output_token_ids
                rows.append(SamplingRow(r.sampling_params, r.prompt_token_ids, history))
                owners.append(i)
        for i, token in zip(owners, self.sampler(logits, rows).to_lists()):
            results[i].append(token)
        return results

    def forward_step(
        self, host: HostBatch, sample_rows: list[int], on_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor | None:
        """The forward pass of one step: logits [len(sample_rows), vocab] of those flat rows, or None.

        Depends on nothing but its arguments, so tensor-parallel ranks given the same inputs take the
        same path (graph or eager) and issue the same collectives.
        """
        graphs, num_seqs = self.graphs, len(host.seq_lens_host)
        q = max_query_len(host.query_start_loc)
        if graphs is not None and on_layer is None and graphs.can_run(num_seqs, q, host.block_tables.shape[1]):
            # Decode and verify steps; a prompt chunk of <= q tokens too, whose attention is the same.
            batch = pad_to_uniform_query(host, sample_rows, self.config.block_size, graphs.max_blocks, graphs.max_model_len)
            if batch is not None:
                logits = graphs.run(batch)
                return logits if sample_rows else None
        meta = host.to_device(self.device)
        hidden = self.model(meta.input_ids, meta.positions, self.kv_caches, meta.attention, on_layer)  # [num_tokens, hidden]
        if not sample_rows:
            return None
        return self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])  # [num_sampled, vocab]

    def _prepare_host(self, sched: SchedulerOutput) -> tuple[HostBatch, list[tuple[int, int, int]]]:
        """The step's inputs as host tensors, and the rows to sample: (index in schedule, first row in
        the flat batch, how many rows: 1 + number of draft tokens)."""
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_rows: list[tuple[int, int, int]] = []
        for i, s in enumerate(sched.scheduled):
            r, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            spec = r.spec_token_ids  # the scheduler cut it to fit: real tokens end at end - len(spec)
            input_ids += r.token_slice(start, end - len(spec))
            input_ids += spec
            positions += range(start, end)
            slots += (s.block_ids[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(len(input_ids))
            seq_lens.append(end)
            if end - len(spec) == r.num_tokens:
                sample_rows.append((i, len(input_ids) - 1 - len(spec), 1 + len(spec)))
        max_blocks = max(len(s.block_ids) for s in sched.scheduled)
        table = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in sched.scheduled]
        host = HostBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            slots=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(table, dtype=torch.int64),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
            query_start_loc=query_start_loc,
            seq_lens_host=seq_lens,
        )
        return host, sample_rows


@dataclass
class DeviceBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionMetadata


@dataclass
class HostBatch:
    """One step's inputs on the host, before they are copied to the device (or into graph buffers)."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    slots: torch.Tensor  # [num_tokens]
    block_tables: torch.Tensor  # [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # [num_seqs]
    query_start_loc: list[int]
    seq_lens_host: list[int]

    def to_device(self, device: torch.device) -> DeviceBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True) if device.type == "cuda" else t

        attention = AttentionMetadata(
            slot_mapping=move(self.slots), block_tables=move(self.block_tables), seq_lens=move(self.seq_lens),
            query_start_loc=self.query_start_loc, seq_lens_host=self.seq_lens_host, max_seq_len=max(self.seq_lens_host),
        )
        return DeviceBatch(move(self.input_ids), move(self.positions), attention)


def backend_and_ops(name: str, device: torch.device) -> tuple[AttentionBackend, type]:
    """The attention backend and element-wise ops for a config value: Triton on CUDA, torch elsewhere."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttention(), TorchOps
    from stageserve.engine.triton_attention import TritonAttention

    return TritonAttention(), (TritonOps if device.type == "cuda" else TorchOps)
