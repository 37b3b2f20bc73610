"""The token-budget scheduler over a real KVCacheManager, with no model: a fake engine loop advances
`num_computed_tokens` and appends made-up tokens, so every step's bookkeeping can be checked."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from stageserve.common.errors import ResourceExhaustedError
from stageserve.engine.config import EngineConfig
from stageserve.engine.kv_cache_manager import KVCacheManager, hash_block
from stageserve.engine.request import Request, RequestStatus
from stageserve.engine.scheduler import Scheduler, SchedulerOutput
from stageserve.sample.params import SamplingParams

MAX_STEPS = 5000  # far more than any workload here needs; reaching it means a deadlock or livelock


class FakeEngine:
    """The engine's update loop around a Scheduler, minus the model. Checks invariants every step."""

    def __init__(self, *, num_blocks=64, block_size=4, budget=32, max_num_seqs=8, max_waiting=1024, prefix=True):
        self.config = EngineConfig(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_batched_tokens=budget,
            max_num_seqs=max_num_seqs,
            max_waiting=max_waiting,
            enable_prefix_caching=prefix,
        )
        self.kv = KVCacheManager(num_blocks, block_size, prefix)
        self.scheduler = Scheduler(self.config, self.kv)
        self.live: dict[str, Request] = {}
        self.steps = 0
        self.outputs: list[SchedulerOutput] = []

    def add(self, request_id: str, prompt, max_tokens: int = 4, salt: str | None = None) -> Request:
        assert -(-(len(prompt) + max_tokens) // self.config.block_size) <= self.config.num_blocks, "engine rejects this"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = Request(request_id, list(prompt), params, cache_salt=salt)
        self.scheduler.add(request)
        self.live[request_id] = request
        return request

    def abort(self, request: Request) -> None:
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self.scheduler.remove_finished()
        self.live.pop(request.request_id, None)
        check_invariants(self)

    def step(self) -> SchedulerOutput:
        running_before = list(self.scheduler.running)
        out = self.scheduler.schedule()
        self.outputs.append(out)
        self.steps += 1
        check_schedule(self, out, running_before)
        for s in out.scheduled:
            request = s.request
            request.num_computed_tokens += s.num_new_tokens
            self.kv.cache_blocks(request)
            if request.num_computed_tokens == request.num_tokens:
                request.output_token_ids.append(fake_token(request))
                if len(request.output_token_ids) >= request.sampling_params.max_tokens:
                    self.scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
                    self.live.pop(request.request_id)
        self.scheduler.remove_finished()
        check_invariants(self)
        return out

    def run(self, max_steps: int = MAX_STEPS) -> None:
        while self.scheduler.has_work():
            assert self.steps < max_steps, "no progress: deadlock or livelock"
            self.step()


def fake_token(request: Request) -> int:
    """Deterministic in the request's position, so recomputation after preemption sees the same tokens."""
    return (hash(request.request_id) + request.num_tokens * 7919) % 50_000


def check_schedule(engine: FakeEngine, out: SchedulerOutput, running_before: list[Request]) -> None:
    config, bs = engine.config, engine.config.block_size
    assert out.num_batched_tokens <= config.max_num_batched_tokens
    assert len(engine.scheduler.running) <= config.max_num_seqs
    ids = [s.request.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids)), "a request was scheduled twice in one step"
    for s in out.scheduled:
        r = s.request
        assert r.status == RequestStatus.RUNNING and r in engine.scheduler.running
        assert 1 <= s.num_new_tokens <= r.num_tokens - r.num_computed_tokens
        assert len(s.block_ids) * bs >= r.num_computed_tokens + s.num_new_tokens
        assert s.block_ids == engine.kv.block_ids(r.request_id)
    for r in out.preempted:
        assert r.status == RequestStatus.PREEMPTED and r.num_computed_tokens == 0
        assert r not in engine.scheduler.running and engine.kv.block_ids(r.request_id) == []
    # Running requests first, and admission only from budget they leave over, so there are never more
    # running requests than budget and only the last admitted can be mid-prompt: every request already
    # running is served (or preempted) every step, and a long prompt being chunked never stalls a decode.
    assert len(engine.scheduler.running) <= config.max_num_batched_tokens
    scheduled, preempted = {id(s.request) for s in out.scheduled}, {id(r) for r in out.preempted}
    for r in running_before:
        assert id(r) in scheduled | preempted, f"{r.request_id} stalled"


def check_invariants(engine: FakeEngine) -> None:
    kv, scheduler, bs = engine.kv, engine.scheduler, engine.config.block_size
    blocks = kv.pool.blocks
    holders: Counter[int] = Counter()
    held_by: dict[int, list[tuple[Request, int]]] = {}
    for request_id, request_blocks in kv.req_blocks.items():
        request = engine.live.get(request_id)
        assert request is not None and request in scheduler.running, f"{request_id} holds blocks but is not running"
        for index, block in enumerate(request_blocks):
            holders[block.block_id] += 1
            held_by.setdefault(block.block_id, []).append((request, index))
    for r in scheduler.running:
        assert not r.is_finished
    # Between steps every running request but the last admitted one is decoding.
    mid_prompt = [r for r in scheduler.running if r.num_computed_tokens + 1 < r.num_tokens]
    assert mid_prompt in ([], scheduler.running[-1:]), "a request mid-prompt ahead of others"
    # Reference counts are exactly the live holdings.
    assert sum(b.ref_cnt for b in blocks) == sum(len(v) for v in kv.req_blocks.values())
    for block in blocks:
        assert block.ref_cnt == holders[block.block_id]
    # Free and used partition the pool, and the free list holds exactly the unreferenced blocks.
    stats = kv.stats()
    assert stats.num_free_blocks + stats.num_used_blocks == stats.num_blocks
    assert stats.num_free_blocks == sum(1 for b in blocks if b.ref_cnt == 0) == kv.pool.free_queue.size
    # The cache index and the blocks agree.
    assert all(kv.pool.cached[b.block_hash] is b for b in blocks if b.block_hash is not None)
    assert len(kv.pool.cached) == sum(1 for b in blocks if b.block_hash is not None)
    # A block two requests hold is a cached full block of a prefix they share, at the same position.
    for block_id, owners in held_by.items():
        block = blocks[block_id]
        if block.block_hash is not None:
            for request, index in owners:
                assert chain_hashes(request, bs, index + 1)[index] == block.block_hash
        if len(owners) > 1:
            assert block.block_hash is not None, f"block {block_id} shared but not a cached prefix block"
            (_, index), *_ = owners
            assert all(i == index for _, i in owners)
    # Waiting requests hold nothing; the waiting count matches the live entries of the queue.
    live_waiting = [r for r in scheduler.waiting if not r.is_finished]
    assert scheduler.num_waiting == len(live_waiting)
    assert all(kv.block_ids(r.request_id) == [] for r in live_waiting)


def chain_hashes(request: Request, bs: int, num_blocks: int) -> list[bytes]:
    hashes: list[bytes] = []
    for i in range(num_blocks):
        hashes.append(hash_block(hashes[-1] if hashes else None, request.token_slice(i * bs, (i + 1) * bs), request.cache_salt))
    return hashes


def assert_drained(engine: FakeEngine) -> None:
    kv = engine.kv
    assert not engine.scheduler.running and engine.scheduler.num_waiting == 0
    assert kv.stats().num_free_blocks == kv.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert not kv.req_blocks and not kv.req_hashes and not kv.req_num_cached
    assert not engine.live


# ---------------------------------------------------------------------------------------------- budget


def test_single_request_prefill_then_decode():
    engine = FakeEngine(budget=32)
    request = engine.add("a", range(10), max_tokens=3)
    out = engine.step()
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(request, 10)]
    assert request.num_cached_tokens == 0 and len(request.output_token_ids) == 1
    assert [s.num_new_tokens for s in engine.step().scheduled] == [1]
    engine.run()
    assert request.status == RequestStatus.FINISHED_LENGTH and len(request.output_token_ids) == 3
    assert_drained(engine)


def test_long_prompt_is_chunked_to_the_budget():
    engine = FakeEngine(num_blocks=64, block_size=4, budget=16)
    request = engine.add("long", range(50), max_tokens=2)
    chunks = []
    while not request.output_token_ids:
        chunks.append(engine.step().num_batched_tokens)
    assert chunks == [16, 16, 16, 2]
    engine.run()
    assert_drained(engine)


def test_decodes_run_every_step_while_a_long_prompt_is_chunked():
    engine = FakeEngine(num_blocks=128, block_size=4, budget=8, max_num_seqs=4)
    decoders = [engine.add(f"d{i}", [i] * 3, max_tokens=40) for i in range(3)]
    engine.step()  # 9 prompt tokens > budget 8: d2 gets 2 of its 3
    engine.step()
    assert all(d.output_token_ids for d in decoders)
    long = engine.add("long", range(100, 200), max_tokens=2)
    chunk_steps = 0
    while not long.output_token_ids:
        out = engine.step()
        per_request = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
        assert all(per_request[d.request_id] == 1 for d in decoders)
        assert per_request.get("long", 0) == 8 - 3
        chunk_steps += 1
    assert chunk_steps == 20  # 100 tokens, 5 a step
    engine.run()
    assert_drained(engine)


def test_max_num_seqs_is_respected():
    engine = FakeEngine(budget=64, max_num_seqs=2)
    requests = [engine.add(str(i), [i] * 5, max_tokens=3) for i in range(5)]
    out = engine.step()
    assert len(out.scheduled) == 2 and engine.scheduler.num_waiting == 3
    engine.run()
    assert all(len(r.output_token_ids) == 3 for r in requests)
    assert_drained(engine)


def test_waiting_queue_limit():
    engine = FakeEngine(max_waiting=2)
    first = engine.add("a", [1, 2, 3])
    engine.add("b", [4, 5, 6])
    with pytest.raises(ResourceExhaustedError):
        engine.add("c", [7, 8, 9])
    engine.abort(first)  # an aborted request frees its waiting slot at once
    engine.add("c", [7, 8, 9])
    engine.step()  # admits both
    engine.add("d", [1])
    engine.add("e", [2])
    with pytest.raises(ResourceExhaustedError):
        engine.add("f", [3])
    engine.run()
    assert_drained(engine)


def test_zero_waiting_limit_rejects_everything():
    engine = FakeEngine(max_waiting=0)
    with pytest.raises(ResourceExhaustedError):
        engine.add("a", [1])


# ---------------------------------------------------------------------------------------------- preemption


def test_preemption_with_a_tiny_pool_finishes_everything():
    engine = FakeEngine(num_blocks=8, block_size=4, budget=32, max_num_seqs=6)
    requests = [engine.add(str(i), [i] * 10, max_tokens=12) for i in range(6)]  # each needs 6 of 8 blocks
    engine.run()
    assert all(r.status == RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 12 for r in requests)
    assert sum(len(o.preempted) for o in engine.outputs) > 0
    assert sum(r.num_preemptions for r in requests) == sum(len(o.preempted) for o in engine.outputs)
    assert_drained(engine)


def test_preempted_request_is_recomputed_with_the_same_tokens():
    tokens = {}
    for num_blocks in (64, 6):  # no preemption, then lots of it
        engine = FakeEngine(num_blocks=num_blocks, block_size=4, budget=16, max_num_seqs=4)
        requests = [engine.add(f"r{i}", range(i, i + 9), max_tokens=10) for i in range(4)]
        engine.run()
        tokens[num_blocks] = [r.output_token_ids for r in requests]
        assert_drained(engine)
    assert tokens[6] == tokens[64]


def test_preempted_request_goes_to_the_front_of_the_waiting_queue():
    engine = FakeEngine(num_blocks=4, block_size=4, budget=32, max_num_seqs=4)
    a = engine.add("a", range(7), max_tokens=8)
    b = engine.add("b", range(100, 107), max_tokens=8)
    engine.step()  # both admitted: 2 blocks each, pool full
    c = engine.add("c", [5], max_tokens=1)
    while not engine.outputs[-1].preempted:
        engine.step()
    assert engine.outputs[-1].preempted == [b]  # the most recently admitted one
    assert list(engine.scheduler.waiting)[:2] == [b, c]
    engine.run()
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in (a, b, c))
    assert_drained(engine)


# ---------------------------------------------------------------------------------------------- abort


def test_abort_a_waiting_request():
    engine = FakeEngine(budget=8, max_num_seqs=1)
    running = engine.add("a", range(5), max_tokens=3)
    waiting = engine.add("b", range(5), max_tokens=3)
    engine.step()
    assert waiting.status == RequestStatus.WAITING and engine.scheduler.num_waiting == 1
    engine.abort(waiting)
    assert waiting.status == RequestStatus.FINISHED_ABORTED and engine.scheduler.num_waiting == 0
    engine.run()
    assert running.status == RequestStatus.FINISHED_LENGTH and waiting.output_token_ids == []
    assert all(waiting not in [s.request for s in o.scheduled] for o in engine.outputs)
    assert_drained(engine)


def test_abort_a_running_request_frees_its_blocks_at_once():
    engine = FakeEngine(num_blocks=16, block_size=4, budget=8)
    a = engine.add("a", range(20), max_tokens=40)
    b = engine.add("b", range(100, 103), max_tokens=3)
    engine.step()  # a: chunk of 8 tokens, 2 blocks
    assert engine.kv.stats().num_free_blocks == 14
    engine.abort(a)
    assert a.status == RequestStatus.FINISHED_ABORTED and a not in engine.scheduler.running
    assert engine.kv.stats().num_free_blocks == 16 and engine.kv.block_ids("a") == []
    engine.run()
    assert b.status == RequestStatus.FINISHED_LENGTH
    assert_drained(engine)


def test_abort_a_preempted_request():
    engine = FakeEngine(num_blocks=4, block_size=4, budget=32)
    engine.add("a", range(7), max_tokens=8)
    b = engine.add("b", range(100, 107), max_tokens=8)
    while b.status != RequestStatus.PREEMPTED:
        engine.step()
    engine.abort(b)
    assert engine.scheduler.num_waiting == 0
    engine.run()
    assert_drained(engine)


def test_abort_is_idempotent():
    engine = FakeEngine()
    a = engine.add("a", range(5))
    engine.step()
    engine.abort(a)
    engine.scheduler.finish(a, RequestStatus.FINISHED_ABORTED)  # a second abort changes nothing
    assert a.status == RequestStatus.FINISHED_ABORTED
    check_invariants(engine)
    assert_drained(engine)


# ---------------------------------------------------------------------------------------------- prefix hits


def test_prefix_hit_advances_num_computed_tokens():
    engine = FakeEngine(num_blocks=32, block_size=4, budget=64)
    a = engine.add("a", range(18), max_tokens=2)
    engine.run()
    b = engine.add("b", list(range(16)) + [77, 78, 79], max_tokens=2)
    out = engine.step()
    assert b.num_cached_tokens == 16
    assert [s.num_new_tokens for s in out.scheduled] == [3]
    assert a.num_cached_tokens == 0
    engine.run()
    assert_drained(engine)


def test_prefix_hit_on_an_identical_prompt_recomputes_the_last_token():
    engine = FakeEngine(num_blocks=32, block_size=4, budget=64)
    engine.add("a", range(16), max_tokens=1)
    engine.run()
    b = engine.add("b", range(16), max_tokens=1)
    out = engine.step()
    assert b.num_cached_tokens == 12 and out.scheduled[0].num_new_tokens == 4
    assert b.output_token_ids
    engine.run()
    assert_drained(engine)


def test_prefix_hit_between_concurrent_requests_shares_blocks():
    engine = FakeEngine(num_blocks=32, block_size=4, budget=12)
    a = engine.add("a", range(12), max_tokens=5)
    engine.step()  # a's 3 blocks written and cached
    b = engine.add("b", list(range(12)) + [50], max_tokens=5)
    engine.step()
    assert b.num_cached_tokens == 12
    assert engine.kv.shared_block_ids("a", "b") == set(engine.kv.block_ids("a")[:3])
    engine.run()
    assert a.is_finished and b.is_finished
    assert_drained(engine)


def test_salted_requests_do_not_share():
    engine = FakeEngine(num_blocks=32, block_size=4, budget=64)
    engine.add("a", range(16), max_tokens=1, salt="tenant-a")
    engine.run()
    other = engine.add("b", range(16), max_tokens=1, salt="tenant-b")
    same = engine.add("c", range(16), max_tokens=1, salt="tenant-a")
    engine.run()
    assert other.num_cached_tokens == 0 and same.num_cached_tokens == 12
    assert_drained(engine)


def test_num_cached_tokens_is_kept_from_first_scheduling_across_preemption():
    engine = FakeEngine(num_blocks=6, block_size=4, budget=32, max_num_seqs=2)
    engine.add("warm", range(9), max_tokens=1)
    engine.run()
    a = engine.add("a", range(100, 109), max_tokens=12)
    b = engine.add("b", list(range(8)) + [60], max_tokens=12)  # hits 2 of warm's blocks
    engine.run()
    assert b.num_cached_tokens == 8 and a.num_cached_tokens == 0
    assert a.num_preemptions + b.num_preemptions > 0
    assert_drained(engine)


# ---------------------------------------------------------------------------------------------- randomized


def random_workload(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8, 16])
    num_blocks = rng.randint(4, 40)
    budget = rng.randint(1, 48)
    max_num_seqs = rng.randint(1, 8)
    engine = FakeEngine(
        num_blocks=num_blocks,
        block_size=block_size,
        budget=budget,
        max_num_seqs=max_num_seqs,
        prefix=rng.random() < 0.8,
    )
    capacity = num_blocks * block_size
    prefixes = [[rng.randrange(1000) for _ in range(rng.randint(1, 3 * block_size))] for _ in range(3)]
    pending = []
    for i in range(rng.randint(1, 14)):
        max_tokens = rng.randint(1, max(1, min(20, capacity // 2)))
        prompt_len = rng.randint(1, max(1, capacity - max_tokens))
        prompt = (rng.choice(prefixes) if rng.random() < 0.6 else []) + [rng.randrange(1000) for _ in range(prompt_len)]
        prompt = prompt[: capacity - max_tokens] or [1]
        if pending and rng.random() < 0.15:  # an exact repeat: a full-prompt hit must still compute a token
            prompt = list(rng.choice(pending)[2])
            max_tokens = min(max_tokens, capacity - len(prompt)) or 1
        arrival = rng.randint(0, 30)
        pending.append((arrival, f"r{i}", prompt, max_tokens, rng.choice([None, None, "s1", "s2"])))
    pending.sort(key=lambda p: p[0])
    added: list[Request] = []
    aborted: set[str] = set()
    while pending or engine.scheduler.has_work():
        assert engine.steps < MAX_STEPS, f"seed {seed}: no progress"
        while pending and pending[0][0] <= engine.steps:
            _, rid, prompt, max_tokens, salt = pending.pop(0)
            added.append(engine.add(rid, prompt, max_tokens, salt))
        if engine.live and rng.random() < 0.01:
            victim = engine.live[rng.choice(sorted(engine.live))]
            engine.abort(victim)
            aborted.add(victim.request_id)
        if engine.scheduler.has_work():
            engine.step()
        else:
            engine.steps += 1  # idle until the next arrival
    for r in added:
        if r.request_id in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
        else:
            assert r.status == RequestStatus.FINISHED_LENGTH, f"seed {seed}: {r.request_id} is {r.status}"
            assert len(r.output_token_ids) == r.sampling_params.max_tokens
    assert_drained(engine)


@pytest.mark.parametrize("seed_block", range(10))
def test_random_workloads_keep_the_invariants(seed_block):
    for seed in range(seed_block * 30, (seed_block + 1) * 30):
        random_workload(seed)
