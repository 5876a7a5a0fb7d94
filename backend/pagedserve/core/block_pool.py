"""KV-cache blocks: reference counts, an LRU free queue, and the prefix-cache index."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional


class KVCacheBlock:
    """One block of ``block_size`` token slots. A block with ``ref_cnt == 0`` sits in the free
    queue; if it also has a ``block_hash`` its contents can still be reused until evicted."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev", "next")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[int] = None
        self.token_ids: Optional[bytes] = None  # verified on a hit: hashes may collide
        self.prev: Optional[KVCacheBlock] = None
        self.next: Optional[KVCacheBlock] = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: evict from the head, free to the tail, and unlink a
    block in O(1) when a prefix-cache hit revives it."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next
        if block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.num_free -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev
        last.next, block.prev, block.next, self._tail.prev = block, last, self._tail, block
        self.num_free += 1

    def __iter__(self):
        block = self._head.next
        while block is not self._tail:
            yield block
            block = block.next


class BlockPool:
    """Owns every block: hands out free ones (evicting cached contents LRU), takes them back,
    and indexes full blocks by their chained hash for prefix caching."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[int, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, count: int) -> list[KVCacheBlock]:
        if count > self.free_queue.num_free:
            raise ValueError(f"asked for {count} blocks with {self.free_queue.num_free} free")
        blocks = []
        for _ in range(count):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = block.token_ids = None

    def lookup(self, block_hash: int, token_ids: bytes) -> Optional[KVCacheBlock]:
        block = self.cached.get(block_hash)
        if block is not None and block.token_ids == token_ids:
            return block
        return None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Takes a reference on cache hits, reviving free ones."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_block(self, block: KVCacheBlock, block_hash: int, token_ids: bytes) -> None:
        """Registers a full block; a block with the same contents already indexed wins."""
        if block.block_hash is not None:
            return
        block.block_hash, block.token_ids = block_hash, token_ids
        self.cached.setdefault(block_hash, block)

    def free_blocks(self, blocks: Iterable[KVCacheBlock], keep_cached: bool) -> None:
        """Drops one reference from each block, in eviction order (first freed, first evicted)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if not keep_cached:
                    self._evict(block)
                self.free_queue.append(block)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_cnt == 0:
                self._evict(block)
