"""Fixtures for engine tests on the real default model (SmolLM2-135M-Instruct, float32 on CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.loader.default_model import default_model_path
from stageserve.engine.loader.weights import LoadedModel, load_model
from stageserve.tokenizer.text_tokenizer import TextTokenizer, load_tokenizer


@pytest.fixture(scope="session")
def default_weights() -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="session")
def tokenizer() -> TextTokenizer:
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="session")
def make_engine(default_weights, tokenizer):
    """Build an engine on the shared weights with any EngineConfig overrides."""

    def make(**overrides) -> LLMEngine:
        config = dataclasses.replace(EngineConfig(num_blocks=256, device="cpu", dtype="float32"), **overrides)
        return LLMEngine(default_weights, config, eos_token_ids=tokenizer.stop_token_ids)

    return make


@pytest.fixture(scope="session")
def engine(make_engine) -> LLMEngine:
    return make_engine()


@pytest.fixture(scope="session")
def hf_model():
    """HF transformers on the same GGUF: the reference for greedy parity."""
    transformers = pytest.importorskip("transformers")
    import torch

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(Path(path).parent), gguf_file=Path(path).name, dtype=torch.float32
    ).eval()
