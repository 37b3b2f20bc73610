"""Per-request KV block bookkeeping on top of the BlockPool, with prefix caching.

A request's blocks cover its tokens in order:

    tokens:   |<------------ num_computed_tokens ------------>|<- new this step ->|
    blocks:   [ b0 full ][ b1 full ][ b2 full ][ b3 partial      ][ b4 new       ]
               cached --------------------->    not cached (only full blocks are)

Each full block is named by a chained SHA-256 hash: H(parent hash, its token ids, cache salt for the
first block). Equal hashes mean equal prefixes, so a new request can borrow the blocks of any
earlier one with the same prefix. A per-request `cache_salt` changes every hash of the chain, so
tenants with different salts never share blocks and cannot probe each other's prompts by timing.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from stageserve.engine.block_pool import BlockPool, KVBlock
from stageserve.engine.request import Request


@dataclass(frozen=True)
class KVPoolStats:
    num_blocks: int
    num_free_blocks: int  # free or evictable (cached, unreferenced)
    num_cached_blocks: int  # indexed in the prefix cache, referenced or not
    num_used_blocks: int  # referenced by at least one live request


def hash_block(parent: bytes | None, token_ids: list[int], salt: str | None) -> bytes:
    h = hashlib.sha256(parent or b"root")
    if parent is None and salt:
        h.update(b"salt:" + salt.encode())
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_hashes: dict[str, list[bytes]] = {}
        self.req_num_cached: dict[str, int] = {}  # full blocks already indexed, per request

    def block_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the request's full blocks, extended incrementally as tokens arrive."""
        hashes = self.req_hashes.setdefault(request.request_id, [])
        num_full = request.num_tokens // self.block_size
        for i in range(len(hashes), num_full):
            tokens = request.token_slice(i * self.block_size, (i + 1) * self.block_size)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens, request.cache_salt))
        return hashes

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """The longest cached prefix of a request that has computed nothing yet.

        At least one token is always left to compute, because the step that computes it produces
        the logits the next token is sampled from.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in self.block_hashes(request)[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, computed: list[KVBlock] = ()) -> list[int] | None:
        """Give the request room for `num_new_tokens` more tokens after its computed ones.

        `computed` are prefix-cache hits (only on first scheduling). Returns the request's full block
        id list, or None, changing nothing, if the pool cannot supply enough blocks.
        """
        blocks = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed) * self.block_size
        needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(blocks) - len(computed)
        reviving = sum(1 for b in computed if b.ref_cnt == 0)  # hits that leave the free list
        if max(needed, 0) + reviving > self.pool.num_free_blocks:
            return None
        self.req_blocks[request.request_id] = blocks
        self.pool.touch(list(computed))
        blocks.extend(computed)
        if needed > 0:
            blocks.extend(self.pool.get_new_blocks(needed))
        return [b.block_id for b in blocks]

    def cache_blocks(self, request: Request) -> None:
        """Index the request's newly completed full blocks (their KV is now written)."""
        if not self.enable_prefix_caching:
            return
        blocks = self.req_blocks.get(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        start = self.req_num_cached.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self.block_hashes(request)
        for i in range(start, num_full):
            self.pool.cache(blocks[i], hashes[i])
        self.req_num_cached[request.request_id] = num_full

    def trim(self, request: Request, num_tokens: int) -> None:
        """Free the request's blocks past the first `num_tokens` tokens (KV of rejected draft tokens).

        Those blocks were never indexed (only blocks within num_computed_tokens are), so they go back
        to the pool as plain free blocks.
        """
        blocks = self.req_blocks.get(request.request_id)
        keep = -(-num_tokens // self.block_size)
        if blocks is None or len(blocks) <= keep:
            return
        self.pool.free(list(reversed(blocks[keep:])))
        del blocks[keep:]
        self.req_num_cached[request.request_id] = min(self.req_num_cached.get(request.request_id, 0), keep)

    def free(self, request: Request) -> None:
        """Return all of a request's blocks. Tail blocks go first so they are evicted first."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.free(list(reversed(blocks)))
        self.req_num_cached.pop(request.request_id, None)
        if request.is_finished:
            self.req_hashes.pop(request.request_id, None)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def shared_block_ids(self, a: str, b: str) -> set[int]:
        return set(self.block_ids(a)) & set(self.block_ids(b))

    def stats(self) -> KVPoolStats:
        free = self.pool.num_free_blocks
        return KVPoolStats(self.num_blocks, free, self.pool.num_cached_blocks, self.num_blocks - free)
