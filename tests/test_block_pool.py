"""Block pool and KV-cache manager: reference counts, LRU eviction, prefix hits, no leaks."""

from __future__ import annotations

import random

import pytest

from pagedserve.core.block_pool import BlockPool
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], salt=None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8), frozenset(), 1024, cache_salt=salt)


def admit(kv: KVCacheManager, req: Request) -> int:
    hits, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, hits) is not None
    req.num_computed_tokens = req.num_tokens
    return num_hit


def test_free_queue_is_lru_and_tail_first():
    pool = BlockPool(6, enable_caching=True)
    a = pool.get_new_blocks(3)
    assert [b.block_id for b in a] == [0, 1, 2]
    pool.free_blocks(reversed(a), keep_cached=True)
    # Freed tail first: block 2 is the first to be handed out again after the untouched ones.
    order = [b.block_id for b in pool.free_queue]
    assert order == [3, 4, 5, 2, 1, 0]
    assert pool.num_free_blocks == 6


def test_get_more_blocks_than_free_raises():
    pool = BlockPool(2, enable_caching=False)
    with pytest.raises(ValueError):
        pool.get_new_blocks(3)


def test_prefix_hit_shares_blocks_and_recomputes_last_token():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    prompt = list(range(100, 112))  # exactly 3 blocks
    a = make_request("a", prompt)
    assert admit(kv, a) == 0
    b = make_request("b", prompt)
    # Only 2 of 3 blocks: the last prompt token must be computed to get logits.
    assert admit(kv, b) == 2 * BS
    assert kv.block_ids("a")[:2] == kv.block_ids("b")[:2]
    assert kv.block_ids("a")[2] != kv.block_ids("b")[2]
    shared = kv.req_blocks["a"][0]
    assert shared.ref_cnt == 2


def test_prefix_hit_needs_same_whole_prefix():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    admit(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first block: the chained hash must not match.
    assert admit(kv, make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == 0
    assert admit(kv, make_request("c", [1, 2, 3, 4, 5, 6, 7, 0, 9])) == BS


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    kv = KVCacheManager(4, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))  # 3 blocks, 2 full
    admit(kv, a)
    kv.free(a)
    assert kv.pool.num_free_blocks == 4
    b = make_request("b", list(range(9)))
    assert admit(kv, b) == 2 * BS  # revived from the free queue
    kv.free(b)
    # A request that needs every block evicts the cached ones.
    c = make_request("c", list(range(50, 66)))
    assert admit(kv, c) == 0
    assert kv.pool.num_free_blocks == 0
    assert not kv.pool.cached or all(blk.ref_cnt > 0 for blk in kv.pool.cached.values())


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(3, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))
    admit(kv, a)
    b = make_request("b", list(range(100, 112)))
    hits, _ = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, 12, hits) is None
    assert "b" not in kv.req_blocks
    assert kv.pool.num_free_blocks == 1


def test_without_prefix_caching_only_salted_siblings_share():
    kv = KVCacheManager(16, BS, enable_prefix_caching=False)
    prompt = list(range(12))
    assert admit(kv, make_request("a", prompt)) == 0
    assert admit(kv, make_request("b", prompt)) == 0
    assert admit(kv, make_request("p#0", prompt, salt="p")) == 0
    assert admit(kv, make_request("p#1", prompt, salt="p")) == 2 * BS
    assert admit(kv, make_request("q#0", prompt, salt="q")) == 0


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_random_mix_never_leaks(caching: bool, seed: int):
    rng = random.Random(seed)
    kv = KVCacheManager(40, BS, enable_prefix_caching=caching)
    live: list[Request] = []
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(3)]
    for step in range(400):
        action = rng.random()
        if action < 0.4:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 9))]
            req = make_request(f"r{step}", tokens, salt=rng.choice([None, "s"]))
            hits, num_hit = kv.get_computed_blocks(req)
            if kv.allocate_slots(req, req.num_tokens - num_hit, hits) is not None:
                req.num_computed_tokens = req.num_tokens
                live.append(req)
        elif action < 0.8 and live:
            req = rng.choice(live)
            req.append_output_token(rng.randrange(50))
            if kv.allocate_slots(req, 1) is not None:
                req.num_computed_tokens += 1
            else:  # preempt
                live.remove(req)
                kv.free(req)
        elif live:
            req = live.pop(rng.randrange(len(live)))
            kv.free(req)
        used = sum(1 for b in kv.pool.blocks if b.ref_cnt > 0)
        assert used + kv.pool.num_free_blocks == kv.pool.num_blocks
        for req in live:
            assert len(kv.req_blocks[req.request_id]) * BS >= req.num_computed_tokens
    for req in live:
        kv.free(req)
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert not kv.req_blocks


def test_stats_report_queries_hits_and_waste():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(6)))
    admit(kv, a)
    stats = kv.stats([a])
    assert stats.num_used_blocks == 2 and stats.num_free_blocks == 14
    assert stats.usage == pytest.approx(2 / 16)
    assert stats.kv_waste == pytest.approx(2 / 8)


def test_reset_prefix_cache_forgets_free_blocks_only():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    b = make_request("b", list(range(100, 109)))
    admit(kv, b)
    kv.free(a)
    kv.reset_prefix_cache()
    assert admit(kv, make_request("a2", list(range(9)))) == 0
    assert admit(kv, make_request("b2", list(range(100, 109)))) == 2 * BS  # b still holds its
