"""Fixtures for engine tests on the real default model (SmolLM2-135M-Instruct, float32 on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stageserve.engine.loader.default_model import default_model_path


@pytest.fixture(scope="session")
def hf_model():
    """HF transformers on the same GGUF: the reference for greedy parity."""
    transformers = pytest.importorskip("transformers")
    import torch

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(Path(path).parent), gguf_file=Path(path).name, dtype=torch.float32
    ).eval()
