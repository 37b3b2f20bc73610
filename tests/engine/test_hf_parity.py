"""Greedy parity with HF transformers on the real default model: identical token ids."""

from __future__ import annotations

import pytest
import torch

from stageserve.sample.params import SamplingParams

NEW_TOKENS = 32

RAW_PROMPTS = [
    "The history of the Roman Empire",
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n",
    "Q: What is 17 times 23?\nA:",
    "Les fleurs du printemps sont",
]
CHAT_PROMPTS = [
    "Write a haiku about the ocean.",
    "Explain what a hash table is in one paragraph.",
]


def hf_greedy(hf_model, prompt_ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    return [tokenizer.encode(p) for p in RAW_PROMPTS + chats]


def test_greedy_matches_hf_batched(engine, hf_model, prompt_ids):
    """All six prompts in one continuous batch give HF's tokens, 32 each."""
    # min_tokens masks EOS exactly as HF's min_new_tokens does, so both produce 32 tokens.
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0)
    ours = [r.output_token_ids for r in engine.generate(prompt_ids, params)]
    for ids, got in zip(prompt_ids, ours):
        assert got == hf_greedy(hf_model, ids)
    assert len(prompt_ids) >= 5
