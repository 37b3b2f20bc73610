"""Random weights of a named shape, for benchmarks where the values do not matter.

Weights are drawn on the target device in the target dtype, so an 8B shape never touches host memory.
"""

from __future__ import annotations

import torch

from stageserve.common.errors import ModelLoadError
from stageserve.engine.config import ModelConfig, RopeScaling
from stageserve.engine.loader.weights import LoadedModel

DUMMY_SHAPES: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, name="dummy:smollm2-135m",
    ),
    "llama-3.2-1b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
        name="dummy:llama-3.2-1b",
    ),
    "llama-3-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, name="dummy:llama-3-8b",
    ),
    "qwen2.5-0.5b": ModelConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=True, name="dummy:qwen2.5-0.5b",
    ),
    # A tiny shape for fast unit tests of the engine's bookkeeping.
    "tiny": ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
        name="dummy:tiny",
    ),
}


def dummy_state_dict(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    state = {"model.embed_tokens.weight": rand(config.vocab_size, h), "model.norm.weight": ones(h)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = rand(config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": ones(h),
            p + "post_attention_layernorm.weight": ones(h),
            p + "self_attn.q_proj.weight": rand(q, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(config.intermediate_size, h),
            p + "mlp.up_proj.weight": rand(config.intermediate_size, h),
            p + "mlp.down_proj.weight": rand(h, config.intermediate_size),
        }
        if config.attention_bias:
            state |= {p + "self_attn.q_proj.bias": rand(q), p + "self_attn.k_proj.bias": rand(kv),
                      p + "self_attn.v_proj.bias": rand(kv)}
    return state


def load_dummy(shape: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    if shape not in DUMMY_SHAPES:
        raise ModelLoadError(f"unknown dummy shape {shape!r}; known: {', '.join(DUMMY_SHAPES)}")
    config = DUMMY_SHAPES[shape]
    state = dummy_state_dict(config, device or torch.device("cpu"), dtype or torch.float32)
    return LoadedModel(config=config, state_dict=state, tokenizer_source=None, source=f"dummy:{shape}")
