"""The pool of KV-cache blocks: reference counts, an O(1) LRU free list, and the prefix-cache index.

A block is in exactly one of three states:

    in use      ref_cnt > 0, not in the free list (may also be in the cache index)
    cached      ref_cnt == 0, in the free list AND in the cache index: reusable by a prefix hit,
                or evictable when a new block is needed
    free        ref_cnt == 0, in the free list, no hash

The free list is a doubly linked list so that a cached block can be taken out of the middle in O(1)
when a prefix hit revives it. New blocks come from the head (least recently freed), freed blocks go
to the tail, which makes eviction LRU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    prev: KVBlock | None = None
    next: KVBlock | None = None


class FreeBlockQueue:
    """Doubly linked list of blocks with O(1) popleft, append and remove."""

    def __init__(self, blocks: list[KVBlock]):
        self.head = KVBlock(-1)  # sentinels keep the edge cases out of the hot path
        self.tail = KVBlock(-1)
        self.head.next, self.tail.prev = self.tail, self.head
        self.size = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVBlock) -> None:
        last = self.tail.prev
        last.next, block.prev, block.next, self.tail.prev = block, last, self.tail, block
        self.size += 1

    def remove(self, block: KVBlock) -> None:
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.size -= 1

    def popleft(self) -> KVBlock:
        block = self.head.next
        if block is self.tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.enable_caching = enable_caching
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, counting cached-but-unreferenced ones."""
        return self.free_queue.size

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        if n > self.free_queue.size:
            raise ValueError(f"asked for {n} blocks, {self.free_queue.size} free")
        blocks = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None:  # evict its cached contents
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash)

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on blocks found in the cache, reviving them from the free list if needed."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop a reference; blocks nobody holds go to the tail of the free list (most recently used)."""
        for block in blocks:
            # Checked before the decrement, so a double free leaves the pool as it was.
            assert block.ref_cnt > 0, f"block {block.block_id} freed twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Index a full block under its chained hash. A block already indexed keeps its first owner."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)
