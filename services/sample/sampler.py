"""Batched sampling: one decode step's logits to one token per row, on the logits' device.

Every stage is one batched tensor op over per-row parameter tensors, so a batch costs a fixed number
of kernel launches and the host never waits on the device until `SamplerOutput.to_lists`:

    raw logits ─┬─> repetition, frequency, presence penalties
                │   -> min_tokens: EOS and stop ids masked
                │   -> greedy rows: argmax
                │   -> other rows: temperature -> top-k, top-p (one sort) -> min-p -> exponential race
                └─> logprob of the chosen token and the top n, under the raw (unprocessed) distribution

The exponential race `argmax(probs / q)`, q ~ Exponential(1), draws exactly from `probs` and needs only
elementwise ops and a reduction: no cumsum search, no `torch.multinomial` sync. A seeded row draws q
from a generator seeded by `step_seed(seed, len(output_token_ids))`, so it is stateless: the same
logits, params and history give the same token in any batch and any process (on the same device type;
CPU and CUDA generators give different streams).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stageserve.sample.params import SamplingParams

_MASK64 = (1 << 64) - 1
_NEG_INF = float("-inf")


def _splitmix64(x: int) -> int:
    """SplitMix64's finalizer: a bijection on 64-bit ints whose nearby inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """Generator seed for step `step` of a request seeded with `seed`: a 64-bit mix of the two."""
    return _splitmix64(_splitmix64(seed) ^ step)


@dataclass
class SamplingRow:
    """One row of the logits batch: a request's params and its token history."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    """Tokens generated so far; its length is also the step index that seeds this row's noise."""


@dataclass(frozen=True)
class SampledToken:
    """One row of a SamplerOutput, on the host."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first; params.logprobs long


@dataclass
class SamplerOutput:
    """The device tensors of one step. Nothing here has been copied to the host yet."""

    token_ids: Tensor  # [batch] int64
    logprobs: Tensor  # [batch] float32, of the chosen token under log_softmax(raw logits)
    top_logprob_ids: Tensor | None  # [batch, n] int64, n = most logprobs any row asked for; None if n == 0
    top_logprobs: Tensor | None  # [batch, n] float32
    num_top_logprobs: tuple[int, ...] = ()  # per row, <= n: how many of the n columns that row asked for

    def to_lists(self) -> list[SampledToken]:
        """The one host sync of a step: every result is packed into one float64 tensor and copied once.

        float64 holds token ids exactly (vocabularies are far below 2**53).
        """
        columns = [self.token_ids[:, None].double(), self.logprobs[:, None].double()]
        n = 0
        if self.top_logprob_ids is not None and self.top_logprobs is not None:
            n = self.top_logprob_ids.shape[1]
            columns += [self.top_logprob_ids.double(), self.top_logprobs.double()]
        packed = torch.cat(columns, dim=1).cpu().tolist()  # [batch, 2 + 2n]
        wants = self.num_top_logprobs or (n,) * len(packed)
        return [_unpack(row, n, want) for row, want in zip(packed, wants, strict=True)]


def _unpack(row: list[float], n: int, want: int) -> SampledToken:
    """One packed row [token, logprob, n ids, n logprobs] to a SampledToken keeping `want` top entries."""
    top = tuple((int(row[2 + j]), row[2 + n + j]) for j in range(want))
    return SampledToken(token_id=int(row[0]), logprob=row[1], top_logprobs=top)


@dataclass
class BatchParams:
    """Per-row parameters as [batch] tensors on the logits' device, neutral where a knob is off."""

    temperature: Tensor  # [batch] float32; 1 on greedy rows so the division is harmless
    top_k: Tensor  # [batch] float32 (exact below 2**24); vocab when disabled
    top_p: Tensor  # [batch] float32; inf when disabled, so float error in the cumsum never masks the tail
    min_p: Tensor  # [batch] float32
    repetition: Tensor  # [batch] float32
    frequency: Tensor  # [batch] float32
    presence: Tensor  # [batch] float32
    greedy: Tensor  # [batch] bool

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> BatchParams:
        """One host table, one host-to-device copy, then column views."""
        table = torch.tensor([_row_values(r.params, vocab) for r in rows], dtype=torch.float32)  # [batch, 8]
        cols = _to_device(table, device).T.unbind(0)  # 8 x [batch]
        return cls(*cols[:7], greedy=cols[7] > 0)


def _row_values(p: SamplingParams, vocab: int) -> list[float]:
    """The BatchParams columns of one row, in field order."""
    top_k = min(p.top_k, vocab) if p.top_k > 0 else vocab
    top_p = p.top_p if p.top_p < 1.0 else float("inf")
    temperature = 1.0 if p.is_greedy else p.temperature
    return [
        temperature, top_k, top_p, p.min_p,
        p.repetition_penalty, p.frequency_penalty, p.presence_penalty, float(p.is_greedy),
    ]  # fmt: skip


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host to device without making the host wait for queued kernels: staged through pinned memory on CUDA."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _token_counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> Tensor:
    """[batch, vocab] float32 occurrence counts, by one scatter_add over ids padded with a spare column.

    Ids outside [0, vocab) land in the spare column too, so a mismatched tokenizer cannot index out of bounds.
    """
    width = max(1, max(len(s) for s in seqs))
    padded = torch.tensor([[*s, *([vocab] * (width - len(s)))] for s in seqs], dtype=torch.int64)
    ids = _to_device(padded, device)  # [batch, width]
    ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
    counts = torch.zeros(len(seqs), vocab + 1, dtype=torch.float32, device=device)  # [batch, vocab + 1]
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: Tensor, rows: Sequence[SamplingRow], params: BatchParams) -> None:
    """In place on logits [batch, vocab]: repetition (HF/vLLM), then frequency and presence (OpenAI).

    Rows with a neutral knob contribute empty histories, so long prompts are only copied when needed.
    """
    vocab = logits.shape[1]
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        history = [
            [*r.prompt_token_ids, *r.output_token_ids] if r.params.repetition_penalty != 1.0 else [] for r in rows
        ]
        seen = _token_counts(history, vocab, logits.device) > 0  # [batch, vocab]
        penalty = params.repetition[:, None]  # [batch, 1]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    if any(r.params.frequency_penalty or r.params.presence_penalty for r in rows):
        outputs = [r.output_token_ids if r.params.frequency_penalty or r.params.presence_penalty else [] for r in rows]
        counts = _token_counts(outputs, vocab, logits.device)  # [batch, vocab]
        logits -= params.frequency[:, None] * counts + params.presence[:, None] * (counts > 0)


def apply_min_tokens(logits: Tensor, rows: Sequence[SamplingRow], eos_token_ids: int | Collection[int] | None) -> None:
    """In place on contiguous logits [batch, vocab]: while a row has generated fewer than min_tokens, its
    stop ids (and EOS) cannot be picked."""
    vocab = logits.shape[1]
    flat = [
        i * vocab + token
        for i, row in enumerate(rows)
        if len(row.output_token_ids) < row.params.min_tokens
        for token in _stopping_ids(row.params, eos_token_ids)
        if token < vocab
    ]
    if flat:
        # A flat scatter, not `logits[rows, cols] = -inf`: advanced-index assignment syncs with the host on CUDA.
        index = _to_device(torch.tensor(flat, dtype=torch.int64), logits.device)  # [pairs]
        logits.view(-1).scatter_(0, index, _NEG_INF)


def _stopping_ids(params: SamplingParams, eos_token_ids: int | Collection[int] | None) -> tuple[int, ...]:
    """Ids that would end this request now; EOS does not when ignore_eos is set."""
    if params.ignore_eos or eos_token_ids is None:
        eos: tuple[int, ...] = ()
    else:
        eos = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(sorted(eos_token_ids))
    return (*params.stop_token_ids, *eos)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """min-p in logit space: p_i < min_p * p_max  <=>  l_i < l_max + log(min_p). No softmax needed.

    Applied after top-k/top-p: their renormalization leaves p_i / p_max unchanged and never drops the
    argmax, so min-p sees the same ratios it would on the full distribution. (The other order is not
    equivalent: top-p would then renormalize over min-p's survivors.)
    """
    threshold = logits.amax(-1, keepdim=True) + min_p[:, None].log()  # [batch, 1]; -inf when min_p == 0
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Mask what top-k drops, then what top-p drops of the renormalized survivors (vLLM order). One sort.

    The most likely token always survives: rank 0 is below any k >= 1 and has zero mass before it.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [batch, vocab]
    rank = torch.arange(logits.shape[1], device=logits.device)  # [vocab]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], _NEG_INF)
    probs = sorted_logits.softmax(-1)  # [batch, vocab]
    mass_before = probs.cumsum(-1) - probs  # [batch, vocab]
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], _NEG_INF)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    """Turns a step's logits into tokens. Holds only the RNG of unseeded rows and the EOS id."""

    def __init__(self, eos_token_id: int | Collection[int] | None = None, generator: torch.Generator | None = None):
        self.eos_token_id = eos_token_id  # one id, or every id that ends a sequence (Llama 3 has three)
        self._given_generator = generator
        self._own_generators: dict[torch.device, torch.Generator] = {}  # made lazily, one per device seen

    def __call__(self, logits: Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """logits [batch, vocab] float, one row each. Returns device tensors; call `to_lists()` to read them."""
        if logits.dim() != 2 or logits.shape[0] != len(rows) or not logits.is_floating_point():
            raise ValueError(f"logits must be float [batch={len(rows)}, vocab], got {tuple(logits.shape)} {logits.dtype}")
        if not rows:
            empty = torch.empty(0, device=logits.device)
            return SamplerOutput(empty.long(), empty.float(), None, None)
        if all(_is_plain_greedy(r) for r in rows):  # the common decode case: no table, no copy, one argmax
            return _with_logprobs(logits, logits.argmax(-1), rows)
        params = BatchParams.build(rows, logits.shape[1], logits.device)
        work = logits.to(torch.float32, copy=True)  # [batch, vocab]; the raw logits stay intact for logprobs
        apply_penalties(work, rows, params)
        apply_min_tokens(work, rows, self.eos_token_id)
        token_ids = self._choose(work, rows, params)
        return _with_logprobs(logits, token_ids, rows)

    def _choose(self, logits: Tensor, rows: Sequence[SamplingRow], params: BatchParams) -> Tensor:
        """[batch] int64: argmax for greedy rows, an exponential race over filtered probs for the rest."""
        greedy = [r.params.is_greedy for r in rows]
        if all(greedy):
            return logits.argmax(-1)
        scaled = logits / params.temperature[:, None]  # [batch, vocab]
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
            scaled = apply_top_k_top_p(scaled, params.top_k, params.top_p)
        if any(r.params.min_p > 0 for r in rows):
            scaled = apply_min_p(scaled, params.min_p)
        probs = scaled.softmax(-1)  # [batch, vocab]
        sampled = (probs / self._noise(rows, probs.shape[1], logits.device)).argmax(-1)  # [batch]
        return torch.where(params.greedy, logits.argmax(-1), sampled) if any(greedy) else sampled

    def _noise(self, rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> Tensor:
        """[batch, vocab] Exponential(1): seeded rows from their own stateless generator, the rest from ours."""
        q = torch.empty(len(rows), vocab, device=device)
        unseeded = [i for i, r in enumerate(rows) if r.params.seed is None]
        if len(unseeded) == len(rows):
            q.exponential_(generator=self._generator(device))
        elif unseeded:
            draw = torch.empty(len(unseeded), vocab, device=device).exponential_(generator=self._generator(device))
            q.index_copy_(0, _to_device(torch.tensor(unseeded), device), draw)
        for i, row in enumerate(rows):
            if row.params.seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed(step_seed(row.params.seed, len(row.output_token_ids)))
                q[i].exponential_(generator=gen)
        # A zero draw would turn prob 0 / 0 into NaN, and argmax picks NaN: a masked token could win.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The generator of unseeded rows on `device`: the one we were given, else one made there on first use."""
        device = _canonical(device)
        if self._given_generator is not None:
            if _canonical(self._given_generator.device) != device:
                raise ValueError(f"the sampler's generator is on {self._given_generator.device}, logits on {device}")
            return self._given_generator
        if device not in self._own_generators:
            self._own_generators[device] = torch.Generator(device=device)
            self._own_generators[device].seed()  # nondeterministic, like torch's default generator
        return self._own_generators[device]


def _is_plain_greedy(row: SamplingRow) -> bool:
    """Greedy with nothing that changes the logits first: argmax of the raw logits is the answer."""
    p = row.params
    return (
        p.is_greedy
        and p.repetition_penalty == 1.0
        and not p.frequency_penalty
        and not p.presence_penalty
        and len(row.output_token_ids) >= p.min_tokens
    )


def _canonical(device: torch.device) -> torch.device:
    """cuda and cuda:0 name one device; make them compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _with_logprobs(raw: Tensor, token_ids: Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
    """Logprobs under log_softmax(raw logits), as `logit - logsumexp`, never materializing [batch, vocab]."""
    raw = raw.float()
    normalizer = raw.logsumexp(-1)  # [batch]
    chosen = raw.gather(1, token_ids[:, None]).squeeze(1) - normalizer  # [batch]
    wants = tuple(min(r.params.logprobs, raw.shape[1]) for r in rows)
    if max(wants) == 0:
        return SamplerOutput(token_ids, chosen, None, None, wants)
    top_values, top_ids = raw.topk(max(wants), dim=-1)  # [batch, n]
    return SamplerOutput(token_ids, chosen, top_ids, top_values - normalizer[:, None], wants)
