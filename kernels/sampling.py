"""Batched sampling with per-row temperature, top-k, top-p and min-p, with no host sync and no sort.

One program per row. The filters are thresholds on the temperature-scaled logits x = logits / T:

    top-k  keeps x >= t_k, the k-th largest value;
    top-p  keeps x >= t_p, the value at which the mass (over top-k's survivors) of everything at or
           above it first reaches p * Z  (sort-and-cumsum's rule: keep a token while the mass
           strictly before it is < p);
    min-p  keeps x >= max(x) + log(min_p).

t_k and t_p are found exactly, without sorting, by searching the 32-bit order-preserving integer key
of the float values: each pass over the row counts (or sums exp(x - max) over) the elements at or
above CANDIDATES evenly spaced keys and narrows the interval CANDIDATES-fold, so 32 / log2(CANDIDATES)
passes pin the exact key. Then one pass draws the exponential race, argmax over survivors of
exp(x - max) / q with q ~ Exponential(1) given by the caller (as `Sampler` does), which samples
exactly from the renormalized survivors. Greedy rows (temperature <= 0) take argmax of the raw logits.

Ties at a threshold keep every tied token (a sort keeps an arbitrary subset); with float logits that
matters only for exactly equal values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stageserve.kernels._common import FLOAT_DTYPES, INDEX_DTYPES, check_launch_device, check_tensor, interpreting

_TINY = 1.1754943508222875e-38  # float32's smallest normal: a zero noise draw must not divide by zero


def sample_ref(
    logits: torch.Tensor,  # [batch, vocab]
    temperature: torch.Tensor,  # [batch]; <= 0: greedy
    top_k: torch.Tensor,  # [batch]; <= 0 or >= vocab: off
    top_p: torch.Tensor,  # [batch]; >= 1: off
    noise: torch.Tensor,  # [batch, vocab] Exponential(1)
    min_p: torch.Tensor | None = None,  # [batch]; 0: off
) -> torch.Tensor:  # [batch] int64
    """Sort-based reference: top-k, then top-p over the renormalized survivors, then min-p, then the race."""
    batch, vocab = logits.shape
    greedy = temperature <= 0
    x = logits.float() / torch.where(greedy, 1.0, temperature.float())[:, None]  # [batch, vocab] as the kernel
    sorted_x, order = x.double().sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k.long())
    sorted_x = sorted_x.masked_fill(rank >= k[:, None], float("-inf"))
    probs = sorted_x.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    p = torch.where(top_p >= 1, float("inf"), top_p.double())
    sorted_x = sorted_x.masked_fill(mass_before >= p[:, None], float("-inf"))
    if min_p is not None:
        floor = sorted_x[:, :1] + min_p.double().log()[:, None]
        sorted_x = sorted_x.masked_fill(sorted_x < floor, float("-inf"))
    filtered = torch.empty_like(sorted_x).scatter_(-1, order, sorted_x)  # [batch, vocab]
    score = (filtered - filtered.amax(-1, keepdim=True)).exp() / noise.double().clamp_min(_TINY)
    score = score.masked_fill(filtered == float("-inf"), -1.0)
    return torch.where(greedy, logits.argmax(-1), score.argmax(-1))


@triton.jit
def _float_key(x):
    """float32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _load_scaled(row_ptr, idx, vocab, temperature):
    """logits[idx] / temperature in float32, -inf past the vocabulary. IEEE division, as torch's: the plain
    `/` is approximate (2 ulp) on NVIDIA, and the thresholds must see the values the reference sees."""
    x = tl.load(row_ptr + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
    return tl.math.div_rn(x, tl.zeros_like(x) + temperature)


@triton.jit
def _search_key(
    row_ptr, temperature, vocab, x_max, target, floor_key,
    MASS: tl.constexpr, BLOCK_V: tl.constexpr, CANDIDATES: tl.constexpr, LOG2_CANDIDATES: tl.constexpr,
):  # fmt: skip
    """The largest int32 key K with F(K) >= target, where F(K) is the count (MASS: the sum of exp(x - x_max))
    of the row's elements whose key is >= max(K, floor_key). F is non-increasing in K."""
    cand = tl.arange(0, CANDIDATES).to(tl.int64)  # [CANDIDATES]
    offs = tl.arange(0, BLOCK_V)
    lo = floor_key.to(tl.int64) * 0 - 2147483648  # the search interval is [lo, lo + span)
    for i in tl.static_range(32 // LOG2_CANDIDATES):
        step = 1 << (32 - (i + 1) * LOG2_CANDIDATES)  # constexpr: i is unrolled
        keys = (lo + cand * step).to(tl.int32)  # [CANDIDATES], inside int32 range
        total = tl.zeros([CANDIDATES], tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            idx = v0 + offs
            ok = idx < vocab
            x = _load_scaled(row_ptr, idx, vocab, temperature)
            key = _float_key(x)
            live = ok & (key >= floor_key)
            hit = live[:, None] & (key[:, None] >= keys[None, :])  # [BLOCK_V, CANDIDATES]
            if MASS:
                weight = tl.exp(x - x_max)
            else:
                weight = tl.full([BLOCK_V], 1.0, tl.float32)
            total += tl.sum(tl.where(hit, weight[:, None], 0.0), 0)
        best = tl.max(tl.where(total >= target, cand, 0), 0)  # candidate 0 (= lo) always qualifies
        lo = lo + best * step
    return lo.to(tl.int32)


@triton.jit
def _sample_kernel(
    logits_ptr,  # [batch, vocab]
    noise_ptr,  # [batch, vocab] float32
    temperature_ptr,  # [batch]
    top_k_ptr,  # [batch]
    top_p_ptr,  # [batch]
    min_p_ptr,  # [batch]; read when HAS_MIN_P
    out_ptr,  # [batch] int64
    vocab,
    stride_l, stride_n,
    HAS_MIN_P: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CANDIDATES: tl.constexpr,
    LOG2_CANDIDATES: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_l
    temp = tl.load(temperature_ptr + row).to(tl.float32)
    greedy = temp <= 0.0
    t = tl.where(greedy, 1.0, temp)
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: the maximum of x and its first index (the answer for greedy rows, where x = logits).
    x_max = float("-inf")
    arg = 0
    for v0 in range(0, vocab, BLOCK_V):
        idx = v0 + offs
        x = _load_scaled(row_ptr, idx, vocab, t)
        chunk_max = tl.max(x, 0)
        chunk_arg = v0 + tl.argmax(x, 0)
        arg = tl.where(chunk_max > x_max, chunk_arg, arg)
        x_max = tl.maximum(x_max, chunk_max)

    token = arg
    if not greedy:
        threshold = _float_key(x_max) * 0 - 2147483647 - 1  # int32 min: keep everything
        k = tl.load(top_k_ptr + row).to(tl.int32)
        if (k > 0) & (k < vocab):
            threshold = _search_key(row_ptr, t, vocab, x_max, k.to(tl.float32), threshold,
                                    False, BLOCK_V, CANDIDATES, LOG2_CANDIDATES)  # fmt: skip
        p = tl.load(top_p_ptr + row).to(tl.float32)
        if p < 1.0:
            z = tl.zeros([BLOCK_V], tl.float32)
            for v0 in range(0, vocab, BLOCK_V):
                idx = v0 + offs
                x = _load_scaled(row_ptr, idx, vocab, t)
                z += tl.where(_float_key(x) >= threshold, tl.exp(x - x_max), 0.0)
            threshold = _search_key(row_ptr, t, vocab, x_max, p * tl.sum(z, 0), threshold,
                                    True, BLOCK_V, CANDIDATES, LOG2_CANDIDATES)  # fmt: skip
        if HAS_MIN_P:
            min_p = tl.load(min_p_ptr + row).to(tl.float32)
            if min_p > 0.0:
                threshold = tl.maximum(threshold, _float_key(x_max + tl.log(min_p)))

        # The exponential race over survivors.
        best = -1.0
        for v0 in range(0, vocab, BLOCK_V):
            idx = v0 + offs
            ok = idx < vocab
            x = _load_scaled(row_ptr, idx, vocab, t)
            q = tl.load(noise_ptr + row * stride_n + idx, mask=ok, other=1.0)
            score = tl.exp(x - x_max) / tl.maximum(q, 1.1754943508222875e-38)
            score = tl.where(ok & (_float_key(x) >= threshold), score, -1.0)
            chunk_best = tl.max(score, 0)
            chunk_arg = v0 + tl.argmax(score, 0)
            token = tl.where(chunk_best > best, chunk_arg, token)
            best = tl.maximum(best, chunk_best)
    tl.store(out_ptr + row, token.to(tl.int64))


def sample(
    logits: torch.Tensor,  # [batch, vocab] float
    temperature: torch.Tensor,  # [batch] float; <= 0: greedy (argmax of the raw logits)
    top_k: torch.Tensor,  # [batch] int or float; <= 0 or >= vocab: off
    top_p: torch.Tensor,  # [batch] float; >= 1: off
    noise: torch.Tensor,  # [batch, vocab] float32 Exponential(1), drawn by the caller (seeding stays there)
    *,
    min_p: torch.Tensor | None = None,  # [batch] float; 0: off
    out: torch.Tensor | None = None,  # [batch] int64
    log2_candidates: int = 4,  # 16 keys per pass, 8 passes per threshold search
) -> torch.Tensor:  # [batch] int64 token ids, on the logits' device
    """Sampled token per row. Launches one kernel; never waits on the device."""
    batch, vocab = logits.shape
    device = logits.device
    check_launch_device(device)
    check_tensor(logits, "logits", dtypes=FLOAT_DTYPES, device=device)
    check_tensor(noise, "noise", shape=(batch, vocab), dtypes=(torch.float32,), device=device)
    check_tensor(temperature, "temperature", shape=(batch,), dtypes=FLOAT_DTYPES, device=device)
    check_tensor(top_k, "top_k", shape=(batch,), dtypes=INDEX_DTYPES + FLOAT_DTYPES, device=device)
    check_tensor(top_p, "top_p", shape=(batch,), dtypes=FLOAT_DTYPES, device=device)
    if min_p is not None:
        check_tensor(min_p, "min_p", shape=(batch,), dtypes=FLOAT_DTYPES, device=device)
    assert 32 % log2_candidates == 0, "log2_candidates must divide 32"
    assert vocab < 2**24, "counts are kept in float32"
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=device)
    check_tensor(out, "out", shape=(batch,), dtypes=(torch.int64,), device=device)
    if batch == 0:
        return out
    block_v = 128 if interpreting() else 1024
    _sample_kernel[(batch,)](
        logits, noise, temperature, top_k, top_p, min_p if min_p is not None else top_p, out,
        vocab, logits.stride(0), noise.stride(0),
        HAS_MIN_P=min_p is not None, BLOCK_V=block_v,
        CANDIDATES=1 << log2_candidates, LOG2_CANDIDATES=log2_candidates,
        num_warps=1 if interpreting() else 8,
    )  # fmt: skip
    return out
