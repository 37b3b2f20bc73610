"""Model loaders: HF directories and GGUF files against reference weights and Hugging Face's own forward
pass, corrupt inputs, the dummy shapes, and the default model's metadata."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from stageserve.common.errors import ModelLoadError
from stageserve.engine.attention import AttentionMetadata
from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.loader.dummy import DUMMY_SHAPES
from stageserve.engine.loader.weights import LoadedModel, load_model
from stageserve.sample.params import SamplingParams

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 256, 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
Q = gguf.GGMLQuantizationType


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def random_prompt(length: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_tokens(loaded: LoadedModel, prompt: list[int], **engine_kwargs) -> list[int]:
    config = EngineConfig(**{"num_blocks": 64, "block_size": 16, "dtype": "float32", "device": "cpu", **engine_kwargs})
    (request,) = LLMEngine(loaded, config).generate([prompt], GREEDY)
    return request.output_token_ids


def prefill_logits(loaded: LoadedModel, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab] from one prefill of our model over the paged cache (blocks 0, 1, ...)."""
    engine = LLMEngine(loaded, EngineConfig(num_blocks=64, block_size=16, dtype="float32", device="cpu"))
    runner, n, bs = engine.runner, len(prompt), 16
    num_blocks = -(-n // bs)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        block_tables=torch.arange(num_blocks).unsqueeze(0),
        seq_lens=torch.tensor([n]),
        query_start_loc=[0, n],
        seq_lens_host=[n],
        max_seq_len=n,
    )
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(prompt), torch.arange(n), runner.kv_caches, meta)
        return runner.model.compute_logits(hidden)


# ============================================================================================== HF dirs

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def hf_config(kind: str):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    if kind == "llama-gqa":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False), transformers.LlamaForCausalLM
    if kind == "llama3-rope":
        config = transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False)
        return config, transformers.LlamaForCausalLM
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
        return config, transformers.Qwen2ForCausalLM
    if kind == "mistral":
        return transformers.MistralConfig(**common, tie_word_embeddings=False), transformers.MistralForCausalLM
    raise AssertionError(kind)


def build_hf_model(kind: str, seed: int = 0):
    """A tiny HF model with weights large enough that positions, biases and norms visibly matter."""
    config, cls = hf_config(kind)
    torch.manual_seed(seed)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.3 * noise)
            else:
                param.copy_(0.2 * noise)
    model.generation_config.eos_token_id = None  # our side runs with ignore_eos
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=["llama-gqa", "llama3-rope", "qwen2", "mistral"])
def hf_model(request, tmp_path_factory):
    model = build_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path


def hf_greedy(model, prompt: list[int], n: int = 8) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():  # an explicit mask: HF would otherwise mask prompt tokens equal to pad_token_id
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == n
    return tokens


def test_hf_config_is_read(hf_model):
    kind, model, path = hf_model
    config = load_model(str(path)).config
    hf = model.config
    assert config.architecture == {"llama-gqa": "llama", "llama3-rope": "llama"}.get(kind, kind)
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (VOCAB, HIDDEN, INTERMEDIATE)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    assert config.max_position_embeddings == 256 and config.rms_norm_eps == pytest.approx(1e-5)
    assert config.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"])
    assert config.tie_word_embeddings == (kind == "qwen2")
    assert config.attention_bias == (kind == "qwen2")
    if kind == "llama3-rope":
        s = config.rope_scaling
        assert s is not None
        assert (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (8.0, 1.0, 4.0, 64)
    else:
        assert config.rope_scaling is None


def test_hf_prefill_logits_match(hf_model):
    _, model, path = hf_model
    prompt = random_prompt(50)
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].float()
    ours = prefill_logits(load_model(str(path)), prompt)
    assert expected.std() > 0.5  # the comparison below means something
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("engine_kwargs", [{}, {"block_size": 4, "max_num_batched_tokens": 7}], ids=["one-prefill", "chunked"])
def test_hf_greedy_generation_matches(hf_model, engine_kwargs):
    _, model, path = hf_model
    prompt = random_prompt(50)
    expected = hf_greedy(model, prompt)
    assert len(set(expected)) > 1  # not a degenerate model that repeats one token
    assert greedy_tokens(load_model(str(path)), prompt, **engine_kwargs) == expected


def test_hf_dir_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid JSON"):
        load_model(str(tmp_path))
    raw = hf_config("llama-gqa")[0].to_dict() | {"architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="unreadable safetensors"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(raw | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architectures"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "hidden_size"}))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        load_model(str(tmp_path))
    rope = raw | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}
    (tmp_path / "config.json").write_text(json.dumps(rope))
    with pytest.raises(ModelLoadError, match="yarn"):
        load_model(str(tmp_path))
    for bad, match in [({"hidden_act": "gelu"}, "hidden_act"), ({"mlp_bias": True}, "mlp_bias"), ({"attention_bias": True}, "o_proj")]:
        (tmp_path / "config.json").write_text(json.dumps(raw | bad))
        with pytest.raises(ModelLoadError, match=match):
            load_model(str(tmp_path))


def test_hf_config_of_older_transformers_is_read(tmp_path):
    """transformers < 5 wrote `rope_scaling` and a top-level `rope_theta` instead of `rope_parameters`."""
    from stageserve.engine.loader.hf_loader import config_from_hf

    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
    }
    config = config_from_hf(raw, "old")
    assert config.rope_theta == 500000.0 and config.rope_scaling.factor == 8.0
    assert config.head_dim == HEAD_DIM and not config.tie_word_embeddings
    assert config.max_position_embeddings == 4096  # the default when the key is absent


@pytest.mark.parametrize(
    "arch, extra, limit",
    [
        ("MistralForCausalLM", {"sliding_window": 64}, 64),  # Mistral 7B v0.1: windowed, our attention is full
        ("MistralForCausalLM", {"sliding_window": None}, 256),  # v0.2 and later
        ("MistralForCausalLM", {"sliding_window": 1024}, 256),
        ("Qwen2ForCausalLM", {"sliding_window": 64, "use_sliding_window": False}, 256),
        ("Qwen2ForCausalLM", {"sliding_window": 64, "use_sliding_window": True}, 64),
    ],
)
def test_context_is_capped_at_a_sliding_window(arch, extra, limit):
    from stageserve.engine.loader.hf_loader import config_from_hf

    raw = {
        "architectures": [arch],
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": 256,
        **extra,
    }
    assert config_from_hf(raw, "m").max_position_embeddings == limit


# ============================================================================================== GGUF

GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q and k rows of llama models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantized(w: np.ndarray, qtype) -> np.ndarray:
    """What a reader gets back from a tensor stored as qtype."""
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def random_hf_state(*, tied: bool, bias: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.2

    state = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": 1 + rand(HIDDEN)}
    if not tied:
        state["lm_head.weight"] = rand(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": 1 + rand(HIDDEN),
            p + "post_attention_layernorm.weight": 1 + rand(HIDDEN),
            p + "self_attn.q_proj.weight": rand(q, HIDDEN),
            p + "self_attn.k_proj.weight": rand(kv, HIDDEN),
            p + "self_attn.v_proj.weight": rand(kv, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, q),
            p + "mlp.gate_proj.weight": rand(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": rand(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, INTERMEDIATE),
        }
        if bias:
            state |= {p + "self_attn.q_proj.bias": rand(q), p + "self_attn.k_proj.bias": rand(kv), p + "self_attn.v_proj.bias": rand(kv)}
    return state


def gguf_layout(hf_name: str, w: np.ndarray, arch: str, num_heads: int, num_kv_heads: int) -> np.ndarray:
    if arch in ("llama", "mistral") and ".q_proj." in hf_name:
        return permute(w, num_heads)
    if arch in ("llama", "mistral") and ".k_proj." in hf_name:
        return permute(w, num_kv_heads)
    return w


def write_gguf(
    path: Path,
    state: dict[str, np.ndarray],
    qtype=Q.F32,
    *,
    arch: str = "llama",
    num_heads: int = HEADS,
    num_kv_heads: int = KV_HEADS,
    rope_theta: float = 10000.0,
    context_length: int = 256,
    with_vocab_size: bool = True,
    tokens: list[str] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    skip_keys: tuple[str, ...] = (),
    extra_metadata=None,
) -> Path:
    """A GGUF file as llama.cpp's converter would write it: 2-D weights in qtype, 1-D ones in F32."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test-model")
    metadata = {
        "block_count": (writer.add_block_count, LAYERS),
        "context_length": (writer.add_context_length, context_length),
        "embedding_length": (writer.add_embedding_length, HIDDEN),
        "feed_forward_length": (writer.add_feed_forward_length, INTERMEDIATE),
        "head_count": (writer.add_head_count, num_heads),
        "head_count_kv": (writer.add_head_count_kv, num_kv_heads),
        "rms_eps": (writer.add_layer_norm_rms_eps, 1e-5),
        "freq_base": (writer.add_rope_freq_base, rope_theta),
    }
    for key, (add, value) in metadata.items():
        if key not in skip_keys:
            add(value)
    if with_vocab_size:
        writer.add_vocab_size(VOCAB)
    if tokens is not None:
        writer.add_token_list(tokens)
    if extra_metadata is not None:
        extra_metadata(writer)
    for hf_name, w in state.items():
        w = gguf_layout(hf_name, w, arch, num_heads, num_kv_heads)
        if w.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(gguf_name(hf_name), w.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name(hf_name), w.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    for name, w in (extra_tensors or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Worst-case |dequantized - original| relative to the tensor's largest magnitude.
QUANT_TOLERANCE = {Q.F16: 1e-3, Q.BF16: 1 / 128, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 14}


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_weights_come_back_in_hf_layout(tmp_path, qtype, tied):
    state = random_hf_state(tied=tied)
    path = write_gguf(tmp_path / "m.gguf", state, qtype)
    loaded = load_model(str(path))
    config = loaded.config
    assert config.architecture == "llama" and config.name == "tiny-test-model"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers) == (VOCAB, HIDDEN, INTERMEDIATE, LAYERS)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert config.tie_word_embeddings == tied and not config.attention_bias
    assert set(loaded.state_dict) == set(state)
    for name, original in state.items():
        got = loaded.state_dict[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == original.shape, name
        got = got.numpy()
        if qtype == Q.F32 or original.ndim == 1:
            np.testing.assert_array_equal(got, original, err_msg=name)
            continue
        # Exactly what the file holds, rows put back where HF has them...
        stored = quantized(gguf_layout(name, original, "llama", HEADS, KV_HEADS), qtype)
        np.testing.assert_array_equal(gguf_layout(name, got, "llama", HEADS, KV_HEADS), stored, err_msg=name)
        # ...and so within quantization error of the original.
        assert np.abs(got - original).max() <= QUANT_TOLERANCE[qtype] * np.abs(original).max(), name


def test_gguf_qwen2_is_not_permuted_and_has_biases(tmp_path):
    state = random_hf_state(tied=True, bias=True)
    loaded = load_model(str(write_gguf(tmp_path / "q.gguf", state, arch="qwen2")))
    assert loaded.config.architecture == "qwen2" and loaded.config.attention_bias
    for name, original in state.items():
        np.testing.assert_array_equal(loaded.state_dict[name].numpy(), original, err_msg=name)


def test_gguf_vocab_size_falls_back_to_the_embedding(tmp_path):
    state = random_hf_state(tied=True)
    path = write_gguf(tmp_path / "m.gguf", state, with_vocab_size=False)
    assert load_model(str(path)).config.vocab_size == VOCAB
    tokens = [f"t{i}" for i in range(VOCAB)]
    path = write_gguf(tmp_path / "t.gguf", state, with_vocab_size=False, tokens=tokens)
    assert load_model(str(path)).config.vocab_size == VOCAB


def hf_model_to_gguf(model, path: Path, *, rope_theta: float, rope_freqs: np.ndarray | None = None) -> LoadedModel:
    state = {k: v.float().numpy() for k, v in model.state_dict().items() if "rotary" not in k}
    extra = {"rope_freqs.weight": rope_freqs.astype(np.float32)} if rope_freqs is not None else None
    write_gguf(path, state, arch="llama", rope_theta=rope_theta, extra_tensors=extra)
    return load_model(str(path))


def llama3_rope_factors(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """llama.cpp's converter: Llama 3 scaling stored as per-frequency divisors of inv_freq."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < s["original_max_position_embeddings"] / s["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > s["original_max_position_embeddings"] / s["low_freq_factor"]:
            factors.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors)


@pytest.mark.parametrize("kind", ["llama-gqa", "llama3-rope"])
def test_gguf_model_generates_like_hf(tmp_path, kind):
    model = build_hf_model(kind, seed=3)
    theta = model.config.rope_parameters["rope_theta"]
    freqs = llama3_rope_factors(HEAD_DIM, theta, LLAMA3_ROPE) if kind == "llama3-rope" else None
    loaded = hf_model_to_gguf(model, tmp_path / "m.gguf", rope_theta=theta, rope_freqs=freqs)
    prompt = random_prompt(50, seed=4)
    with torch.no_grad():
        expected_logits = model(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(prefill_logits(loaded, prompt), expected_logits, atol=2e-4, rtol=1e-4)
    assert greedy_tokens(loaded, prompt) == hf_greedy(model, prompt)


# ---------------------------------------------------------------------------------------------- bad GGUF


@pytest.fixture(scope="module")
def good_gguf_bytes(tmp_path_factory) -> bytes:
    path = write_gguf(tmp_path_factory.mktemp("good") / "m.gguf", random_hf_state(tied=True), Q.Q8_0)
    return path.read_bytes()


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.05, 0.3, 0.7, 0.999])
def test_truncated_gguf_raises_model_load_error(tmp_path, good_gguf_bytes, fraction):
    path = tmp_path / "cut.gguf"
    path.write_bytes(good_gguf_bytes[: int(len(good_gguf_bytes) * fraction)])
    with pytest.raises(ModelLoadError, match=str(path)):
        load_model(str(path))


def test_random_bytes_raise_model_load_error(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(10_000))
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(str(path))


def test_gguf_magic_with_garbage_after_raises_model_load_error(tmp_path, good_gguf_bytes):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(good_gguf_bytes[:8] + np.random.default_rng(1).bytes(5000))
    with pytest.raises(ModelLoadError):
        load_model(str(path))


def test_unsupported_architecture_raises_model_load_error(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", random_hf_state(tied=True), arch="gpt2")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(str(path))


def test_missing_metadata_raises_model_load_error(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", random_hf_state(tied=True), skip_keys=("block_count",))
    with pytest.raises(ModelLoadError, match="llama.block_count"):
        load_model(str(path))


def test_inconsistent_head_counts_raise_model_load_error(tmp_path):
    # qwen2: unpermuted, so the writer accepts head counts that do not fit the tensors
    path = write_gguf(tmp_path / "m.gguf", random_hf_state(tied=True), arch="qwen2", num_heads=4, num_kv_heads=3)
    with pytest.raises(ModelLoadError, match="num_kv_heads"):
        load_model(str(path))


@pytest.mark.parametrize(
    "add, match",
    [
        (lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), "rope scaling type 'linear'"),
        (lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN), "rope scaling type 'yarn'"),
        (lambda w: w.add_rope_dimension_count(HEAD_DIM // 2), "partial rotary"),
    ],
    ids=["linear", "yarn", "partial-rotary"],
)
def test_unsupported_rope_variants_raise_model_load_error(tmp_path, add, match):
    path = write_gguf(tmp_path / "m.gguf", random_hf_state(tied=True), extra_metadata=add)
    with pytest.raises(ModelLoadError, match=match):
        load_model(str(path))


def test_supported_rope_metadata_is_accepted(tmp_path):
    def add(writer):
        writer.add_rope_dimension_count(HEAD_DIM)
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)

    path = write_gguf(tmp_path / "m.gguf", random_hf_state(tied=True), extra_metadata=add)
    assert load_model(str(path)).config.head_dim == HEAD_DIM


def test_unsupported_tensor_type_raises_model_load_error(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", random_hf_state(tied=True), Q.Q5_0)
    with pytest.raises(ModelLoadError, match="Q5_0 is not supported"):
        load_model(str(path))


def test_missing_embedding_raises_model_load_error(tmp_path):
    state = {k: v for k, v in random_hf_state(tied=False).items() if k != "model.embed_tokens.weight"}
    with pytest.raises(ModelLoadError, match="token_embd"):
        load_model(str(write_gguf(tmp_path / "m.gguf", state)))


def test_missing_files_and_unknown_names_raise_model_load_error(tmp_path):
    from stageserve.engine.loader.gguf_loader import load_gguf

    with pytest.raises(ModelLoadError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'.*dummy:tiny"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="unknown dummy shape 'nope'"):
        load_model("dummy:nope")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model(str(tmp_path / "weights.bin"))


# ============================================================================================== dummy


@pytest.mark.parametrize(
    "shape, params, tied",
    [
        ("llama-3-8b", 8.03e9, False),
        ("llama-3-70b", 7.06e10, False),
        ("llama-3.2-1b", 1.24e9, True),
        ("smollm2-135m", 1.35e8, True),
        ("qwen2.5-0.5b", 4.94e8, True),
    ],
)
def test_dummy_shapes_have_the_real_models_sizes(shape, params, tied):
    config = DUMMY_SHAPES[shape]
    assert config.num_params == pytest.approx(params, rel=0.01)
    assert config.tie_word_embeddings == tied


@pytest.mark.parametrize("shape", list(DUMMY_SHAPES))
def test_dummy_shapes_are_sane(shape):
    c = DUMMY_SHAPES[shape]
    assert c.name == f"dummy:{shape}"
    assert c.num_heads % c.num_kv_heads == 0 and c.head_dim % 2 == 0
    assert c.architecture in ("llama", "mistral", "qwen2")
    assert c.attention_bias == (c.architecture == "qwen2")
    assert min(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.max_position_embeddings) > 0
    assert c.num_heads * c.head_dim == c.hidden_size  # true of every model listed here
    assert 0 < c.rms_norm_eps < 1e-3 and c.rope_theta >= 10000.0


def test_dummy_tiny_loads_and_runs():
    loaded = load_model("dummy:tiny")
    config = loaded.config
    assert loaded.tokenizer_source is None and loaded.source == "dummy:tiny"
    assert loaded.state_dict["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    assert loaded.state_dict["model.layers.1.self_attn.k_proj.weight"].shape == (config.num_kv_heads * config.head_dim, config.hidden_size)
    assert "lm_head.weight" not in loaded.state_dict  # tied
    assert sum(t.numel() for t in loaded.state_dict.values()) == config.num_params
    first = greedy_tokens(loaded, [1, 2, 3, 4, 5])
    assert len(first) == 8 and all(0 <= t < config.vocab_size for t in first)
    assert greedy_tokens(load_model("dummy:tiny"), [1, 2, 3, 4, 5]) == first  # seeded weights


# ============================================================================================== default model


@pytest.fixture(scope="module")
def default_gguf_reader():
    from stageserve.engine.loader.default_model import default_model_path
    from stageserve.engine.loader.gguf_loader import read_gguf

    try:
        path = default_model_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    start = time.monotonic()
    reader = read_gguf(path)  # metadata and tensor index only; nothing is dequantized
    return reader, time.monotonic() - start


def test_default_model_config(default_gguf_reader):
    from stageserve.engine.loader.gguf_loader import config_from_gguf

    reader, elapsed = default_gguf_reader
    config = config_from_gguf(reader, "default")
    assert config.architecture == "llama"
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert config.hidden_size == 576 and config.intermediate_size == 1536
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert config.rope_theta == 100000.0 and config.max_position_embeddings == 8192
    assert config.num_params == pytest.approx(1.35e8, rel=0.01)
    assert elapsed < 15  # parsing the tokenizer arrays dominates; a full dequantizing load is not done here
