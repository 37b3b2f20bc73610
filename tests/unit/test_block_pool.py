"""The KV block pool: the O(1) free list, reference counts, LRU eviction and the prefix-cache index."""

from __future__ import annotations

import pytest

from stageserve.engine.block_pool import BlockPool, FreeBlockQueue, KVBlock


def queue_ids(queue: FreeBlockQueue) -> list[int]:
    """Walk the list head to tail, checking the back links on the way."""
    ids, node = [], queue.head.next
    while node is not queue.tail:
        assert node.next.prev is node, f"broken back link after block {node.block_id}"
        ids.append(node.block_id)
        node = node.next
    assert len(ids) == queue.size
    return ids


def h(i: int) -> bytes:
    return i.to_bytes(32, "little")


# ---------------------------------------------------------------------------------------------- queue


def test_free_queue_keeps_insertion_order():
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert queue_ids(queue) == [0, 1, 2, 3, 4]
    assert queue.popleft() is blocks[0]
    queue.append(blocks[0])
    assert queue_ids(queue) == [1, 2, 3, 4, 0]


@pytest.mark.parametrize("position", [0, 2, 4])
def test_free_queue_remove_from_head_middle_and_tail(position):
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[position])
    assert queue_ids(queue) == [i for i in range(5) if i != position]
    assert blocks[position].prev is None and blocks[position].next is None


def test_free_queue_popleft_on_empty_raises():
    queue = FreeBlockQueue([KVBlock(0)])
    queue.popleft()
    assert queue.size == 0
    with pytest.raises(IndexError):
        queue.popleft()


def test_free_queue_operations_touch_only_neighbours():
    """O(1): remove and append relink a constant number of nodes, never walk the list."""
    blocks = [KVBlock(i) for i in range(10_000)]
    queue = FreeBlockQueue(blocks)
    untouched = blocks[5000]
    before = (untouched.prev, untouched.next)
    queue.remove(blocks[7000])
    queue.append(blocks[7000])
    queue.popleft()
    assert (untouched.prev, untouched.next) == before
    assert queue.size == 9_999
    assert queue.tail.prev is blocks[7000]


# ---------------------------------------------------------------------------------------------- pool


def test_new_blocks_come_in_order_with_one_reference():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 1


def test_asking_for_more_than_free_raises_without_taking_any():
    pool = BlockPool(3)
    with pytest.raises(ValueError):
        pool.get_new_blocks(4)
    assert pool.num_free_blocks == 3
    assert queue_ids(pool.free_queue) == [0, 1, 2]


def test_ref_counts_and_free():
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 3  # still held by someone
    pool.free([block])
    assert block.ref_cnt == 0 and pool.num_free_blocks == 4
    assert queue_ids(pool.free_queue)[-1] == block.block_id  # most recently freed goes last


def test_double_free_asserts():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.free([block])
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([block])
    assert block.ref_cnt == 0  # the failed free changed nothing
    assert queue_ids(pool.free_queue) == [1, 0]


def test_eviction_is_lru_blocks_freed_earlier_go_first():
    pool = BlockPool(4)
    a, b, c, d = pool.get_new_blocks(4)
    for i, block in enumerate((a, b, c, d)):
        pool.cache(block, h(i))
    pool.free([c])
    pool.free([a])
    pool.free([d])
    pool.free([b])
    assert [x.block_id for x in pool.get_new_blocks(4)] == [c.block_id, a.block_id, d.block_id, b.block_id]


def test_free_order_within_a_call_is_eviction_order():
    """A request frees its tail first (KVCacheManager reverses the list), so its tail is evicted first."""
    pool = BlockPool(3)
    head, middle, tail = pool.get_new_blocks(3)
    for i, block in enumerate((head, middle, tail)):
        pool.cache(block, h(i))
    pool.free([tail, middle, head])
    (evicted,) = pool.get_new_blocks(1)
    assert evicted is tail
    assert pool.lookup(h(0)) is head and pool.lookup(h(1)) is middle


def test_eviction_updates_the_cache_index():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    pool.cache(a, h(1))
    pool.cache(b, h(2))
    assert pool.num_cached_blocks == 2
    pool.free([a, b])
    assert pool.num_cached_blocks == 2  # unreferenced but still reusable
    (new,) = pool.get_new_blocks(1)
    assert new is a and new.block_hash is None
    assert pool.lookup(h(1)) is None
    assert pool.lookup(h(2)) is b
    assert pool.num_cached_blocks == 1


def test_touch_revives_a_cached_block_out_of_the_middle_of_the_free_list():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    for i, block in enumerate(blocks):
        pool.cache(block, h(i))
    pool.free(blocks)
    hit = pool.lookup(h(2))
    assert hit is blocks[2]
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert pool.num_free_blocks == 3
    assert queue_ids(pool.free_queue) == [0, 1, 3]
    evicted = pool.get_new_blocks(3)
    assert hit not in evicted
    assert pool.lookup(h(2)) is hit  # still indexed while in use


def test_touch_on_a_used_block_only_adds_a_reference():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.cache(block, h(7))
    pool.touch([block])
    assert block.ref_cnt == 2
    assert pool.num_free_blocks == 1


def test_cache_keeps_the_first_owner_of_a_hash():
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    pool.cache(a, h(1))
    pool.cache(b, h(1))  # computed twice concurrently: the first copy stays indexed
    assert pool.lookup(h(1)) is a and b.block_hash is None
    pool.cache(a, h(2))  # a block is indexed under one hash only
    assert pool.lookup(h(2)) is None and a.block_hash == h(1)
    pool.cache(c, h(3))
    assert pool.num_cached_blocks == 2


def test_caching_disabled_indexes_nothing():
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    pool.cache(block, h(1))
    assert pool.lookup(h(1)) is None and pool.num_cached_blocks == 0


def test_many_cycles_keep_the_list_consistent():
    pool = BlockPool(16)
    held: list[KVBlock] = []
    for step in range(200):
        if step % 3 != 2 and pool.num_free_blocks:
            (block,) = pool.get_new_blocks(1)
            pool.cache(block, h(step))
            held.append(block)
        elif held:
            pool.free([held.pop(step % len(held))])
        assert pool.num_free_blocks + len(held) == 16
        assert {b.block_id for b in held}.isdisjoint(queue_ids(pool.free_queue))
        assert all(pool.cached[b.block_hash] is b for b in pool.blocks if b.block_hash is not None)
