"""Per-request KV block bookkeeping: allocation, freeing, prefix hits, cache salts and stats."""

from __future__ import annotations

import pytest

from stageserve.engine.kv_cache_manager import KVCacheManager, hash_block
from stageserve.engine.request import Request, RequestStatus
from stageserve.sample.params import SamplingParams

BS = 4  # tokens per block: small, so a few tokens span several blocks


def make_request(request_id: str, tokens, salt: str | None = None) -> Request:
    return Request(request_id, list(tokens), SamplingParams(max_tokens=8), cache_salt=salt)


def compute(kv: KVCacheManager, request: Request, num_new: int | None = None, hits=()) -> list[int]:
    """Do what one scheduler + engine step does for a request: allocate, compute, cache."""
    num_new = request.num_tokens - request.num_computed_tokens - len(hits) * BS if num_new is None else num_new
    block_ids = kv.allocate_slots(request, num_new, list(hits))
    assert block_ids is not None
    request.num_computed_tokens += len(hits) * BS + num_new
    kv.cache_blocks(request)
    return block_ids


def finish(kv: KVCacheManager, request: Request) -> None:
    request.status = RequestStatus.FINISHED_STOPPED
    kv.free(request)


def refs(kv: KVCacheManager) -> list[int]:
    return [b.ref_cnt for b in kv.pool.blocks]


# ---------------------------------------------------------------------------------------------- bookkeeping


def test_allocate_rounds_up_to_whole_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    request = make_request("a", range(10))
    block_ids = kv.allocate_slots(request, 10)
    assert block_ids == [0, 1, 2]  # ceil(10 / 4)
    assert kv.block_ids("a") == block_ids
    assert kv.stats().num_free_blocks == 7
    finish(kv, request)
    assert kv.stats().num_free_blocks == 10
    assert kv.block_ids("a") == []
    assert refs(kv) == [0] * 10


def test_growing_one_token_at_a_time_takes_a_block_only_at_boundaries():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    request = make_request("a", range(6))
    compute(kv, request)
    lengths = []
    for token in range(9):
        request.output_token_ids.append(100 + token)
        lengths.append(len(compute(kv, request)))
    # context grows 7, 8, ..., 15 tokens
    assert lengths == [-(-n // BS) for n in range(7, 16)]
    assert kv.stats().num_free_blocks == 10 - 4


def test_allocating_zero_new_tokens_takes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    request = make_request("a", range(8))
    compute(kv, request)
    assert kv.allocate_slots(request, 0) == [0, 1]
    assert kv.stats().num_free_blocks == 2


def test_allocate_returns_none_and_changes_nothing_when_short():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(12))
    compute(kv, a)
    before = (kv.stats(), refs(kv), dict(kv.pool.cached))
    b = make_request("b", range(100, 108))
    assert kv.allocate_slots(b, 8) is None
    assert (kv.stats(), refs(kv), dict(kv.pool.cached)) == before
    assert "b" not in kv.req_blocks
    assert kv.allocate_slots(b, 4) == [3]  # exactly what is left still fits


def test_allocate_counts_revived_hits_against_the_free_pool():
    """Hits sitting unreferenced in the free list are taken out of it, so they cost free blocks too."""
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(9))  # 2 full blocks + 1 partial
    compute(kv, a)
    finish(kv, a)
    assert kv.stats().num_free_blocks == 4 and kv.stats().num_cached_blocks == 2

    b = make_request("b", list(range(8)) + [50] * 13)  # 2 hit blocks, 13 more tokens = 4 new blocks
    hits = kv.get_computed_blocks(b)
    assert len(hits) == 2
    assert kv.allocate_slots(b, 13, hits) is None  # 2 revived + 4 new > 4 free
    assert all(h.ref_cnt == 0 for h in hits) and kv.stats().num_free_blocks == 4
    block_ids = kv.allocate_slots(b, 8, hits)  # 2 revived + 2 new: an exact fit
    assert block_ids[:2] == [hits[0].block_id, hits[1].block_id]
    assert sorted(block_ids) == [0, 1, 2, 3]
    assert kv.stats().num_free_blocks == 0


# ---------------------------------------------------------------------------------------------- prefix hits


def test_shared_prefix_hits_the_same_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", range(14))  # 3 full blocks
    a_ids = compute(kv, a)
    b = make_request("b", list(range(12)) + [99, 98, 97])
    hits = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == a_ids[:3]
    compute(kv, b, hits=hits)
    assert kv.shared_block_ids("a", "b") == set(a_ids[:3])
    assert [kv.pool.blocks[i].ref_cnt for i in a_ids[:3]] == [2, 2, 2]
    assert b.num_computed_tokens == 15


def test_a_diverging_block_ends_the_hit():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", range(16))
    a_ids = compute(kv, a)
    tokens = list(range(16))
    tokens[5] = 1000  # second block differs: the chain breaks there, even though blocks 2-3 match
    b = make_request("b", tokens + [1])
    assert [h.block_id for h in kv.get_computed_blocks(b)] == a_ids[:1]


@pytest.mark.parametrize("length, expected_hits", [(16, 3), (17, 4), (15, 3), (3, 0), (4, 0), (5, 1)])
def test_at_least_one_token_is_always_left_to_compute(length, expected_hits):
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    compute(kv, make_request("a", range(20)))
    b = make_request("b", range(length))
    hits = kv.get_computed_blocks(b)
    assert len(hits) == expected_hits
    assert len(hits) * BS < length


def test_only_computed_blocks_are_cached():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", range(16))
    compute(kv, a, num_new=6)  # a prefill chunk: one full block written, the second half-written
    assert kv.stats().num_cached_blocks == 1
    assert len(kv.get_computed_blocks(make_request("b", range(16)))) == 1
    compute(kv, a, num_new=10)
    assert kv.stats().num_cached_blocks == 4


def test_output_tokens_are_cached_too():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", range(6))
    compute(kv, a)
    a.output_token_ids += [40, 41, 42]  # the last sampled token has no KV yet
    compute(kv, a, num_new=2)
    assert a.num_computed_tokens == 8 and kv.stats().num_cached_blocks == 2
    b = make_request("b", [0, 1, 2, 3, 4, 5, 40, 41, 42, 7])
    assert len(kv.get_computed_blocks(b)) == 2


def test_hits_survive_the_owner_finishing_until_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(8))
    a_ids = compute(kv, a)
    finish(kv, a)
    b = make_request("b", range(9))
    hits = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == a_ids
    compute(kv, b, hits=hits)
    assert kv.stats().num_free_blocks == 1
    finish(kv, b)
    # a fresh request needing the whole pool evicts every cached block
    c = make_request("c", range(500, 516))
    compute(kv, c)
    assert kv.stats().num_cached_blocks == 4
    assert kv.get_computed_blocks(make_request("d", range(9))) == []


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    compute(kv, make_request("a", range(12)))
    assert kv.get_computed_blocks(make_request("b", range(12))) == []
    assert kv.stats().num_cached_blocks == 0


# ---------------------------------------------------------------------------------------------- salt


def test_cache_salt_changes_every_hash_of_the_chain():
    tokens = list(range(16))
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    plain = kv.block_hashes(make_request("p", tokens))
    salted = kv.block_hashes(make_request("s", tokens, salt="tenant-1"))
    other = kv.block_hashes(make_request("o", tokens, salt="tenant-2"))
    assert len(plain) == len(salted) == len(other) == 4
    assert not set(plain) & set(salted) and not set(salted) & set(other) and not set(plain) & set(other)
    assert salted == kv.block_hashes(make_request("s2", tokens, salt="tenant-1"))


def test_hash_is_chained():
    first = hash_block(None, [1, 2], None)
    assert hash_block(first, [3, 4], None) != hash_block(hash_block(None, [9, 9], None), [3, 4], None)
    assert hash_block(None, [1, 2], "") == first  # an empty salt is no salt


@pytest.mark.parametrize(
    "salt_a, salt_b, shares",
    [("x", "x", True), ("x", "y", False), ("x", None, False), (None, "y", False), (None, None, True)],
)
def test_salted_requests_share_blocks_only_with_the_same_salt(salt_a, salt_b, shares):
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", range(13), salt=salt_a)
    compute(kv, a)
    b = make_request("b", range(13), salt=salt_b)
    hits = kv.get_computed_blocks(b)
    assert len(hits) == (3 if shares else 0)
    compute(kv, b, hits=hits)
    assert bool(kv.shared_block_ids("a", "b")) == shares


# ---------------------------------------------------------------------------------------------- preemption


def test_preempt_then_reallocate_recovers_from_its_own_cached_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", range(10))
    compute(kv, a)
    a.output_token_ids += [70, 71, 72]
    compute(kv, a, num_new=2)  # 12 computed, 13 tokens
    old_ids = kv.block_ids("a")

    a.status = RequestStatus.PREEMPTED
    kv.free(a)
    a.num_computed_tokens = 0
    assert kv.stats().num_free_blocks == 8
    assert "a" in kv.req_hashes  # kept: its tokens are unchanged, only appended to

    hits = kv.get_computed_blocks(a)
    assert [h.block_id for h in hits] == old_ids[:3]
    block_ids = compute(kv, a, hits=hits)
    assert a.num_computed_tokens == 13 and len(block_ids) == 4
    finish(kv, a)
    assert kv.stats().num_free_blocks == 8
    assert "a" not in kv.req_hashes and "a" not in kv.req_num_cached


def test_many_requests_leave_no_leak():
    kv = KVCacheManager(num_blocks=32, block_size=BS)
    requests = [make_request(str(i), [i % 3] * (5 + i)) for i in range(10)]
    for r in requests:
        compute(kv, r, hits=kv.get_computed_blocks(r))
    assert sum(refs(kv)) == sum(len(kv.block_ids(r.request_id)) for r in requests)
    for r in requests:
        finish(kv, r)
    assert kv.stats().num_free_blocks == 32
    assert refs(kv) == [0] * 32
    assert not kv.req_blocks and not kv.req_hashes


# ---------------------------------------------------------------------------------------------- stats


def test_stats():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    s = kv.stats()
    assert (s.num_blocks, s.num_free_blocks, s.num_cached_blocks, s.num_used_blocks) == (10, 10, 0, 0)
    a = make_request("a", range(10))
    compute(kv, a)
    s = kv.stats()
    assert (s.num_free_blocks, s.num_cached_blocks, s.num_used_blocks) == (7, 2, 3)
    finish(kv, a)
    s = kv.stats()
    assert (s.num_free_blocks, s.num_cached_blocks, s.num_used_blocks) == (10, 2, 0)
