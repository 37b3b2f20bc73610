"""Rejection sampling for speculative decoding (Leviathan et al. 2023; Chen et al. 2023).

Given the target's distributions p_0..p_k at the k + 1 verified positions, k draft tokens d_j drawn
from draft distributions q_j, accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first
rejection, emit a token from the residual norm(max(0, p_j - q_j)) and stop; if all k are accepted,
emit a bonus token from p_k. Every emitted token is then distributed exactly as the target would
have sampled it, whatever q is.

A deterministic draft (n-gram lookup, a greedy draft model) has q_j = one-hot(d_j). Then acceptance
is p_j(d_j) and the residual is p_j without d_j, renormalized, which is exactly "sample t_j from p_j
and accept iff t_j == d_j". The engine verifies that way (`verify_by_match`), because it reuses the
sampler row by row with each row's own stateless seed: a seeded request then gives the same tokens
with or without speculation. `rejection_sample` is the general form, for drafts that send their q.

Seeds: row j of a seeded request draws from `step_seed(seed, step + j)`, so results are reproducible
per request, independent of batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stageserve.sample.sampler import step_seed


@dataclass(frozen=True)
class Verified:
    """One sequence's verification: how many drafts were accepted, and the tokens to append."""

    num_accepted: int
    token_ids: tuple[int, ...]  # the accepted drafts, then the recovered or bonus token (num_accepted + 1)


def verify_by_match(draft_token_ids: Sequence[int], target_token_ids: Sequence[int]) -> Verified:
    """Exact verification when the draft is deterministic: `target_token_ids[j]` was sampled from p_j
    (argmax for greedy) with the first j drafts in its history; len(target) == len(draft) + 1."""
    if len(target_token_ids) != len(draft_token_ids) + 1:
        raise ValueError(f"need {len(draft_token_ids) + 1} target tokens, got {len(target_token_ids)}")
    m = 0
    while m < len(draft_token_ids) and draft_token_ids[m] == target_token_ids[m]:
        m += 1
    return Verified(m, tuple(target_token_ids[: m + 1]))


def rejection_sample(
    target_probs: Tensor,  # [k + 1, vocab] float: p_0..p_k, already temperature/top-k/top-p processed
    draft_token_ids: Sequence[int],  # [k]
    draft_probs: Tensor | None = None,  # [k, vocab] q_0..q_{k-1}; None: a deterministic draft (one-hot)
    *,
    seed: int | None = None,
    step: int = 0,  # tokens generated before this verification: row j uses step_seed(seed, step + j)
    generator: torch.Generator | None = None,  # for unseeded requests
) -> Verified:
    """Leviathan et al.'s speculative sampling for one sequence; the result is distributed as the target."""
    k = len(draft_token_ids)
    if target_probs.dim() != 2 or target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs must be [{k + 1}, vocab], got {tuple(target_probs.shape)}")
    vocab = target_probs.shape[1]
    p = target_probs.float()
    if draft_probs is None:
        q = torch.zeros(k, vocab, device=p.device)
        q[torch.arange(k), torch.tensor(list(draft_token_ids), dtype=torch.int64)] = 1.0
    else:
        if draft_probs.shape != (k, vocab):
            raise ValueError(f"draft_probs must be [{k}, {vocab}], got {tuple(draft_probs.shape)}")
        q = draft_probs.float()
    accepted: list[int] = []
    for j, d in enumerate(draft_token_ids):
        gen = _generator(seed, step + j, p.device, generator)
        u = torch.rand((), generator=gen, device=p.device)
        ratio = p[j, d] / q[j, d].clamp_min(torch.finfo(torch.float32).tiny)
        if u < ratio:  # min(1, ratio) is implied: u < 1 always
            accepted.append(int(d))
            continue
        residual = (p[j] - q[j]).clamp_min(0)
        if residual.sum() <= 0:  # p == q up to rounding: any rejection is float noise; fall back to p
            residual = p[j]
        return Verified(j, (*accepted, _draw(residual, gen)))
    gen = _generator(seed, step + k, p.device, generator)
    return Verified(k, (*accepted, _draw(p[k], gen)))


def _draw(weights: Tensor, gen: torch.Generator | None) -> int:
    """One index with probability proportional to `weights` (an exponential race: no host-side cumsum)."""
    q = torch.empty_like(weights).exponential_(generator=gen).clamp_min_(torch.finfo(weights.dtype).tiny)
    return int((weights / q).argmax())


def _generator(seed: int | None, step: int, device: torch.device, fallback: torch.Generator | None):
    if seed is None:
        return fallback
    gen = torch.Generator(device=device)
    gen.manual_seed(step_seed(seed, step))
    return gen
