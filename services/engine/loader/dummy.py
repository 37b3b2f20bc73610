"""Random weights of a named shape, for benchmarks where the values do not matter.

Weights are drawn on the target device in the target dtype, so an 8B shape never touches host memory.
Each block of `_ROWS` rows of each tensor has its own seed, so a tensor-parallel rank draws only the
blocks its slice touches and gets exactly the values a single-GPU load holds there.
"""

from __future__ import annotations

import zlib

import torch

from stageserve.common.errors import ModelLoadError
from stageserve.engine.config import ModelConfig, RopeScaling
from stageserve.engine.loader.weights import LoadedModel, model_shard, progress
from stageserve.engine.parallel.sharding import pad_to

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
    "llama-3-70b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, name="dummy:llama-3-70b",
    ),
    # Tiny shapes for fast unit tests of the engine's bookkeeping.
    "tiny": ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
        name="dummy:tiny",
    ),
    # 3 KV heads over 2 ranks split unevenly (1 and 2 groups), as SmolLM2's do.
    "tiny-gqa3": ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=96, intermediate_size=128, num_layers=2,
        num_heads=6, num_kv_heads=3, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
        name="dummy:tiny-gqa3",
    ),
    # Untied head, q/k/v biases, one KV head (replicated under tensor parallelism), a vocab no TP size divides.
    "tiny-qwen2": ModelConfig(
        architecture="qwen2", vocab_size=509, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=1, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_theta=1000000.0, attention_bias=True, name="dummy:tiny-qwen2",
    ),
}
_ROWS = 1024  # rows per seeded block


def dummy_state_dict(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0, shard=None
) -> dict[str, torch.Tensor]:
    """Random N(0, 0.02) weights and unit norms; with `shard` (a `ModelShard`), only its slices."""
    gen = torch.Generator(device=device)
    h, q, kv, inter = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size

    def rand(name: str, *shape: int) -> torch.Tensor:
        region = shard.region(name, shape) if shard is not None else None
        dim, start, stop = (0, 0, shape[0]) if region is None else (region.dim, region.start, region.stop)
        first, last = (start, stop) if dim == 0 else (0, shape[0])
        blocks = []
        for b in range(first // _ROWS, -(-last // _ROWS)):
            gen.manual_seed(zlib.crc32(f"{seed}:{name}:{b}".encode()))
            rows = min(_ROWS, shape[0] - b * _ROWS)
            block = torch.randn(rows, *shape[1:], generator=gen, device=device, dtype=torch.float32)
            lo, hi = max(first - b * _ROWS, 0), min(last - b * _ROWS, rows)
            block = block[lo:hi] if dim == 0 else block[:, start:stop]
            blocks.append((block * 0.02).to(dtype))
        out = torch.cat(blocks)
        return out if region is None else pad_to(out, region)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    state = {"model.embed_tokens.weight": rand("model.embed_tokens.weight", config.vocab_size, h), "model.norm.weight": ones(h)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = rand("lm_head.weight", config.vocab_size, h)
    shapes = {
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }  # fmt: skip
    if config.attention_bias:
        shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    with progress(config.num_layers, f"generating {config.name}") as bar:
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            state |= {p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h)}
            state |= {p + name: rand(p + name, *shape) for name, shape in shapes.items()}
            bar.update()
    return state


def load_dummy(shape: str, device: torch.device | None = None, dtype: torch.dtype | None = None, tp=None) -> LoadedModel:
    if shape not in DUMMY_SHAPES:
        raise ModelLoadError(f"unknown dummy shape {shape!r}; known: {', '.join(DUMMY_SHAPES)}")
    config = DUMMY_SHAPES[shape]
    shard = model_shard(config, tp)
    state = dummy_state_dict(config, device or torch.device("cpu"), dtype or torch.float32, shard=shard)
    return LoadedModel(config=config, state_dict=state, tokenizer_source=None, source=f"dummy:{shape}", shard=shard)
