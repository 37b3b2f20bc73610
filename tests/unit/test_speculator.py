"""The speculation policy without a model: adaptive k, switch-off by batch size and by acceptance."""

from __future__ import annotations

import pytest

from stageserve.engine.request import Request
from stageserve.engine.speculative import (
    DraftCall, SpeculativeConfig, Speculator, StepCostModel, _SeqState, expected_tokens,
)  # fmt: skip
from stageserve.sample.params import SamplingParams


class Recorder:
    def __init__(self, proposal):
        self.proposal, self.calls, self.released = proposal, [], []

    def propose(self, calls: list[DraftCall]):
        self.calls.append(calls)
        return [self.proposal[: c.k] for c in calls]

    def release(self, seq_id):
        self.released.append(seq_id)


def decoding(rid: str, prompt_len: int = 8, out: int = 1) -> Request:
    r = Request(rid, list(range(prompt_len)), SamplingParams(max_tokens=100, temperature=0.0))
    r.output_token_ids = [7] * out
    r.num_computed_tokens = r.num_tokens - 1
    return r


def test_sends_whole_history_first_then_only_new_tokens_with_acceptance():
    draft = Recorder([1, 2, 3, 4])
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4, adaptive=False), draft)
    r = decoding("a")
    spec.plan([r], 1000)
    first = draft.calls[-1][0]
    assert first.reset and first.new_token_ids == r.all_token_ids and first.k == 4
    assert r.spec_token_ids == [1, 2, 3, 4]
    spec.observe(r, 4, 2)  # the engine accepted 2 and appended them plus a bonus
    r.spec_token_ids = []
    r.output_token_ids += [1, 2, 9]
    r.num_computed_tokens = r.num_tokens - 1
    spec.plan([r], 1000)
    second = draft.calls[-1][0]
    assert not second.reset and second.new_token_ids == [1, 2, 9] and second.num_accepted == 2
    spec.release("a")
    assert draft.released == ["a"]


def test_failed_draft_means_no_speculation_and_a_reset_next_time():
    class Failing(Recorder):
        def propose(self, calls):
            self.calls.append(calls)
            return [None for _ in calls]

    draft = Failing([])
    spec = Speculator(SpeculativeConfig(adaptive=False), draft)
    r = decoding("a")
    spec.plan([r], 1000)
    assert r.spec_token_ids == []
    spec.plan([r], 1000)
    assert draft.calls[-1][0].reset and draft.calls[-1][0].new_token_ids == r.all_token_ids


def test_no_speculation_above_the_batch_threshold():
    draft = Recorder([1, 2])
    spec = Speculator(SpeculativeConfig(max_batch_size=2), draft)
    batch = [decoding(str(i)) for i in range(3)]
    spec.plan(batch, 1000)
    assert not draft.calls and all(not r.spec_token_ids for r in batch)


def test_k_never_overshoots_max_tokens():
    draft = Recorder([1, 2, 3, 4])
    spec = Speculator(SpeculativeConfig(adaptive=False), draft)
    r = decoding("a", out=98)  # 2 tokens left: one draft plus the bonus
    spec.plan([r], 1000)
    assert r.spec_token_ids == [1]


def test_low_acceptance_switches_off_and_probes_rarely():
    draft = Recorder([1, 2, 3, 4])
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4, probe_interval=4), draft)
    for _ in range(5):
        spec.observe_step(1, 1, 0.010)
        spec.observe_step(1, 5, 0.013)
    r = decoding("a")
    ks = []
    for _ in range(80):
        spec.plan([r], 1000)
        ks.append(len(r.spec_token_ids))
        if r.spec_token_ids:
            spec.observe(r, len(r.spec_token_ids), 0)  # every draft token rejected
        r.spec_token_ids = []
    assert ks[0] > 0
    assert sum(1 for k in ks[10:] if k) <= 4, "a draft that is never right is only probed, ever more rarely"


def test_high_acceptance_keeps_k_high():
    draft = Recorder([1] * 8)
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=8), draft)
    for n in range(1, 10):
        spec.observe_step(1, n, 0.010 + 0.0005 * n)
    r = decoding("a")
    for _ in range(5):
        spec.plan([r], 1000)
        spec.observe(r, len(r.spec_token_ids), len(r.spec_token_ids))
        r.spec_token_ids = []
    spec.plan([r], 1000)
    assert len(r.spec_token_ids) >= 6


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0 and abs(expected_tokens(0.5, 2) - 1.75) < 1e-9


def test_cost_model_estimates_unmeasured_verify_shapes_from_below():
    costs = StepCostModel(prior_token_cost=0.1)
    assert costs.time(4, 1) is None and costs.time(4, 3) is None  # nothing without the plain step
    costs.observe(4, 1, 1.0)
    assert abs(costs.time(4, 3) - 1.2) < 1e-9  # the prior: 1 + 0.1 per extra query token
    costs.observe(2, 3, 5.0)  # no plain step at batch 2: bounds only the shapes it dominates
    assert costs.time(4, 3) == 5.0 and costs.time(4, 4) == 5.0 and abs(costs.time(4, 2) - 1.1) < 1e-9
    costs.observe(1, 1, 1.0)
    costs.observe(1, 5, 8.0)  # an eager verify step: 8x a plain one, carried to other batch sizes and lengths
    assert abs(costs.time(4, 5) - 8.0) < 1e-9
    assert abs(costs.time(4, 2) - 8.0 * 1.1 / 1.4) < 1e-9
    assert costs.measured(1, 5) and not costs.measured(4, 5)
    costs.observe(1, 5, 2.0)  # the second sample replaces the first (which paid one-time costs)...
    assert abs(costs.time(1, 5) - 2.0) < 1e-9
    costs.observe(1, 5, 12.0)  # ...then a decayed mean
    assert abs(costs.time(1, 5) - 3.0) < 1e-9


def test_adaptive_k_waits_for_a_measured_plain_step_at_its_batch_size():
    draft = Recorder([1, 2, 3, 4])
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4), draft)
    r = decoding("a")
    spec.plan([r], 1000)
    assert not draft.calls and r.spec_token_ids == []  # a plain step first, to measure it
    spec.observe_step(1, 1, 0.001)  # a CUDA-graph replay
    spec.observe_step(1, 5, 0.008)  # an eager verify step of 4 drafts: never worth it, even at full acceptance
    for _ in range(3):
        spec.plan([r], 1000)
        assert r.spec_token_ids == []
    spec.observe_step(1, 5, 0.0012)  # ...until verify steps are nearly as cheap (decays toward 1.2 ms)
    for _ in range(40):
        spec.observe_step(1, 5, 0.0012)
    for _ in range(Speculator.QUIET_STEPS + 1):  # a "no" stands for a few steps of an unchanged batch
        spec.plan([r], 1000)
        if r.spec_token_ids:
            break
    assert r.spec_token_ids, "a cheap verify step and a draft that has never been wrong: speculate"


def test_no_probes_where_even_a_perfect_draft_cannot_pay():
    draft = Recorder([1, 2, 3, 4])
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4, probe_interval=4), draft)
    for n in range(1, 6):  # a 1-token step replays a graph; every verify step runs eagerly at 8x its cost
        spec.observe_step(1, n, 0.001 if n == 1 else 0.008 + 0.0001 * n)
    r = decoding("a")
    for _ in range(200):
        spec.plan([r], 1000)
        assert r.spec_token_ids == []
    assert not draft.calls


def batch_of(n: int) -> list[Request]:
    return [decoding(f"s{i}") for i in range(n)]


def accepting(spec: Speculator, r: Request, steps: int, accept) -> None:
    """Pretend `steps` verifications of r, each accepting `accept(4)` of 4 drafts."""
    spec.seqs.setdefault(r.request_id, _SeqState())
    for _ in range(steps):
        spec.observe(r, 4, accept(4))


def test_batch_speculates_at_one_padded_shape_with_fewer_drafts_for_poor_sequences():
    draft = Recorder([1, 2, 3, 4])
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4), draft)
    batch = batch_of(4)
    spec.observe_step(4, 1, 0.0010)  # plain step: a graph replay
    for q in range(2, 6):
        spec.observe_step(4, q, 0.0012)  # verify steps replay graphs too
    for r in batch[:2]:
        accepting(spec, r, 8, lambda k: k)  # always right
    for r in batch[2:]:
        accepting(spec, r, 8, lambda k: 0)  # always wrong
    spec.plan(batch, 1000)
    assert [len(r.spec_token_ids) for r in batch] == [4, 4, 1, 1], "good sequences get K, poor ones one draft"
    assert len(draft.calls) == 1 and len(draft.calls[0]) == 4


def test_batch_skips_verify_steps_that_cost_more_than_they_yield():
    draft = Recorder([1, 2, 3, 4])
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4, probe_interval=2), draft)
    batch = batch_of(8)
    spec.observe_step(8, 1, 0.0010)
    spec.observe_step(8, 5, 0.0080)  # eager verify: even 5 tokens per sequence could not pay 8x
    for r in batch:
        accepting(spec, r, 8, lambda k: k)
    for _ in range(50):
        spec.plan(batch, 1000)
        assert all(r.spec_token_ids == [] for r in batch)
    assert not draft.calls, "no probes where even a perfect draft cannot pay"


def test_unmeasured_batch_size_inherits_the_measured_verify_overhead():
    draft = Recorder([1, 2, 3, 4])
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4), draft)
    for q in range(1, 6):  # batch 1: plain replays a graph, every verify step runs eagerly
        spec.observe_step(1, q, 0.001 if q == 1 else 0.008)
    spec.observe_step(4, 1, 0.0011)
    batch = batch_of(4)
    spec.plan(batch, 1000)
    assert not draft.calls, "an unmeasured (4, q) shape is not assumed cheaper than the 8x measured at batch 1"


def test_batch_decision_weighs_the_sum_of_expected_tokens():
    def plan_with(good: int) -> int:
        draft = Recorder([1, 2, 3, 4])
        spec = Speculator(SpeculativeConfig(num_speculative_tokens=4), draft)
        batch = batch_of(4)
        spec.observe_step(4, 1, 0.0010)
        for q in range(2, 6):
            spec.observe_step(4, q, 0.0025)  # a verify step costs 2.5 plain steps whatever its length
        for i, r in enumerate(batch):
            accepting(spec, r, 8, (lambda k: k) if i < good else (lambda k: 0))
        spec.plan(batch, 1000)
        return max(len(r.spec_token_ids) for r in batch)

    # A plain step yields 4 tokens; a verify step must yield 2.5x that: one perfect sequence of four
    # brings ~4 + 3.9, two bring ~4 + 7.8.
    assert plan_with(0) == 0 and plan_with(1) == 0
    assert plan_with(2) == 4 and plan_with(4) == 4


def test_room_caps_each_sequence_and_fixed_k_ignores_costs():
    draft = Recorder([1, 2, 3, 4])
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4, adaptive=False), draft)
    batch = batch_of(2)
    batch[1].output_token_ids += [7] * 97  # 2 tokens left: one draft plus the bonus
    batch[1].num_computed_tokens = batch[1].num_tokens - 1
    spec.plan(batch, 1000)
    assert [len(r.spec_token_ids) for r in batch] == [4, 1]


@pytest.mark.parametrize("min_gain, speculates", [(0.0, True), (0.1, False)])
def test_marginal_predicted_gains_stay_off_under_the_margin(min_gain, speculates):
    """A verify step that predicts ~5% more throughput than a plain step: taken without a margin, left alone
    with the default 10% (predictions run optimistic, and a marginal win predicted is a loss measured)."""
    draft = Recorder([1, 2, 3, 4])
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=1, min_gain=min_gain, probe_interval=10**6), draft)
    r = decoding("a")
    spec.observe_step(1, 1, 0.0010)
    spec.observe_step(1, 2, 0.0019)  # 2 query tokens cost 1.9x
    accepting(spec, r, 20, lambda k: k)  # always right: 2 tokens per verify step -> 2 / 1.9 = 1.05x
    spec.plan([r], 1000)
    assert bool(r.spec_token_ids) is speculates


def test_an_unchanged_batch_keeps_a_no_for_a_few_steps_and_a_changed_one_recomputes(monkeypatch):
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4, probe_interval=10**6), Recorder([1, 2, 3, 4]))
    spec.observe_step(1, 1, 0.001)
    spec.observe_step(1, 5, 0.008)  # never worth it
    spec.observe_step(2, 1, 0.001)
    decided = []
    choose = spec._choose_ks
    monkeypatch.setattr(spec, "_choose_ks", lambda *a: decided.append(a[2]) or choose(*a))
    r = decoding("a")
    for _ in range(Speculator.QUIET_STEPS + 1):
        spec.plan([r], 1000)
    assert decided == [1] and r.spec_token_ids == []  # decided once, kept while the batch stayed the same
    spec.plan([r], 1000)
    assert decided == [1, 1]  # the quiet steps ran out
    spec.plan([r, decoding("b")], 1000)
    assert decided == [1, 1, 2]  # a new batch: decided again at once
    spec.plan([decoding("c"), decoding("d")], 1000)
    assert decided == [1, 1, 2, 2]  # as large, but other sequences (a new request has its own prospects)


def timed_draft(durations: list[float], proposal: list[int]):
    """(a Recorder draft whose every round advances the clock by the next duration, that clock)."""
    now, left = [0.0], iter(durations)

    class Timed(Recorder):
        def propose(self, calls):
            now[0] += next(left)
            return super().propose(calls)

    return Timed(proposal), lambda: now[0]


def test_only_warm_rounds_set_the_draft_cost():
    """A sequence's first draft call carries its prompt, and a call after idle steps wakes the channel:
    both take longer than a speculating step's call, and timed, they priced speculation out after one
    call on an H200 (2026-12-04). Only rounds right after the previous step's, without resets, count."""
    draft, clock = timed_draft([0.010, 0.0005, 0.0005] + [0.0005] * 50, [1, 2, 3, 4])  # the reset round, then ordinary ones
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4), draft, clock=clock)
    spec.observe_step(1, 1, 0.0015)
    for q in range(2, 6):
        spec.observe_step(1, q, 0.0016)
    r = decoding("a")
    spec.plan([r], 1000)
    assert draft.calls[-1][0].reset and spec.draft_time is None
    spec.observe(r, len(r.spec_token_ids), len(r.spec_token_ids))
    r.output_token_ids += r.spec_token_ids + [9]
    r.spec_token_ids = []
    r.num_computed_tokens = r.num_tokens - 1
    spec.plan([r], 1000)
    assert r.spec_token_ids, "a 10 ms reset round must not price out a draft whose rounds take 0.5 ms"
    assert spec.draft_time == pytest.approx(0.0005)


def test_a_call_after_idle_steps_does_not_set_the_draft_cost():
    draft, clock = timed_draft([0.010, 0.003, 0.0005], [1, 2, 3, 4])  # the reset round, a cold one, a warm one
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4, adaptive=False), draft, clock=clock)
    r = decoding("a")
    spec.plan([r], 1000)  # reset: not timed
    spec.plans += 5  # five steps without a call
    spec.plan([r], 1000)  # cold: not timed
    assert spec.draft_time is None
    spec.plan([r], 1000)  # warm
    assert spec.draft_time == pytest.approx(0.0005)
