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
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from stageserve.common.errors import ModelLoadError
from stageserve.engine.config import ModelConfig

if TYPE_CHECKING:
    from stageserve.engine.parallel.sharding import ModelShard, TPRank


@dataclass
class LoadedModel:
    """A model's config and weights, and where its tokenizer lives (None for dummy weights)."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_source: Path | None
    source: str
    extra: dict = field(default_factory=dict)
    shard: ModelShard | None = None  # set when `state_dict` holds one tensor-parallel rank's slices only


@contextlib.contextmanager
def progress(total: int, desc: str) -> Iterator[tqdm]:
    """A progress bar on stderr that shows itself only when loading takes more than a second."""
    bar = tqdm(total=total, desc=desc, unit="tensor", delay=1.0, file=sys.stderr, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def load_model(
    name: str | None,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    tp: TPRank | None = None,
    quantization: str = "none",
) -> LoadedModel:
    """Load `name`: None or "default" (the built-in SmolLM2), "dummy:<shape>", a .gguf file or an HF dir.

    `device` and `dtype` matter only for dummy weights, which are created in place; real weights are
    read on the CPU and moved by the model. With `tp`, only that rank's slices are materialized,
    one tensor at a time. With `quantization="gguf"` a GGUF file's Q4_0/Q4_1/Q8_0 projection weights
    stay in their blocks (as `PackedWeight`s) instead of being dequantized.
    """
    keep = quantization == "gguf"
    from stageserve.engine.loader import dummy, gguf_loader, hf_loader
    from stageserve.engine.loader.default_model import DEFAULT_MODEL_NAME, default_model_path

    if name in (None, "", "default", DEFAULT_MODEL_NAME):
        return gguf_loader.load_gguf(default_model_path(), name=DEFAULT_MODEL_NAME, tp=tp, keep_blocks=keep)
    if name.startswith("dummy:"):
        return dummy.load_dummy(name.removeprefix("dummy:"), device=device, dtype=dtype, tp=tp)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_loader.load_gguf(path, tp=tp, keep_blocks=keep)
    if path.is_dir():
        return hf_loader.load_hf_dir(path, tp=tp)
    known = ", ".join(["default", *(f"dummy:{s}" for s in dummy.DUMMY_SHAPES)])
    raise ModelLoadError(f"unknown model {name!r}: expected a .gguf file, an HF directory, or one of {known}")


def model_shard(config: ModelConfig, tp: TPRank | None) -> ModelShard | None:
    """The shard a loader slices to, once the file's config is known (None: load everything)."""
    if tp is None:
        return None
    from stageserve.engine.parallel.sharding import ModelShard

    return ModelShard(config, tp.rank, tp.size)
