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


def test_a_batch_proposes_what_each_sequence_would_alone(make_proposer, tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog. The quick brown", "1, 2, 3, 4, 5, 6,", "Paris is the capital of"]
    histories = [tokenizer.encode(t) for t in texts]
    batched, alone = make_proposer(num_blocks=64), make_proposer(num_blocks=64)
    items = [("a", histories[0], 4), ("bad", [1, -1], 2), ("b", histories[1], 2), ("c", histories[2], 3), ("k0", [1], 0)]
    got = batched.propose_batch(items)
    assert [str(g).split(":")[0] for g in got if not isinstance(g, list)] == ["new_token_ids[1]", "k"]
    assert [g for g in got if isinstance(g, list)] == [alone.propose(s, h, k) for s, h, k in items if s in ("a", "b", "c")]
    assert "bad" not in batched and "k0" not in batched
    # The next round: each sequence's first draft accepted, then a bonus token that differs from its second.
    updates = [[p[0], (p[1] + 1) % 1000] if len(p) > 1 else [p[0], 5] for p in (got[0], got[2], got[3])]
    again = batched.propose_batch([(s, u, 3) for s, u in zip("abc", updates)])
    assert again == [alone.propose(s, u, 3) for s, u in zip("abc", updates)]
    assert batched.stats.num_proposals == alone.stats.num_proposals


def test_a_batch_never_evicts_its_own_sequences(make_proposer, tokenizer):
    proposer = make_proposer(num_blocks=8)  # 32 tokens of KV: room for one of these sequences
    prompt = tokenizer.encode("one two three four five six seven eight nine ten eleven twelve " * 2)
    assert len(prompt) > 16
    proposer.propose("old", prompt, 2)
    first, second = proposer.propose_batch([("a", prompt, 2), ("b", prompt, 2)])
    assert len(first) == 2 and second == [], "b found no room it could take from a, so it proposes nothing"
    assert "old" not in proposer and "a" in proposer
