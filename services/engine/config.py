"""Configuration of the model (read from the weights) and of the engine (runtime knobs).

Neither dataclass does I/O or reads the environment: loaders fill `ModelConfig` from a file's
metadata, and the CLI fills `EngineConfig` from flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stageserve.common.errors import InvalidArgumentError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency-dependent RoPE scaling (`rope_type: llama3` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2)."""

    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    name: str = "model"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def num_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs of one engine. Every trade-off is a field with a sane default."""

    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block", "min": 1, "max": 256})
    num_blocks: int = field(
        default=2048, metadata={"help": "KV-cache blocks in the pool (its size in tokens is this x block_size)", "min": 2}
    )
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences in one running batch", "min": 1})
    max_num_batched_tokens: int = field(
        default=512, metadata={"help": "token budget of one step; the chunked-prefill chunk size", "min": 1}
    )
    max_waiting: int = field(default=1024, metadata={"help": "most requests waiting to be scheduled", "min": 0})
    max_waiting_tokens: int = field(
        default=1 << 18,
        metadata={"help": "most tokens still to compute over the waiting requests; beyond this RESOURCE_EXHAUSTED "
                  "(an empty queue takes any request; 0: no bound)", "min": 0},
    )
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks of shared prefixes"})
    max_model_len: int | None = field(
        default=None, metadata={"help": "context limit in tokens (default: the model's own)", "min": 1}
    )
    dtype: str = field(default="auto", metadata={"help": "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    attention_backend: str = field(
        default="auto", metadata={"help": "auto (triton on CUDA, torch elsewhere), torch or triton"}
    )
    cuda_graphs: bool = field(default=True, metadata={"help": "replay captured CUDA graphs for decode steps (CUDA only)"})
    max_graph_batch_size: int = field(
        default=256, metadata={"help": "largest decode batch replayed from a CUDA graph", "min": 1}
    )
    sampler_seed: int = field(default=0, metadata={"help": "seed of the generator for unseeded sampled requests", "min": 0})
    tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "GPUs (from `device` on) one engine's weights and KV heads are split over; on CPU, gloo ranks (tests)",
                  "min": 1, "max": 64},
    )
    # Quantization (stageserve.engine.quant): weights are quantized, or GGUF blocks kept, at load.
    quantization: Literal["none", "int8", "int4", "fp8", "gguf"] = field(
        default="none",
        metadata={"help": "weight format of the projections: none (the model dtype), int8 (per channel), int4 "
                  "(asymmetric, grouped), fp8 (e4m3 weights and activations), gguf (Q4_0/Q4_1/Q8_0 blocks kept packed)"},
    )  # fmt: skip
    quant_group_size: int = field(default=128, metadata={"help": "int4 group size along the input: 64 or 128"})
    quant_awq: bool = field(
        default=False, metadata={"help": "int4: activation-aware per-channel scales searched on a small calibration text"}
    )
    fp8_scaling: Literal["channel", "tensor"] = field(
        default="channel", metadata={"help": "fp8 scales: per output channel and per token, or one per tensor"}
    )
    gguf_quant_type: Literal["q4_0", "q4_1", "q8_0"] = field(
        default="q4_1", metadata={"help": "gguf: block type for weights that arrive as floats (dummy/HF models)"}
    )
    quantize_lm_head: bool = field(default=True, metadata={"help": "quantize an untied LM head too"})
    tied_lm_head: Literal["auto", "embedding", "int8"] = field(
        default="auto",
        metadata={"help": "logits of a tied LM head under int8/int4/gguf: embedding (from the embedding, in the model "
                  "dtype) or int8 (a per-channel INT8 copy: decode reads half the head's bytes; the embedding "
                  "stays for lookups, so memory grows by vocab x hidden bytes). auto: int8 on the CPU in "
                  "bfloat16/float16, where it was measured faster, embedding elsewhere"},
    )  # fmt: skip
    quant_gemv_max_batch: int = field(
        default=4,
        metadata={"help": "largest batch run by the weight-streaming kernels (<= 8): the GPU's GEMVs under fixed "
                  "dispatch, PyTorch's packed kernels on the CPU", "min": 0, "max": 8},
    )  # fmt: skip
    quant_fused_max_batch: int = field(
        default=64,
        metadata={"help": "largest batch run by the tiled fused kernels under fixed dispatch (mm_t for 4-bit "
                  "weights, mm for 8-bit); above it dequantize + GEMM", "min": 0},
    )  # fmt: skip
    quant_int4_layout: Literal["rows", "tiles"] = field(
        default="rows",
        metadata={"help": "4-bit weights with offsets (int4, gguf q4_0/q4_1) on a CUDA GPU: rows (the layout every "
                  "kernel reads) or tiles (re-laid at load in the tensor cores' fragment order, same bytes: mma.sync "
                  "kernels at every batch, on Hopper warpgroup-MMA kernels from batch 16, dequantize + GEMM the "
                  "tuner's fallback; measured faster than rows from batch 2 up, slower at batch 1). Shapes that do not fit stay rows"},
    )  # fmt: skip
    quant_cpu_kernels: Literal["auto", "reference"] = field(
        default="auto",
        metadata={"help": "quantized layers on the CPU: auto (bfloat16 batches of up to quant_gemv_max_batch rows "
                  "run PyTorch's packed int4/int8 kernels; the rest a dense matmul) or reference (float32 "
                  "dequantize-then-matmul for every call)"},
    )  # fmt: skip
    quant_dispatch: Literal["tune", "fixed"] = field(
        default="tune",
        metadata={"help": "tune: each quantized layer times its kernels once per batch bucket (CUDA) and keeps the "
                  "fastest; fixed: the two batch thresholds above decide"},
    )  # fmt: skip
    kv_cache_dtype: Literal["auto", "fp8_e4m3"] = field(
        default="auto", metadata={"help": "KV cache storage: auto (the model dtype) or fp8_e4m3 with per-layer scales"}
    )
    speculative: str = field(
        default="none",
        metadata={"help": "speculative decoding: none, ngram (prompt lookup) or model (a draft model; decode asks "
                  "the Draft service, generate --local runs it in-process)"},
    )  # fmt: skip
    num_speculative_tokens: int = field(
        default=4, metadata={"help": "most draft tokens verified per sequence per step (k)", "min": 1, "max": 16}
    )
    spec_adaptive: bool = field(
        default=True,
        metadata={"help": "choose k per step from the sequences' acceptance and measured step costs; off: always k"},
    )
    spec_max_batch_size: int = field(
        default=16, metadata={"help": "no speculation when more sequences than this are running", "min": 1}
    )
    spec_probe_interval: int = field(
        default=16, metadata={"help": "steps before a batch that stopped speculating tries again", "min": 1}
    )
    spec_prior_token_cost: float = field(
        default=0.1, metadata={"help": "assumed cost of one extra query token vs a 1-token step, until measured",
                               "min": 0.0}
    )  # fmt: skip
    spec_min_gain: float = field(
        default=0.1,
        metadata={"help": "speculate only when the predicted throughput beats a plain step by this fraction: the "
                  "margin that keeps prediction error from making speculation slower than none", "min": 0.0},
    )
    spec_verify_graphs: bool = field(
        default=True,
        metadata={"help": "CUDA only: also capture graphs of verify steps (every batch bucket up to spec_max_batch_size "
                  "x query length 2..k+1, at most 8); off: verify steps run eagerly, saving capture time and memory"},
    )  # fmt: skip
    spec_draft_layers: int = field(
        default=8, metadata={"help": "in-process self-draft (speculative=model): the target's first N layers", "min": 1}
    )

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(name, "must be >= 1")
        if not 1 <= self.tensor_parallel_size <= 64:
            raise InvalidArgumentError("tensor_parallel_size", "must be in [1, 64]")
        if self.max_waiting < 0:
            raise InvalidArgumentError("max_waiting", "must be >= 0")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise InvalidArgumentError("attention_backend", f"unknown backend {self.attention_backend!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidArgumentError("dtype", f"unknown dtype {self.dtype!r}")
        if self.quantization not in ("none", "int8", "int4", "fp8", "gguf"):
            raise InvalidArgumentError("quantization", f"unknown quantization {self.quantization!r}")
        if self.quant_group_size not in (32, 64, 128):
            raise InvalidArgumentError("quant_group_size", "must be 32, 64 or 128")
        if self.quant_awq and self.quantization != "int4":
            raise InvalidArgumentError("quant_awq", "applies to --quantization int4 only")
        if self.kv_cache_dtype not in ("auto", "fp8_e4m3"):
            raise InvalidArgumentError("kv_cache_dtype", f"unknown KV cache dtype {self.kv_cache_dtype!r}")
        if self.tensor_parallel_size > 1 and (self.quantization != "none" or self.kv_cache_dtype != "auto"):
            # Not yet: the ranks' shards and KV gathers assume unquantized weights and pages.
            field = "quantization" if self.quantization != "none" else "kv_cache_dtype"
            raise InvalidArgumentError(field, "is not supported with tensor_parallel_size > 1 yet")
        if self.speculative not in ("none", "ngram", "model"):
            raise InvalidArgumentError("speculative", f"must be none, ngram or model, got {self.speculative!r}")

    def speculative_config(self):
        """The speculator's knobs (imported here so the config module stays dependency-free)."""
        from stageserve.engine.speculative import SpeculativeConfig

        return SpeculativeConfig(
            self.num_speculative_tokens, self.spec_adaptive, self.spec_max_batch_size, self.spec_probe_interval,
            self.spec_prior_token_cost, self.spec_min_gain,
        )
