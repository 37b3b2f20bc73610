"""The sampling kernel against the sort-based reference and the production Sampler's filters, and its
thresholds at their exact boundaries."""

from __future__ import annotations

import pytest
import torch

from stageserve.kernels.sampling import sample, sample_ref
from stageserve.sample.sampler import apply_min_p, apply_top_k_top_p

VOCAB = 200  # not a multiple of the interpreter's 128-wide chunks

# One row per kind: greedy, off, top-k, top-p, both, k=1, k=vocab-1, min-p, all three.
TEMPERATURE = [0.0, 1.0, 0.7, 1.3, 1.0, 1.0, 2.0, 0.8, 1.1]
TOP_K = [0, 0, 5, 0, 50, 1, VOCAB - 1, 0, 30]
TOP_P = [1.0, 1.0, 1.0, 0.8, 0.5, 1.0, 0.95, 1.0, 0.9]
MIN_P = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.02]


def params(device):
    return (
        torch.tensor(TEMPERATURE, device=device),
        torch.tensor(TOP_K, device=device, dtype=torch.int32),
        torch.tensor(TOP_P, device=device),
        torch.tensor(MIN_P, device=device),
    )


def draw(batch, vocab, device, gen, dtype=torch.float32):
    logits = (torch.randn(batch, vocab, generator=gen, device=device) * 3).to(dtype)
    noise = torch.empty(batch, vocab, device=device).exponential_(generator=gen)
    return logits, noise


def test_matches_reference(device, gen):
    temperature, top_k, top_p, min_p = params(device)
    logits, noise = draw(len(TEMPERATURE), VOCAB, device, gen)
    out = torch.full((len(TEMPERATURE),), -1, dtype=torch.int64, device=device)
    sample(logits, temperature, top_k, top_p, noise, min_p=min_p, out=out)
    assert out.tolist() == sample_ref(logits, temperature, top_k, top_p, noise, min_p=min_p).tolist()


def test_agrees_with_sampler_filters(device, gen):
    """The production Sampler's order (temperature, top-k/top-p by one sort, min-p, race): same tokens."""
    temperature, top_k, top_p, min_p = params(device)
    logits, noise = draw(len(TEMPERATURE), VOCAB, device, gen)
    got = sample(logits, temperature, top_k, top_p, noise, min_p=min_p)
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    k = torch.where(top_k > 0, top_k, VOCAB).float()
    p = torch.where(top_p < 1, top_p, float("inf"))
    probs = apply_min_p(apply_top_k_top_p(scaled, k, p), min_p).softmax(-1)
    want = torch.where(greedy, logits.argmax(-1), (probs / noise).argmax(-1))
    assert got.tolist() == want.tolist()


def test_thresholds_are_exact(device, gen):
    """Noise that makes the least likely survivor win: the kernel must stop exactly at the k-th token and at
    top-p's boundary token."""
    temperature, top_k, top_p, min_p = params(device)
    logits, _ = draw(len(TEMPERATURE), VOCAB, device, gen)
    x = logits / torch.where(temperature <= 0, 1.0, temperature)[:, None]
    rank = x.argsort(-1).argsort(-1).float()  # 0 = smallest
    noise = (x - x.amax(-1, keepdim=True)).exp() * (1 + rank)  # score = 1 / (1 + rank): lowest survivor wins
    got = sample(logits, temperature, top_k, top_p, noise, min_p=min_p)
    assert got.tolist() == sample_ref(logits, temperature, top_k, top_p, noise, min_p=min_p).tolist()
    kth = x.sort(-1, descending=True).indices  # [batch, vocab]
    assert got[2].item() == kth[2, 4].item()  # top_k = 5: the 5th largest
    assert got[5].item() == kth[5, 0].item()  # top_k = 1: the largest


def test_greedy_bf16_with_masked_tokens(device, gen):
    logits, noise = draw(3, VOCAB, device, gen, dtype=torch.bfloat16)
    logits[:, :50] = float("-inf")  # e.g. min_tokens masking
    zeros = torch.zeros(3, device=device)
    got = sample(logits, zeros, zeros.int(), torch.ones(3, device=device), noise)
    assert got.tolist() == logits.float().argmax(-1).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("log2_candidates", [2, 4])
def test_matches_reference_full(device, gen, log2_candidates):
    batch, vocab = 64, 128256
    logits, noise = draw(batch, vocab, device, gen)
    rows = torch.arange(batch, device=device)
    temperature = torch.where(rows % 5 == 0, 0.0, 0.5 + (rows % 7) * 0.2)
    top_k = torch.where(rows % 3 == 0, 0, (rows * 37) % 2000 + 1).int()
    top_p = torch.where(rows % 4 == 0, 1.0, 0.3 + (rows % 6) * 0.1)
    min_p = torch.where(rows % 6 == 1, 0.05, 0.0)
    got = sample(logits, temperature, top_k, top_p, noise, min_p=min_p, log2_candidates=log2_candidates)
    assert got.tolist() == sample_ref(logits, temperature, top_k, top_p, noise, min_p=min_p).tolist()
