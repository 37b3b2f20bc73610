"""The draft-model proposer: rolling its KV back past rejected drafts gives what a fresh draft would."""

from __future__ import annotations

import pytest

from stageserve.draft.model_proposer import ModelProposer, truncate_layers
from stageserve.engine.config import EngineConfig


@pytest.fixture(scope="module")
def make_proposer(default_weights):
    def make(num_blocks: int = 32) -> ModelProposer:
        config = EngineConfig(num_blocks=num_blocks, block_size=4, device="cpu", dtype="float32")
        return ModelProposer(truncate_layers(default_weights, 2), config, device=config_device(), dtype=dtype())

    def config_device():
        return default_weights.state_dict["model.embed_tokens.weight"].device

    def dtype():
        return default_weights.state_dict["model.embed_tokens.weight"].dtype

    return make


def test_truncated_model_keeps_the_first_layers_norm_and_head(default_weights):
    draft = truncate_layers(default_weights, 3)
    assert draft.config.num_layers == 3
    assert not any(name.startswith("model.layers.3.") for name in draft.state_dict)
    assert "model.norm.weight" in draft.state_dict


def test_rollback_matches_a_fresh_proposer(make_proposer, tokenizer):
    history = tokenizer.encode("The quick brown fox jumps over the lazy dog. The quick brown")
    kept, fresh = make_proposer(), make_proposer()
    first = kept.propose("s", history, 4)
    assert len(first) == 4
    # Accept two drafts, then the target's bonus token differs from the third draft.
    bonus = (first[2] + 1) % 1000
    update = [*first[:2], bonus]
    second = kept.propose("s", update, 4)
    assert second == fresh.propose("s", history + update, 4)
    # Nothing accepted: all drafts rolled back.
    third = kept.propose("s", [(second[0] + 7) % 1000], 3)
    assert third == fresh.propose("r", history + update + [(second[0] + 7) % 1000], 3)
    assert kept.release("s") and kept.kv.stats().num_used_blocks == 0


def test_full_pool_evicts_the_least_recently_used_sequence(make_proposer, tokenizer):
    proposer = make_proposer(num_blocks=8)  # 32 tokens of KV
    prompt = tokenizer.encode("one two three four five six seven eight nine ten eleven twelve " * 2)
    assert len(prompt) > 16  # more than half the pool each
    proposer.propose("a", prompt, 2)
    proposer.propose("b", prompt, 2)  # needs a's blocks
    assert "b" in proposer and "a" not in proposer and proposer.stats.num_evicted == 1
