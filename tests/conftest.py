"""Shared fixtures. The default model's weights are read once per session and shared by every engine."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.loader.default_model import default_model_path
from stageserve.engine.loader.weights import LoadedModel, load_model
from stageserve.tokenizer.text_tokenizer import TextTokenizer, load_tokenizer

# Two threads match the CI machine; more only adds contention there.
torch.set_num_threads(int(os.environ.get("STAGESERVE_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module of tiny matmuls (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): they gain
    nothing from threads, and on a busy 2-core box spinning workers slow them 50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
