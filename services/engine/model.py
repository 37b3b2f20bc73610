"""The Llama-family decoder: Llama 2/3, Mistral, SmolLM2 and Qwen2.

Tokens of all sequences in a step are packed into one flat batch (`[num_tokens, ...]`); attention
is the only place that needs to know where one sequence ends, and it reads that from the
`AttentionMetadata` passed into `forward()`. q/k/v and gate/up projections are fused into one
matmul each at load time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from stageserve.common.errors import ModelLoadError
from stageserve.engine.attention import AttentionBackend, AttentionMetadata
from stageserve.engine.config import ModelConfig, RopeScaling
from stageserve.engine.ops import TorchOps
from stageserve.engine.quant.linear import QuantSpec, cat_weights, load_linear, make_linear


class RMSNorm(nn.Module):
    """Holds the norm's weight and epsilon; the math lives in the model's `ops` (fused on GPU)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TorchOps.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]`, with Llama 3 frequency-dependent scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Long wavelengths are divided by `factor`, short ones kept, the band between interpolated."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a float32 cos/sin table over every position the model supports."""

    def __init__(self, config: ModelConfig, freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config, self.freq_factors = config, freq_factors
        shape = (config.max_position_embeddings, config.head_dim // 2)
        self.register_buffer("cos", torch.empty(shape), persistent=False)
        self.register_buffer("sin", torch.empty(shape), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the tables in float32 on the buffers' device, e.g. after `to_empty` or `to(dtype)`."""
        if self.cos.is_meta:
            return
        device = self.cos.device
        inv_freq = rope_inv_freq(self.config)
        if self.freq_factors is not None:  # llama.cpp stores Llama 3 scaling as per-frequency divisors
            inv_freq = inv_freq / self.freq_factors.float().cpu()
        positions = torch.arange(self.config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_pos, head_dim // 2]
        self.cos = freqs.cos().to(device)
        self.sin = freqs.sin().to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for a step's positions, each [num_tokens, 1, head_dim // 2]; done once per step."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [num_tokens, heads, head_dim] -> same."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, quant: QuantSpec | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = make_linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias, quant)
        self.o_proj = make_linear(self.q_size, config.hidden_size, False, quant)
        self.backend = backend
        self.scale = self.head_dim**-0.5
        self.kv_scale: tuple[float, float] | None = None  # (k, v) dequant scales of an fp8 KV cache

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], kv_cache, meta: AttentionMetadata):
        qkv = self.qkv_proj(x)  # [num_tokens, q_size + 2 * kv_size]
        heads = self.num_heads + self.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        if self.backend.fuses_rope:  # rotation happens inside the backend's cache write
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            out = self.backend.forward_rope(q, k, v, rope, kv_cache, meta, self.scale)
        else:
            # q and k rotate together: one set of RoPE ops per layer instead of two.
            q, k = apply_rope(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)
            extra = {} if self.kv_scale is None else {"kv_scale": self.kv_scale}
            out = self.backend.forward(q, k, v, kv_cache, meta, self.scale, **extra)  # [num_tokens, heads, head_dim]
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ops, quant: QuantSpec | None = None):
        super().__init__()
        self.gate_up_proj = make_linear(config.hidden_size, 2 * config.intermediate_size, False, quant)
        self.down_proj = make_linear(config.intermediate_size, config.hidden_size, False, quant)
        self.ops = ops

    def forward(self, x):
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual stream is carried alongside, so each norm fuses the add before it."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops, quant: QuantSpec | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend, quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, ops, quant)
        self.ops = ops

    def forward(self, x, residual, rope, kv_cache, meta):
        """x: this layer's input delta; residual: the stream so far (None before the first layer)."""
        norm = self.input_layernorm
        if residual is None:
            residual, h = x, self.ops.rms_norm(x, norm.weight, norm.eps)
        else:
            h, residual = self.ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        h = self.self_attn(h, rope, kv_cache, meta)
        norm = self.post_attention_layernorm
        h, residual = self.ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Decoder stack plus LM head. `forward` returns hidden states; `compute_logits` projects chosen rows."""

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, freq_factors: torch.Tensor | None = None, ops=TorchOps,
        quant: QuantSpec | None = None,
    ):  # fmt: skip
        super().__init__()
        self.config = config
        self.ops = ops
        self.rope = RotaryEmbedding(config, freq_factors)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, backend, ops, quant) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # An untied head is a projection like the others. A tied one shares the (float) embedding, or with
        # `tied_head_int8` computes logits from a per-channel INT8 copy of it (the embedding stays for lookups).
        self.head_copies_embedding = config.tie_word_embeddings and quant is not None and quant.tied_head_int8
        if self.head_copies_embedding:
            head_quant = replace(quant, method="int8", awq=False)
        else:
            head_quant = quant if quant is not None and quant.quantize_lm_head and not config.tie_word_embeddings else None
        self.lm_head = make_linear(config.hidden_size, config.vocab_size, False, head_quant)
        if config.tie_word_embeddings and not self.head_copies_embedding:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],  # per layer: [2, num_blocks, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
        on_layer: Callable[[int], None] | None = None,  # called once layer i's KV is written (queued, on GPU)
    ) -> torch.Tensor:  # [num_tokens, hidden]
        x = self.embed_tokens(input_ids)
        rope = self.rope.lookup(positions, x.dtype)
        residual = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x, residual = layer(x, residual, rope, kv_cache, meta)
            if on_layer is not None:
                on_layer(i)
        return self.ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] in float32, whatever the model's dtype."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in HF's Llama into this model, fusing q/k/v and gate/up.

        Projection weights may be float tensors or `PackedWeight`s (GGUF blocks kept packed); each
        projection layer quantizes or keeps them as its `QuantSpec` says.
        """
        cfg, taken = self.config, set()
        device = self.embed_tokens.weight.device

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise ModelLoadError(f"weights lack {name}")
            taken.add(name)
            return state[name]

        def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
            if param.shape != value.shape:
                raise ModelLoadError(f"{name}: shape {tuple(value.shape)} != expected {tuple(param.shape)}")
            param.copy_(value)

        put(self.embed_tokens.weight, take("model.embed_tokens.weight"), "model.embed_tokens.weight")
        put(self.norm.weight, take("model.norm.weight"), "model.norm.weight")
        if self.head_copies_embedding:
            load_linear(self.lm_head, self.embed_tokens.weight, "lm_head (INT8 copy of the tied embedding)", device)
        elif cfg.tie_word_embeddings:  # re-tie: moving off the meta device unties shared parameters
            self.lm_head.weight = self.embed_tokens.weight
        else:
            load_linear(self.lm_head, take("lm_head.weight"), "lm_head.weight", device)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            qkv = cat_weights([take(attn + f"{n}_proj.weight") for n in "qkv"])
            load_linear(layer.self_attn.qkv_proj, qkv, attn + "qkv", device)
            if cfg.attention_bias:
                bias = torch.cat([take(attn + f"{n}_proj.bias") for n in "qkv"])
                put(layer.self_attn.qkv_proj.bias, bias, attn + "qkv bias")
            load_linear(layer.self_attn.o_proj, take(attn + "o_proj.weight"), attn + "o_proj", device)
            gate_up = cat_weights([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
            load_linear(layer.mlp.gate_up_proj, gate_up, p + "mlp.gate_up", device)
            load_linear(layer.mlp.down_proj, take(p + "mlp.down_proj.weight"), p + "mlp.down_proj", device)
            put(layer.input_layernorm.weight, take(p + "input_layernorm.weight"), p + "input_layernorm")
            put(layer.post_attention_layernorm.weight, take(p + "post_attention_layernorm.weight"), p + "post_norm")
        ignorable = {"rope_freqs", "lm_head.weight"} if cfg.tie_word_embeddings else {"rope_freqs"}
        unused = sorted(set(state) - taken - ignorable)
        if unused:  # an unsupported variant (extra biases, other layers) would otherwise run silently wrong
            raise ModelLoadError(f"weights not used by the model: {', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
