"""Speculative decoding policy: which sequences speculate, with how many draft tokens, from which draft.

Life of a sequence in the speculator:

    first plan() it is eligible for (running, caught up with its tokens) -> the draft gets its whole
        history (reset) and proposes up to k tokens, which the runner verifies as extra query tokens
    every later plan() -> only the tokens appended since the last call are sent, with how many of the
        last proposal were accepted (the draft rolls its own state back past the rest)
    draft failed or unavailable -> no speculation this step; the next call resends the whole history
    release() on finish or abort -> the draft forgets it

The draft itself sits behind `DraftClient`: in-process proposers for `generate --local`, the Draft
service over gRPC for the decode stage. Nothing here imports grpc.

Choosing k (`adaptive`): a sequence's per-token acceptance a is estimated from its recent
verifications (each accepts m of k: m successes, one failure unless m == k, decayed). Proposing k
tokens yields E(k) = (1 - a^(k+1)) / (1 - a) tokens per step (Leviathan et al. 2023), discounted by
how often the draft proposes anything at all. The cost of that step, relative to a plain one, is
T(B + k) / T(B) + D / T(B), where T(n) is the measured time of a step of n query tokens and D the
measured draft round trip. The k in [0, K] with the best E(k) / cost wins; k = 0 means no speculation
(no draft call at all when every sequence picks 0). A sequence that stopped speculating probes with
k = 1 after `probe_interval` steps so its estimate can recover, and waits twice as long after each
probe that finds nothing (up to 16x), so a hopeless draft costs next to nothing. Above `max_batch_size` running sequences,
decode is no longer memory-bound and nobody speculates.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from stageserve.engine.request import Request


@dataclass(frozen=True)
class DraftCall:
    """One sequence's part of a proposal round: what the draft has not seen yet, and how many to propose."""

    seq_id: str
    new_token_ids: list[int]
    k: int
    reset: bool  # new_token_ids is the whole history: drop whatever the draft holds for seq_id
    num_accepted: int | None  # of the previous proposal; None when unknown (first call, reset)


class DraftClient(Protocol):
    def propose(self, calls: list[DraftCall]) -> list[list[int] | None]:
        """Proposals in call order; None where that sequence's draft failed or is unavailable now."""
        ...

    def release(self, seq_id: str) -> None:
        """Forget a sequence; never raises and never blocks for long."""
        ...


@dataclass(frozen=True)
class SpeculativeConfig:
    """The engine's speculation knobs (EngineConfig's spec_* fields)."""

    num_speculative_tokens: int = 4  # K: the most draft tokens per sequence per step
    adaptive: bool = True  # choose k per sequence from acceptance and measured costs; else always K
    max_batch_size: int = 16  # more running sequences than this: no speculation
    probe_interval: int = 16  # steps between probes of a sequence whose k dropped to 0
    prior_token_cost: float = 0.1  # cost of one extra query token relative to a 1-token step, until measured


class StepCostModel:
    """Measured wall time of a step by its number of query tokens: a decayed mean per size, interpolated.

    Only steps that speculate or decode add samples, so sizes are those decode actually runs.
    """

    def __init__(self, prior_token_cost: float, decay: float = 0.9):
        self.prior_token_cost = prior_token_cost
        self.decay = decay
        self.sizes: list[int] = []  # sorted
        self.times: dict[int, float] = {}

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens not in self.times:
            bisect.insort(self.sizes, num_tokens)
            self.times[num_tokens] = seconds
        else:
            self.times[num_tokens] = self.decay * self.times[num_tokens] + (1 - self.decay) * seconds

    def measured(self, num_tokens: int) -> bool:
        return num_tokens in self.times

    def time(self, num_tokens: int) -> float | None:
        """Interpolated step time for `num_tokens`; None before any sample."""
        if not self.sizes:
            return None
        i = bisect.bisect_left(self.sizes, num_tokens)
        if i < len(self.sizes) and self.sizes[i] == num_tokens:
            return self.times[num_tokens]
        if 0 < i < len(self.sizes):
            lo, hi = self.sizes[i - 1], self.sizes[i]
            w = (num_tokens - lo) / (hi - lo)
            return (1 - w) * self.times[lo] + w * self.times[hi]
        nearest = self.sizes[min(i, len(self.sizes) - 1)]
        # Outside the measured range: scale the nearest sample by the prior per-token cost.
        base = self.times[nearest] / (1 + self.prior_token_cost * (nearest - 1))
        return base * (1 + self.prior_token_cost * (num_tokens - 1))

    def ratio(self, base_tokens: int, extra_tokens: int) -> float:
        """T(base + extra) / T(base), from the prior until both sizes can be estimated."""
        t0, t1 = self.time(base_tokens), self.time(base_tokens + extra_tokens)
        if t0 is None or t1 is None or t0 <= 0:
            return 1 + self.prior_token_cost * extra_tokens / max(base_tokens, 1)
        return max(t1 / t0, 1.0)


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verification yields when each draft token is accepted with probability `acceptance`."""
    a = min(max(acceptance, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


@dataclass
class _SeqState:
    num_sent: int = 0  # tokens of the sequence the draft holds
    reset: bool = True
    num_accepted: int | None = None  # of the last proposal, reported with the next call
    successes: float = 1.0  # decayed accepted draft tokens (a Beta(1, 1) prior)
    failures: float = 1.0  # decayed rejections
    hits: float = 1.0  # decayed calls that proposed something
    calls: float = 1.0
    steps_off: int = 0
    probe_after: int = 0  # steps off before the next probe; doubles while probes find nothing worth it

    @property
    def acceptance(self) -> float:
        return self.successes / (self.successes + self.failures)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.calls


@dataclass
class SpecCounters:
    """Totals over the speculator's lifetime, for metrics and benchmarks."""

    steps: int = 0  # steps in which at least one sequence verified draft tokens
    draft_calls: int = 0
    draft_unavailable: int = 0  # sequence-steps with no proposal: the draft failed or is down
    proposed: int = 0
    accepted: int = 0
    verifications: int = 0  # sequence-steps that verified draft tokens (each also yields one bonus token)
    draft_seconds: float = 0.0
    per_request: dict[str, tuple[int, int]] = field(default_factory=dict)  # live requests: (proposed, accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verifying sequence-step: accepted drafts plus the bonus token."""
        return (self.accepted + self.verifications) / self.verifications if self.verifications else 0.0


class Speculator:
    DECAY = 0.8  # weight of the past in acceptance estimates: about the last 5 verifications count

    def __init__(self, config: SpeculativeConfig, draft: DraftClient, clock: Callable[[], float] = time.monotonic):
        self.config, self.draft, self.clock = config, draft, clock
        self.costs = StepCostModel(config.prior_token_cost)
        self.draft_time: float | None = None  # decayed mean seconds of one proposal round
        self.seqs: dict[str, _SeqState] = {}
        self.counters = SpecCounters()

    def plan(self, running: list[Request], max_model_len: int) -> None:
        """Set `spec_token_ids` on the running requests that speculate this step (blocking draft call)."""
        for r in running:  # drafts of a request the budget left out last step are stale now
            r.spec_token_ids = []
        eligible = [r for r in running if _is_decoding(r)]
        if not eligible or len(running) > self.config.max_batch_size:
            return
        calls, targets = [], []
        for r in eligible:
            state = self.seqs.setdefault(r.request_id, _SeqState())
            room = min(r.sampling_params.max_tokens - len(r.output_token_ids) - 1, max_model_len - r.num_tokens)
            k = min(self._choose_k(state, len(running)), room)
            if k <= 0:
                continue
            tokens = r.token_slice(state.num_sent, r.num_tokens)
            calls.append(DraftCall(r.request_id, tokens, k, state.reset, None if state.reset else state.num_accepted))
            targets.append((r, state))
        if not calls:
            return
        start = self.clock()
        proposals = self.draft.propose(calls)
        elapsed = self.clock() - start
        self.draft_time = elapsed if self.draft_time is None else 0.8 * self.draft_time + 0.2 * elapsed
        self.counters.draft_calls += 1
        self.counters.draft_seconds += elapsed
        for (r, state), call, proposal in zip(targets, calls, proposals, strict=True):
            if proposal is None:  # resend everything once the draft is back (it may have lost the sequence)
                state.num_sent, state.reset, state.num_accepted = 0, True, None
                self.counters.draft_unavailable += 1
                continue
            state.num_sent, state.reset, state.num_accepted = r.num_tokens, False, 0
            state.calls = self.DECAY * state.calls + 1
            state.hits = self.DECAY * state.hits + (1 if proposal else 0)
            r.spec_token_ids = [t for t in proposal[: call.k]]

    def _choose_k(self, state: _SeqState, batch: int) -> int:
        max_k = self.config.num_speculative_tokens
        if not self.config.adaptive:
            return max_k
        if not self.costs.measured(batch):
            # Every speedup is relative to a plain step at this batch size, so run one first. Guessing it
            # from verify steps with the prior per-token cost overrates it badly where plain steps replay a
            # CUDA graph and verify steps run eagerly (an H200: ~1 ms against ~8 ms).
            return 0
        base = self.costs.time(batch)
        draft = (self.draft_time or 0.0) / base if base else 0.0
        best_k, best = 0, 1.0
        for k in range(1, max_k + 1):
            gain = 1 + state.hit_rate * (expected_tokens(state.acceptance, k) - 1)
            speedup = gain / (self.costs.ratio(batch, k) + draft)
            if speedup > best:
                best_k, best = k, speedup
        if best_k == 0:
            if not self._could_pay(batch, draft):
                return 0  # not even a draft that is always right would pay here: no probes either
            state.steps_off += 1
            state.probe_after = state.probe_after or self.config.probe_interval
            if state.steps_off >= state.probe_after:  # look again: the text may have changed
                state.steps_off = 0
                state.probe_after = min(2 * state.probe_after, 16 * self.config.probe_interval)
                return 1
        else:
            state.steps_off, state.probe_after = 0, 0
        return best_k

    def _could_pay(self, batch: int, draft: float) -> bool:
        """Whether some k would speed up a sequence whose drafts are all accepted, at this batch size."""
        k_max = self.config.num_speculative_tokens
        return any((k + 1) / (self.costs.ratio(batch, k) + draft) > 1.0 for k in range(1, k_max + 1))

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.costs.observe(num_tokens, seconds)

    def observe(self, request: Request, num_proposed: int, num_accepted: int) -> None:
        """A verification of `num_proposed` draft tokens accepted the first `num_accepted`."""
        state = self.seqs.get(request.request_id)
        if state is not None:
            state.num_accepted = num_accepted
            state.successes = self.DECAY * state.successes + num_accepted
            state.failures = self.DECAY * state.failures + (1 if num_accepted < num_proposed else 0)
        c = self.counters
        c.proposed += num_proposed
        c.accepted += num_accepted
        c.verifications += 1
        proposed, accepted = c.per_request.get(request.request_id, (0, 0))
        c.per_request[request.request_id] = (proposed + num_proposed, accepted + num_accepted)

    def release(self, request_id: str) -> None:
        self.counters.per_request.pop(request_id, None)
        if self.seqs.pop(request_id, None) is not None:
            self.draft.release(request_id)


def _is_decoding(r: Request) -> bool:
    """Caught up with its tokens except the last sampled one: the only state a draft can extend."""
    return not r.prefill_only and not r.is_finished and r.num_computed_tokens == r.num_tokens - 1

