"""Build an engine for a model name: weights, and the end-of-sequence ids from its tokenizer."""

from __future__ import annotations

import torch

from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.loader.weights import LoadedModel, load_model
from stageserve.engine.parallel.launch import leader_rank
from stageserve.engine.runner import resolve_device, resolve_dtype
from stageserve.tokenizer.text_tokenizer import TextTokenizer, load_tokenizer


def load_model_and_tokenizer(model: str | None, config: EngineConfig | None = None) -> tuple[LoadedModel, TextTokenizer | None]:
    """Dummy weights are drawn directly on the engine's device and dtype; real ones are read on the CPU."""
    config = config or EngineConfig()
    device = resolve_device(config.device)
    tp = leader_rank(config, device)
    loaded = load_model(
        model, device=device, dtype=resolve_dtype(config.dtype, device), tp=tp, quantization=config.quantization
    )
    tokenizer = load_tokenizer(loaded.tokenizer_source) if loaded.tokenizer_source is not None else None
    return loaded, tokenizer


def create_engine(
    model: str | LoadedModel | None, config: EngineConfig | None = None, local_draft: bool = True
) -> LLMEngine:
    """An engine that stops on the model's own end-of-sequence tokens, with the in-process draft its
    `speculative` knob asks for (unless `local_draft` is False)."""
    if isinstance(model, LoadedModel):
        loaded = model
        tokenizer = load_tokenizer(loaded.tokenizer_source) if loaded.tokenizer_source is not None else None
    else:
        loaded, tokenizer = load_model_and_tokenizer(model, config)
    eos = tokenizer.stop_token_ids if tokenizer is not None else frozenset()
    engine = LLMEngine(loaded, config, eos_token_ids=eos)
    if local_draft:
        engine.set_draft(make_local_draft(loaded, engine))
    del loaded  # the weights as loaded, before fusion: garbage once the runner holds its own
    if engine.device.type == "cuda":
        # Give the allocator's cache of those back to the driver: a prefill and a decode process often
        # share one GPU, and the cached load-time copies would otherwise crowd the other out.
        torch.cuda.empty_cache()
    return engine


def make_local_draft(loaded: LoadedModel, engine: LLMEngine):
    """An in-process draft for the engine's `speculative` knob (None when off). The decode stage
    replaces it with the Draft service when it is given one."""
    from stageserve.draft.local import LocalDraft
    from stageserve.draft.model_proposer import ModelProposer, truncate_layers
    from stageserve.draft.ngram import NgramProposer

    config = engine.config
    if config.speculative == "ngram":
        return LocalDraft(NgramProposer())
    if config.speculative == "model":
        draft = truncate_layers(loaded, config.spec_draft_layers)
        return LocalDraft(ModelProposer(draft, config, device=engine.device, dtype=engine.dtype))
    return None
