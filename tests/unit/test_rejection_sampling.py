"""Rejection sampling for speculative decoding keeps the target distribution (chi-square at fixed seeds)."""

from __future__ import annotations

import pytest
import torch

from stageserve.sample.params import SamplingParams
from stageserve.sample.rejection import rejection_sample, verify_by_match
from stageserve.sample.sampler import Sampler, SamplingRow

# Upper 0.1% points of chi-square: a correct sampler fails one of these about once in a thousand seeds,
# and these seeds are fixed, so the test is deterministic.
CHI2_999 = {3: 16.27, 4: 18.47, 8: 26.12}
VOCAB = 5


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token the target gives zero probability was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def dist(*values: float) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    return t / t.sum()


P0, P1, P2 = dist(5, 1, 2, 1, 1), dist(1, 1, 1, 4, 3), dist(2, 2, 2, 2, 2)
Q0, Q1 = dist(1, 4, 1, 1, 3), dist(3, 1, 1, 1, 4)


@pytest.mark.parametrize("draft_probs", [None, torch.stack([Q0, Q1])], ids=["deterministic-draft", "sampled-draft"])
def test_emitted_tokens_follow_the_target_distribution(draft_probs):
    gen = torch.Generator().manual_seed(1234)
    target = torch.stack([P0, P1, P2])
    first = torch.zeros(VOCAB)
    second_after_accept = torch.zeros(VOCAB)  # the token after an accepted d_0 must follow p_1
    n = 12000
    for _ in range(n):
        if draft_probs is None:
            draft = [1, 3]  # fixed drafts, one likely under p and one not
        else:
            draft = [int(torch.multinomial(draft_probs[j], 1, generator=gen)) for j in range(2)]
        out = rejection_sample(target, draft, draft_probs, generator=gen)
        assert len(out.token_ids) == out.num_accepted + 1
        assert list(out.token_ids[: out.num_accepted]) == draft[: out.num_accepted]
        first[out.token_ids[0]] += 1
        if out.num_accepted >= 1:
            second_after_accept[out.token_ids[1]] += 1
    assert chi_square(first, P0) < CHI2_999[4]
    assert second_after_accept.sum() > 1000
    assert chi_square(second_after_accept, P1) < CHI2_999[4]


def test_perfect_match_accepts_everything_and_adds_a_bonus_token():
    target = torch.eye(VOCAB)[[2, 4, 1, 3]]  # one-hot: the draft can only be right
    out = rejection_sample(target, [2, 4, 1], torch.eye(VOCAB)[[2, 4, 1]], seed=9)
    assert out.num_accepted == 3 and out.token_ids == (2, 4, 1, 3)
    assert verify_by_match([2, 4, 1], [2, 4, 1, 3]).token_ids == (2, 4, 1, 3)


def test_early_mismatch_stops_at_the_first_rejection_with_a_residual_token():
    target = torch.stack([dist(0, 0, 1, 0, 0), P1, P2])  # the target never emits draft token 3 first
    for seed in range(20):
        out = rejection_sample(target, [3, 1], None, seed=seed)
        assert out.num_accepted == 0 and out.token_ids == (2,)
    assert verify_by_match([3, 1], [2, 1, 0]).token_ids == (2,)
    assert verify_by_match([3, 1], [3, 2, 0]).token_ids == (3, 2)


def test_all_rejected_residual_excludes_the_draft_token():
    target = torch.stack([P0, P1])
    counts = torch.zeros(VOCAB)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4000):
        out = rejection_sample(target, [0], dist(1, 0, 0, 0, 0)[None], generator=gen)
        if out.num_accepted == 0:
            counts[out.token_ids[0]] += 1
    residual = P0.clone()
    residual[0] = 0
    assert chi_square(counts, residual / residual.sum()) < CHI2_999[3]


def test_seeded_verification_is_reproducible():
    target = torch.stack([P0, P1, P2])
    runs = {rejection_sample(target, [0, 3], torch.stack([Q0, Q1]), seed=42, step=7) for _ in range(5)}
    assert len(runs) == 1


def test_sampler_rows_verified_by_match_follow_the_target():
    """The engine's path: sample each verified row with the sampler (its own seed), accept while equal."""
    sampler = Sampler()
    logits = torch.log(torch.stack([P0, P1]))
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=8) for s in range(6000)]
    rows = [SamplingRow(p, [1], []) for p in params] + [SamplingRow(p, [1], [1]) for p in params]
    tokens = sampler(torch.cat([logits[:1].expand(6000, -1), logits[1:].expand(6000, -1)]), rows).token_ids
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for i in range(6000):
        out = verify_by_match([1], [int(tokens[i]), int(tokens[6000 + i])])
        first[out.token_ids[0]] += 1
        if out.num_accepted:
            second[out.token_ids[1]] += 1
    assert chi_square(first, P0) < CHI2_999[4]
    assert chi_square(second, P1) < CHI2_999[4]
