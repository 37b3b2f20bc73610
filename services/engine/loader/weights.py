"""What every loader returns, and the choice of loader for a model name.

Loaders translate their format into one shape: a `ModelConfig` plus a state dict in Hugging Face's
Llama naming (`model.layers.0.self_attn.q_proj.weight`, ...) with q/k rows in HF's rotate-half order.
The model then builds from that dict, whatever the file was.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from stageserve.common.errors import ModelLoadError
from stageserve.engine.config import ModelConfig


@dataclass
class LoadedModel:
    """A model's config and weights, and where its tokenizer lives (None for dummy weights)."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_source: Path | None
    source: str
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def progress(total: int, desc: str) -> Iterator[tqdm]:
    """A progress bar on stderr that shows itself only when loading takes more than a second."""
    bar = tqdm(total=total, desc=desc, unit="tensor", delay=1.0, file=sys.stderr, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def load_model(
    name: str | None, *, device: torch.device | None = None, dtype: torch.dtype | None = None, quantization: str = "none"
) -> LoadedModel:
    """Load `name`: None or "default" (the built-in SmolLM2), "dummy:<shape>", a .gguf file or an HF dir.

    `device` and `dtype` matter only for dummy weights, which are created in place; real weights are
    read on the CPU and moved by the model. With `quantization="gguf"` a GGUF file's Q4_0/Q4_1/Q8_0
    projection weights stay in their blocks (as `PackedWeight`s) instead of being dequantized.
    """
    keep = quantization == "gguf"
    from stageserve.engine.loader import dummy, gguf_loader, hf_loader
    from stageserve.engine.loader.default_model import DEFAULT_MODEL_NAME, default_model_path

    if name in (None, "", "default", DEFAULT_MODEL_NAME):
        return gguf_loader.load_gguf(default_model_path(), name=DEFAULT_MODEL_NAME, keep_blocks=keep)
    if name.startswith("dummy:"):
        return dummy.load_dummy(name.removeprefix("dummy:"), device=device, dtype=dtype)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_loader.load_gguf(path, keep_blocks=keep)
    if path.is_dir():
        return hf_loader.load_hf_dir(path)
    known = ", ".join(["default", *(f"dummy:{s}" for s in dummy.DUMMY_SHAPES)])
    raise ModelLoadError(f"unknown model {name!r}: expected a .gguf file, an HF directory, or one of {known}")
