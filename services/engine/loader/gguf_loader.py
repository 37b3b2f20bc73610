"""Load a GGUF file: F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, dequantized at load, or with `keep_blocks`
the projections' Q4_0/Q4_1/Q8_0 blocks repacked into `PackedWeight`s for the quantized kernels.

llama.cpp's converter permutes the rows of q and k so that rotary pairs are interleaved (GPT-J
style); our model, like HF's, rotates halves, so those rows are permuted back here. Only the
`llama` architecture is permuted: llama.cpp stores Qwen2 in NEOX (rotate-half) order already.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from stageserve.common.errors import ModelLoadError
from stageserve.engine.config import ModelConfig
from stageserve.engine.loader.weights import LoadedModel, model_shard, progress

SUPPORTED_TYPES = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.BF16,
    gguf.GGMLQuantizationType.Q8_0,
    gguf.GGMLQuantizationType.Q4_0,
    gguf.GGMLQuantizationType.Q4_1,
}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}


def read_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF file, turning every parse failure into a ModelLoadError."""
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on corrupt input
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def field_value(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader: gguf.GGUFReader, name: str) -> ModelConfig:
    """The model's shape from a GGUF file's metadata; `name` is used when the file has no general.name."""
    arch = field_value(reader, "general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} (supported: llama, mistral, qwen2)")

    def key(suffix: str, default=None):
        value = field_value(reader, f"{arch}.{suffix}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{suffix}")
        return value

    # Llama 3 scaling arrives as a rope_freqs tensor; linear or YaRN scaling would be silently ignored.
    scaling = field_value(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelLoadError(f"unsupported GGUF rope scaling type {scaling!r}")
    tensors = {t.name: t for t in reader.tensors}
    try:  # wrong value types (e.g. per-layer head counts) or inconsistent shapes
        hidden = int(key("embedding_length"))
        num_heads = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", hidden // num_heads))
        rope_dim = int(key("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise ModelLoadError(f"partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported")
        return ModelConfig(
            architecture=arch,
            vocab_size=int(field_value(reader, f"{arch}.vocab_size") or _vocab_size(reader, tensors)),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(key("context_length")),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            name=str(field_value(reader, "general.name") or name),
        )
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"GGUF metadata of {arch!r} model is invalid ({exc})") from exc


def _vocab_size(reader: gguf.GGUFReader, tensors: dict[str, gguf.ReaderTensor]) -> int:
    """Without `<arch>.vocab_size`: the embedding's row count, else the tokenizer's token count."""
    if "token_embd.weight" in tensors:
        return int(tensors["token_embd.weight"].shape[-1])  # GGUF lists dims fastest first: [hidden, vocab]
    if "tokenizer.ggml.tokens" in reader.fields:
        return len(reader.fields["tokenizer.ggml.tokens"].data)
    raise ModelLoadError("GGUF file has no vocab_size, token_embd.weight or tokenizer.ggml.tokens")


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: interleaved rotary pairs back to rotate-half order."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


# Block types kept packed under keep_blocks (only projection weights: embeddings and norms are dequantized).
_KEPT_TYPES = {
    gguf.GGMLQuantizationType.Q4_0: "q4_0",
    gguf.GGMLQuantizationType.Q4_1: "q4_1",
    gguf.GGMLQuantizationType.Q8_0: "q8_0",
}


def load_gguf(path: Path, name: str | None = None, tp=None, keep_blocks: bool = False) -> LoadedModel:
    """Dequantize tensor by tensor; with `tp` (a `TPRank`) keep only that rank's slice of each; with
    `keep_blocks`, projection weights stay in their Q4_0/Q4_1/Q8_0 blocks (EngineConfig forbids both)."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    reader = read_gguf(path)
    config = config_from_gguf(reader, name or path.stem)
    if name:
        config = ModelConfig(**{**config.__dict__, "name": name})
    shard = model_shard(config, tp)
    state: dict[str, torch.Tensor] = {}
    projection_types: set[str] = set()
    with progress(len(reader.tensors), f"loading {path.name}") as bar:
        for tensor in reader.tensors:
            bar.update()
            target = hf_name(tensor.name)
            if target is None:
                continue
            if tensor.tensor_type not in SUPPORTED_TYPES:
                raise ModelLoadError(f"{tensor.name}: GGUF type {tensor.tensor_type.name} is not supported")
            if target.endswith("_proj.weight"):
                projection_types.add(tensor.tensor_type.name)
            if keep_blocks and tensor.tensor_type in _KEPT_TYPES and target.endswith(("_proj.weight", "lm_head.weight")):
                state[target] = _packed(path, tensor, config)
                continue
            try:
                array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except Exception as exc:  # truncated or mis-sized data
                raise ModelLoadError(f"{path}: tensor {tensor.name} is corrupt ({exc})") from exc
            if config.architecture in ("llama", "mistral"):
                if tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
                    array = unpermute_rows(array, config.num_heads)
                elif tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
                    array = unpermute_rows(array, config.num_kv_heads)
            array = np.ascontiguousarray(array, dtype=np.float32)
            weight = torch.from_numpy(array if array.flags.writeable else array.copy())
            state[target] = shard.apply(target, weight) if shard is not None else weight
    if "model.embed_tokens.weight" not in state:
        raise ModelLoadError(f"{path}: no token_embd.weight tensor")
    return LoadedModel(
        config=config, state_dict=state, tokenizer_source=path, source=str(path), shard=shard,
        extra={"gguf_projection_types": sorted(projection_types)},
    )  # fmt: skip


def _packed(path: Path, tensor: gguf.ReaderTensor, config: ModelConfig):
    """A projection's blocks as a PackedWeight, q/k rows un-permuted like the dequantized path's."""
    from stageserve.engine.quant.formats import repack_gguf

    raw = np.asarray(tensor.data)  # [rows, row bytes]: GGUF blocks run along a row, so rows move whole
    if config.architecture in ("llama", "mistral"):
        if tensor.name.endswith("attn_q.weight"):
            raw = unpermute_rows(raw, config.num_heads)
        elif tensor.name.endswith("attn_k.weight"):
            raw = unpermute_rows(raw, config.num_kv_heads)
    try:
        return repack_gguf(raw, _KEPT_TYPES[tensor.tensor_type], int(tensor.shape[0]))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: tensor {tensor.name} is corrupt ({exc})") from exc
