"""Per-request block tables on top of the block pool, with prefix caching."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Optional

from pagedserve.core.block_pool import BlockPool, KVCacheBlock
from pagedserve.core.request import Request


@dataclass
class KVCacheStats:
    """Usage figures; the counters are cumulative since the engine started."""

    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    usage: float  # used blocks / all blocks
    kv_waste: float  # reserved-but-empty slots / reserved slots, over running requests
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of which found cached


def block_tokens(tokens: list[int], index: int, size: int) -> bytes:
    """Block ``index``'s token ids, packed: what a cached block keeps to verify a hit. Every
    cached block holds one for as long as the cache keeps it; packed, it takes ~100 bytes
    instead of ~700 for a tuple of 16 ints (a full cache of 100k blocks: 10 MB, not 70)."""
    return array("i", tokens[index * size:(index + 1) * size]).tobytes()


class KVCacheManager:
    """Owns which blocks each request holds. Full blocks are hashed in a chain (parent hash +
    token ids) so a later request with the same prefix reuses them; the last prompt token is
    always recomputed so that there are logits to sample from."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks already registered
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def _shares(self, request: Request) -> bool:
        # Without prefix caching, only siblings of one n>1 request share (salted hashes).
        return self.enable_prefix_caching or request.cache_salt is not None

    def _update_hashes(self, request: Request) -> None:
        hashes, tokens, size = request.block_hashes, request.all_token_ids, self.block_size
        parent = hashes[-1] if hashes else hash(("pagedserve-root", request.cache_salt))
        for start in range(len(hashes) * size, len(tokens) - size + 1, size):
            parent = hash((parent, tuple(tokens[start:start + size])))
            hashes.append(parent)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of ``request`` (whole blocks, short of its last token).

        A request that still owes prompt logprobs finds nothing beyond the positions already
        scored: cached blocks hold keys and values, not the logits those positions need."""
        if not self._shares(request):
            return [], 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        if (request.num_prompt_logprobs >= 0
                and request.num_scored_prompt_tokens < request.num_prompt_positions):
            max_blocks = min(max_blocks, request.num_scored_prompt_tokens // self.block_size)
        tokens, size = request.all_token_ids, self.block_size
        hits: list[KVCacheBlock] = []
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.lookup(block_hash, block_tokens(tokens, i, size))
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: Optional[list[KVCacheBlock]] = None,
    ) -> Optional[list[int]]:
        """Makes room for ``num_new_tokens`` more tokens and returns the ids of the blocks it
        added (often none); returns None, changing nothing, when the blocks run out.

        ``computed_blocks`` are prefix-cache hits for a request being admitted.
        """
        blocks = self.req_blocks.get(request.request_id)
        if (
            blocks is not None
            and request.num_computed_tokens + num_new_tokens <= len(blocks) * self.block_size
        ):
            return []  # the common decode step: the last block still has room
        if blocks is None:
            blocks = self.req_blocks[request.request_id] = []
        computed_blocks = computed_blocks or []
        num_cached = len(computed_blocks) * self.block_size
        total = request.num_computed_tokens + num_cached + num_new_tokens
        num_needed = -(-total // self.block_size) - len(blocks) - len(computed_blocks)
        # Hits that sit in the free queue count against the free blocks too.
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed + num_revived > self.pool.num_free_blocks:
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_needed) if num_needed > 0 else []
        blocks.extend(new_blocks)
        if self._shares(request):
            self._cache_full_blocks(request, blocks, total, len(computed_blocks))
        return [b.block_id for b in new_blocks]

    def _cache_full_blocks(
        self, request: Request, blocks: list[KVCacheBlock], num_tokens: int, num_hits: int
    ) -> None:
        # Blocks that will be full once this step runs are registered now: a request admitted
        # later in the same step may share them, since every layer writes the step's keys and
        # values before any attention reads them.
        rid = request.request_id
        done = max(self.num_cached_blocks.get(rid, 0), num_hits)
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        if num_full <= done:
            return
        self._update_hashes(request)
        tokens, size = request.all_token_ids, self.block_size
        for i in range(done, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i], block_tokens(tokens, i, size))
        self.num_cached_blocks[rid] = num_full

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block not in use (for benchmarks, or after a weight update)."""
        self.pool.reset_prefix_cache()

    def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_prompt_tokens
        self.prefix_cache_hits += num_hit_tokens

    def free(self, request: Request) -> None:
        """Returns a finished or preempted request's blocks, its tail first in eviction order.

        Full blocks computed since the last allocation are indexed first, so that the request's
        own continuation (after preemption) or a later prompt can reuse them."""
        blocks = self.req_blocks.pop(request.request_id, None)
        if blocks and self._shares(request):
            self._cache_full_blocks(request, blocks, request.num_computed_tokens, 0)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks), keep_cached=self.enable_prefix_caching)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def num_blocks_of(self, request_id: str) -> int:
        return len(self.req_blocks.get(request_id, ()))

    def stats(self, running: list[Request]) -> KVCacheStats:
        reserved = used = 0
        for request in running:
            reserved += self.num_blocks_of(request.request_id) * self.block_size
            used += request.num_computed_tokens
        free = self.pool.num_free_blocks
        return KVCacheStats(
            num_blocks=self.pool.num_blocks,
            num_used_blocks=self.pool.num_blocks - free,
            num_free_blocks=free,
            usage=self.pool.usage(),
            kv_waste=(reserved - used) / reserved if reserved else 0.0,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )
