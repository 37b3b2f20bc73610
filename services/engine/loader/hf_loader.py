"""Load a Hugging Face model directory: `config.json`, `*.safetensors`, and the tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from stageserve.common.errors import ModelLoadError
from stageserve.engine.config import ModelConfig, RopeScaling
from stageserve.engine.loader.weights import LoadedModel, model_shard, progress

_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def config_from_hf(raw: dict, name: str) -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(f"unsupported architectures {archs} (supported: {sorted(_ARCHITECTURES)})")
    # transformers >= 5 writes `rope_parameters` (holding rope_theta too); older versions write
    # `rope_scaling` plus a top-level `rope_theta`. Read both, or Llama 3 scaling is silently lost.
    scaling = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in (None, "default", "llama3"):
        raise ModelLoadError(f"unsupported rope_scaling type {rope_type!r}")
    _check_supported(raw, arch)
    try:
        return _model_config(raw, arch, scaling, rope_type, name)
    except KeyError as exc:
        raise ModelLoadError(f"config.json lacks {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"config.json is malformed ({exc})") from exc


def _check_supported(raw: dict, arch: str) -> None:
    """Reject variants the model would otherwise run silently wrong (their extra weights go unread)."""
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"unsupported hidden_act {raw['hidden_act']!r} (only silu)")
    if raw.get("mlp_bias"):
        raise ModelLoadError("unsupported mlp_bias: the MLP has no biases")
    if arch != "qwen2" and raw.get("attention_bias"):
        raise ModelLoadError(f"unsupported attention_bias on {arch}: it would also bias o_proj")


def _model_config(raw: dict, arch: str, scaling: dict, rope_type: str | None, name: str) -> ModelConfig:
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        max_position_embeddings=_context_limit(raw, arch),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_theta=scaling.get("rope_theta", raw.get("rope_theta", 10000.0)),
        rope_scaling=RopeScaling(
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        )
        if rope_type == "llama3"
        else None,
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=raw.get("attention_bias", arch == "qwen2"),
        name=name,
    )


def load_hf_dir(path: Path, tp=None) -> LoadedModel:
    """With `tp` (a `TPRank`), each tensor is read only over that rank's rows or columns."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file}: invalid JSON ({exc})") from exc
    config = config_from_hf(raw, path.name)
    shard = model_shard(config, tp)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
                with progress(len(keys), f"loading {file.name}") as bar:
                    for key in keys:
                        state[key] = f.get_tensor(key) if shard is None else _read_shard(f, key, shard)
                        bar.update()
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(f"{path}: unreadable safetensors ({exc})") from exc
    tokenizer = path if (path / "tokenizer.json").is_file() else None
    return LoadedModel(config=config, state_dict=state, tokenizer_source=tokenizer, source=str(path), shard=shard)


def _read_shard(f, key: str, shard) -> torch.Tensor:
    """Read only this rank's rows (or columns) of one tensor from the file."""
    from stageserve.engine.parallel.sharding import pad_to

    part = f.get_slice(key)
    region = shard.region(key, tuple(part.get_shape()))
    if region is None:
        return part[:]
    index = slice(region.start, region.stop)
    return pad_to(part[index] if region.dim == 0 else part[:, index], region)


def _context_limit(raw: dict, arch: str) -> int:
    """The model's context, capped at its sliding window if it has one: our attention is full, which
    equals sliding-window attention only while the whole context fits in the window."""
    limit = raw.get("max_position_embeddings") or 4096
    window = raw.get("sliding_window")
    if window and raw.get("use_sliding_window", arch == "mistral"):  # Qwen2 carries a window it does not use
        limit = min(limit, window)
    return limit
