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

Choosing k (`adaptive`), once per step for the whole batch: a sequence's per-token acceptance a is
estimated from its recent verifications (each accepts m of k: m successes, one failure unless m == k,
decayed). Proposing k tokens yields E(k) = (1 - a^(k+1)) / (1 - a) tokens (Leviathan et al. 2023),
discounted by how often the draft proposes anything at all. A step's cost depends on its shape (B
sequences, Q query tokens each: verify steps are padded to their longest run and replay a CUDA graph of
that shape where one exists), so for each step-wide k in [1, K] the batch's expected tokens
sum_i E_i / (T(B, k + 1) + D) are compared with a plain step's B / T(B, 1); T is measured per shape
(`StepCostModel`) and D is the measured draft round trip of warm rounds: right after the previous step's
round and sending only new tokens (a round that resends a whole history, as every sequence's first does,
or that wakes an idle channel, is not what a speculating step costs); until one is measured D counts as
0. The best k wins; k = 0 means no speculation (no draft call at all). Each sequence brings at most the
drafts its acceptance makes useful (it pads anyway). When nobody speculates, the batch probes with k = 1 after `probe_interval` steps so the
estimates can recover, and waits twice as long after each probe that finds nothing (up to 16x), so a
hopeless draft costs next to nothing; no probes at all where even an always-right draft could not pay.
Above `max_batch_size` running sequences, decode is no longer memory-bound and nobody speculates.
"""

from __future__ import annotations

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
    adaptive: bool = True  # choose k per step from acceptance and measured step costs; else always K
    max_batch_size: int = 16  # more running sequences than this: no speculation
    probe_interval: int = 16  # steps between probes of a sequence whose k dropped to 0
    prior_token_cost: float = 0.1  # cost of one extra query token relative to a 1-token step, until measured
    min_gain: float = 0.1  # speculate only when predicted throughput beats a plain step by this fraction


class StepCostModel:
    """Measured wall time of decode and verify steps by shape: (sequences B, query tokens per sequence Q).

    A decayed mean per measured shape, in which the second sample replaces the first: the first run of a
    shape pays one-time costs (allocator growth, cold caches, lazy initialisation) that make it look slower
    than it is, and a verify shape that looks slow would not be tried again for a long time. An unmeasured
    verify shape (Q > 1) is estimated only once the plain step of its batch size is measured, by the largest
    of three lower bounds, so that it is never thought cheaper than what was measured:

        the prior: T(B, 1) * f(Q), f(Q) = 1 + prior_token_cost * (Q - 1)
        any measured verify step it dominates: T(b, q) for b <= B, q <= Q (a larger step is no faster)
        any measured verify step's cost over its plain step, carried over: T(B, 1) * T(b, q) / T(b, 1) *
            f(Q) / f(q) (verify steps take the same path, graph or eager, at every batch size)
    """

    def __init__(self, prior_token_cost: float, decay: float = 0.9):
        self.prior_token_cost = prior_token_cost
        self.decay = decay
        self.times: dict[tuple[int, int], float] = {}
        self.samples: dict[tuple[int, int], int] = {}

    def observe(self, batch: int, query_len: int, seconds: float) -> None:
        shape = (batch, query_len)
        self.samples[shape] = self.samples.get(shape, 0) + 1
        old = self.times.get(shape) if self.samples[shape] > 2 else None
        self.times[shape] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def measured(self, batch: int, query_len: int) -> bool:
        return (batch, query_len) in self.times

    def time(self, batch: int, query_len: int) -> float | None:
        """Step time of this shape, measured or estimated; None while T(batch, 1) is unmeasured."""
        if query_len == 1 or (batch, query_len) in self.times:
            return self.times.get((batch, query_len))
        times = self.step_times(batch, query_len)
        return times[-1] if times is not None else None

    def step_times(self, batch: int, max_query_len: int) -> list[float] | None:
        """[T(batch, 1), ..., T(batch, max_query_len)] in one pass over the samples (a plan asks for every
        length); None while T(batch, 1) is unmeasured."""
        plain = self.times.get((batch, 1))
        if plain is None:
            return None
        scale = self._prior_factor
        ratio = 1.0  # the largest measured verify-over-plain cost, per prior factor (1: the prior itself)
        dominated = [0.0] * (max_query_len + 1)  # by query length: the slowest measured step of <= batch
        for (b, q), t in self.times.items():
            if q == 1:
                continue
            base = self.times.get((b, 1))
            if base:
                ratio = max(ratio, t / base / scale(q))
            if b <= batch and q <= max_query_len:
                dominated[q] = max(dominated[q], t)
        times, floor = [], 0.0
        for q in range(1, max_query_len + 1):
            floor = max(floor, dominated[q])
            measured = self.times.get((batch, q))
            times.append(measured if measured is not None else max(plain * ratio * scale(q), floor))
        return times

    def _prior_factor(self, query_len: int) -> float:
        return 1 + self.prior_token_cost * (query_len - 1)


MIN_DRAFT_GAIN = 0.05  # expected accepted tokens below which a sequence proposes no further draft


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

    @property
    def acceptance(self) -> float:
        return self.successes / (self.successes + self.failures)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.calls

    def gain(self, k: int) -> float:
        """Expected extra tokens from verifying k drafts (beyond the one a plain step yields)."""
        return self.hit_rate * (expected_tokens(self.acceptance, k) - 1) if k > 0 else 0.0

    def useful_drafts(self, limit: int) -> int:
        """Drafts worth proposing: the j-th adds hit_rate * a^j expected tokens; at least one, so the
        estimate keeps learning while the batch speculates."""
        a, h = self.acceptance, self.hit_rate
        k = 1
        while k < limit and h * a ** (k + 1) >= MIN_DRAFT_GAIN:
            k += 1
        return k


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
    QUIET_STEPS = 8  # steps an unchanged batch keeps a "no speculation" decision before it is recomputed

    def __init__(self, config: SpeculativeConfig, draft: DraftClient, clock: Callable[[], float] = time.monotonic):
        self.config, self.draft, self.clock = config, draft, clock
        self.costs = StepCostModel(config.prior_token_cost)
        self.draft_time: float | None = None  # decayed mean seconds of a warm proposal round (see plan)
        self.seqs: dict[str, _SeqState] = {}
        self.steps_off = 0  # steps nobody speculated though a good draft could have paid
        self.quiet = 0  # steps left in which an unchanged batch keeps the last "no speculation" decision
        self.quiet_key: tuple | None = None  # (running count, eligible request ids) when that decision was made
        self.probe_after = 0  # steps off before the next probe; doubles while probes find nothing worth it
        self.counters = SpecCounters()
        self.plans = 0  # plan() calls so far (one per engine step)
        self.last_call = -2  # the plan() that last called the draft

    def plan(self, running: list[Request], max_model_len: int) -> None:
        """Set `spec_token_ids` on the running requests that speculate this step (blocking draft call)."""
        self.plans += 1
        for r in running:  # drafts of a request the budget left out last step are stale now
            r.spec_token_ids = []
        eligible = [r for r in running if _is_decoding(r)]
        if not eligible or len(running) > self.config.max_batch_size:
            return
        batch_key = (len(running), tuple(r.request_id for r in eligible))
        if self.quiet > 0 and self.quiet_key == batch_key:
            # Off, and the same sequences as then: the decision stands for a few steps (it costs tens of
            # microseconds of Python per step at batch 16, against ~1-3 ms steps on a GPU). The steps count
            # toward the next probe as if each had been decided.
            self.quiet -= 1
            self.steps_off += 1
            return
        self.quiet = 0
        states = [self.seqs.setdefault(r.request_id, _SeqState()) for r in eligible]
        rooms = [
            max(0, min(r.sampling_params.max_tokens - len(r.output_token_ids) - 1, max_model_len - r.num_tokens))
            for r in eligible
        ]  # fmt: skip
        ks = self._choose_ks(states, rooms, len(running))
        self.quiet_key = batch_key
        calls, targets = [], []
        for r, state, k in zip(eligible, states, ks, strict=True):
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
        warm = self.last_call == self.plans - 1
        self.last_call = self.plans
        if warm and not any(call.reset for call in calls):
            # What a speculating step pays: a round right after the previous step's, with only new tokens.
            # A round with a reset carries a whole history (a new sequence's prompt), and the first round
            # after an idle spell wakes the channel and the server (both ~2.2-2.5 ms against ~0.9 ms back
            # to back on an H200, 2026-12-04); timed, they priced the Draft service out after its first
            # call and kept it out, since an idle draft is only ever called cold.
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

    def _choose_ks(self, states: list[_SeqState], rooms: list[int], batch: int) -> list[int]:
        """Drafts per eligible sequence this step: the step-wide k with the best predicted throughput,
        each sequence capped by its room and its useful drafts; all 0 when no k beats a plain step."""
        max_k = self.config.num_speculative_tokens
        if not self.config.adaptive:
            return [min(max_k, room) for room in rooms]
        none = [0] * len(states)
        times = self.costs.step_times(batch, max_k + 1)  # times[q - 1]: a step of q query tokens each
        if times is None:
            # Every speedup is relative to a plain step at this batch size, so run one first. Guessing it
            # from verify steps overrates it badly where plain steps replay a CUDA graph and verify steps
            # run eagerly (an H200: ~1 ms against ~8 ms).
            return none
        draft = self.draft_time or 0.0
        useful = [s.useful_drafts(max_k) for s in states]
        # Tokens per second of a plain step, raised by the margin: predictions run ~10-20% optimistic
        # (BENCHMARKS.md, cost model), and a marginal win predicted is a loss measured.
        bar = batch / times[0] * (1 + self.config.min_gain)
        best_ks, best = None, bar
        for k in range(1, max_k + 1):
            ks = [min(k, room, u) for room, u in zip(rooms, useful)]
            longest = max(ks)
            if longest < k:  # the same step as a smaller k
                break
            tokens = batch + sum(s.gain(kk) for s, kk in zip(states, ks))
            throughput = tokens / (times[longest] + draft)
            if throughput > best:
                best_ks, best = ks, throughput
        if best_ks is not None:
            self.steps_off, self.probe_after = 0, 0
            return best_ks
        if not self._could_pay(batch, sum(1 for room in rooms if room > 0), times, draft, bar):
            self.quiet = self.QUIET_STEPS
            return none  # not even a draft that is always right would pay here: no probes either
        self.steps_off += 1
        self.probe_after = self.probe_after or self.config.probe_interval
        if self.steps_off < self.probe_after:
            self.quiet = min(self.QUIET_STEPS, self.probe_after - self.steps_off - 1)
            return none
        self.steps_off = 0  # look again: the text may have changed
        self.probe_after = min(2 * self.probe_after, 16 * self.config.probe_interval)
        return [min(1, room) for room in rooms]

    def _could_pay(self, batch: int, num_drafting: int, times: list[float], draft: float, bar: float) -> bool:
        """Whether some k would clear `bar` (a plain step's throughput with the margin) if every draft of
        `num_drafting` sequences were accepted."""
        return any(
            (batch + num_drafting * k) / (times[k] + draft) > bar for k in range(1, self.config.num_speculative_tokens + 1)
        )

    def observe_step(self, num_seqs: int, query_len: int, seconds: float) -> None:
        """The wall time of a decode or verify step of `num_seqs` sequences, each padded to `query_len` tokens."""
        self.costs.observe(num_seqs, query_len, seconds)

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

