"""The default model under every quantization: it loads, generates, and its quality stays within loose bounds.

The baseline is the default model's own dequantized Q4_1 weights in float32. `gguf` keeps those blocks
packed, so it must reproduce the baseline; int8 and fp8 lose little; int4 re-quantizes 4-bit weights onto
a coarser grid (group 64/128 vs the file's 32), which costs this 135M model a lot (BENCHMARKS.md), so its
bound is loose. Everything is float32 on the CPU, so every number here is deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.loader.weights import load_model
from stageserve.engine.quant.linear import Fp8Linear, PackedLinear
from stageserve.engine.quant.quality import _data, corpus_scores
from stageserve.sample.params import SamplingParams
from stageserve.tokenizer.text_tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

# variant -> (EngineConfig overrides, largest perplexity increase vs the baseline)
BOUNDS = {
    "int8": ({"quantization": "int8"}, 0.03),
    "fp8": ({"quantization": "fp8"}, 0.10),
    "int4": ({"quantization": "int4"}, 0.80),
    "kv-fp8": ({"kv_cache_dtype": "fp8_e4m3"}, 0.10),
}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def default_models():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    dense = load_model(None)
    yield dense, load_model(None, quantization="gguf"), load_tokenizer(dense.tokenizer_source)
    torch.set_num_threads(before)


def run(loaded, tokenizer, **overrides) -> tuple[float, list[int], LLMEngine]:
    """(perplexity over the corpus's first 256 tokens, 8 greedy tokens, the engine)."""
    engine = LLMEngine(loaded, EngineConfig(num_blocks=64, dtype="float32", device="cpu", **overrides))
    tokens = tokenizer.encode(_data("eval_corpus.txt"))[:256]
    nll, _ = corpus_scores(engine.runner.model, tokens, 256, engine.runner.kv_dtype)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    (request,) = engine.generate([tokenizer.encode(PROMPT)], greedy)
    return math.exp(nll), request.output_token_ids, engine


@pytest.fixture(scope="module")
def baseline(default_models):
    dense, _, tokenizer = default_models
    ppl, tokens, _ = run(dense, tokenizer)
    assert 5 < ppl < 60  # a working model on ordinary English
    return ppl, tokens


def test_gguf_blocks_reproduce_the_baseline(default_models, baseline):
    _, packed, tokenizer = default_models
    ppl, tokens, engine = run(packed, tokenizer, quantization="gguf")
    qkv = engine.runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, PackedLinear) and qkv.packed.fmt == "q4_1" and qkv.packed.bits == 4
    assert ppl == pytest.approx(baseline[0], rel=1e-4)
    assert tokens == baseline[1]


@pytest.mark.parametrize("variant", BOUNDS)
def test_quantized_default_model_stays_within_its_bound(default_models, baseline, variant):
    dense, _, tokenizer = default_models
    overrides, bound = BOUNDS[variant]
    ppl, tokens, engine = run(dense, tokenizer, **overrides)
    layer = engine.runner.model.layers[0].mlp.down_proj
    if variant in ("int8", "int4"):
        assert isinstance(layer, PackedLinear) and layer.packed.fmt == variant
    elif variant == "fp8":
        assert isinstance(layer, Fp8Linear) and layer.weight_fp8.dtype == torch.float8_e4m3fn
    else:
        assert engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    assert baseline[0] * 0.97 < ppl < baseline[0] * (1 + bound)
    assert len(tokens) == 8
    if variant in ("int8", "kv-fp8"):  # near-lossless: the first greedy token is the baseline's
        assert tokens[0] == baseline[1][0]
