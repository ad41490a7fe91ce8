"""RadixCache and ChunkCache on small pools: matching, node splits, locks, LRU eviction, and the
request hooks the scheduler calls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from edgelm.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
from edgelm.mem_cache.radix_cache import ChunkCache, RadixCache

POOL = 64


@pytest.fixture
def pools():
    return ReqToTokenPool(4, 32, "cpu"), TokenToKVPoolAllocator(POOL, "cpu")


@pytest.fixture
def cache(pools):
    return RadixCache(*pools)


def _slots(allocator, n):
    out = allocator.alloc(n)
    assert out is not None
    return out


def _check_sizes(cache):
    """evictable + protected equal the tokens in the tree, split by lock."""
    ev = pr = 0
    for node in cache._iter_nodes():
        if node is cache.root:
            continue
        if node.lock_ref:
            pr += len(node.key)
        else:
            ev += len(node.key)
    assert (cache.evictable_size(), cache.protected_size()) == (ev, pr)


def test_match_empty_and_unknown(cache):
    slots, node = cache.match_prefix([1, 2, 3])
    assert slots.numel() == 0 and node is cache.root
    slots, node = cache.match_prefix([])
    assert slots.numel() == 0 and node is cache.root


def test_insert_then_match_full_and_partial(cache, pools):
    _, alloc = pools
    kv = _slots(alloc, 5)
    assert cache.insert([1, 2, 3, 4, 5], kv) == 0
    assert cache.total_size() == cache.evictable_size() == 5
    slots, node = cache.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert torch.equal(slots, kv) and node.key == (1, 2, 3, 4, 5)
    # a shorter query splits the edge: the match ends on the new upper node
    slots, node = cache.match_prefix([1, 2, 3, 9])
    assert torch.equal(slots, kv[:3]) and node.key == (1, 2, 3)
    assert list(node.children) == [4] and node.children[4].key == (4, 5)
    assert cache.total_size() == 5
    _check_sizes(cache)


def test_insert_splits_and_reports_cached_prefix(cache, pools):
    _, alloc = pools
    a, b = _slots(alloc, 6), _slots(alloc, 6)
    assert cache.insert([1, 2, 3, 4, 5, 6], a) == 0
    # shares 3 tokens: the tree keeps its slots for those, takes b's for the rest
    assert cache.insert([1, 2, 3, 7, 8, 9], b) == 3
    assert cache.total_size() == 9
    upper = cache.root.children[1]
    assert upper.key == (1, 2, 3) and set(upper.children) == {4, 7}
    slots, _ = cache.match_prefix([1, 2, 3, 7, 8, 9])
    assert torch.equal(slots, torch.cat([a[:3], b[3:]]))
    # a key already held in full adds nothing
    assert cache.insert([1, 2, 3, 4], _slots(alloc, 4)) == 4
    assert cache.total_size() == 9
    _check_sizes(cache)


def test_lock_moves_tokens_between_evictable_and_protected(cache, pools):
    _, alloc = pools
    cache.insert([1, 2, 3, 4], _slots(alloc, 4))
    cache.insert([1, 2, 5, 6, 7], _slots(alloc, 5))
    _, node = cache.match_prefix([1, 2, 5, 6, 7])
    cache.inc_lock_ref(node)
    assert (cache.evictable_size(), cache.protected_size()) == (2, 5)
    cache.inc_lock_ref(node)  # a second request on the same path
    assert (cache.evictable_size(), cache.protected_size()) == (2, 5)
    cache.dec_lock_ref(node)
    assert (cache.evictable_size(), cache.protected_size()) == (2, 5)
    # a split under a locked node keeps the lock on both halves
    _, mid = cache.match_prefix([1, 2, 5, 0])
    assert mid.lock_ref == 1 and mid.key == (5,)
    _check_sizes(cache)
    cache.dec_lock_ref(node)
    assert (cache.evictable_size(), cache.protected_size()) == (7, 0)
    _check_sizes(cache)


def test_evict_lru_leaves_first_and_never_locked(cache, pools):
    _, alloc = pools
    old, mid, new = _slots(alloc, 3), _slots(alloc, 3), _slots(alloc, 3)
    cache.insert([1, 1, 1], old)
    cache.insert([2, 2, 2], mid)
    cache.insert([3, 3, 3], new)
    cache.match_prefix([1, 1, 1])  # touching "old" makes "mid" the least recently used
    free_before = alloc.available_size()
    assert cache.evict(1) == 3  # whole leaves go
    assert cache.match_prefix([2, 2, 2])[0].numel() == 0
    assert alloc.available_size() == free_before + 3
    _, node = cache.match_prefix([3, 3, 3])
    cache.inc_lock_ref(node)
    assert cache.evict(100) == 3  # only the unlocked one
    assert cache.match_prefix([1, 1, 1])[0].numel() == 0
    assert cache.match_prefix([3, 3, 3])[0].numel() == 3
    assert (cache.evictable_size(), cache.protected_size()) == (0, 3)
    assert alloc.available_size() == free_before + 6


def test_evict_climbs_to_parents_that_become_leaves(cache, pools):
    _, alloc = pools
    cache.insert([1, 2, 3, 4], _slots(alloc, 4))
    cache.insert([1, 2, 5, 6], _slots(alloc, 4))
    assert cache.total_size() == 6
    assert cache.evict(100) == 6
    assert cache.total_size() == 0 and not cache.root.children
    assert alloc.available_size() == POOL - 8 + 6  # the duplicate [1, 2] slots stay with the caller


def _req(pools, fill_ids):
    req_pool, alloc = pools
    req = SimpleNamespace(fill_ids=list(fill_ids), req_pool_idx=req_pool.alloc(),
                          prefix_indices=torch.empty(0, dtype=torch.int64), last_node=None)
    return req


def test_request_hooks_share_kv_and_free_duplicates(cache, pools):
    req_pool, alloc = pools
    prompt = [10, 11, 12, 13, 14, 15]
    # request A computes the prompt from scratch in two chunks
    a = _req(pools, prompt + [16])
    a.prefix_indices, a.last_node = cache.match_prefix(a.fill_ids)
    cache.inc_lock_ref(a.last_node)
    kv_a = _slots(alloc, 7)
    req_pool.write(a.req_pool_idx, 0, kv_a)
    cache.cache_unfinished_req(a, 4)  # first chunk done: 4 tokens shared and locked
    assert torch.equal(a.prefix_indices, kv_a[:4]) and cache.protected_size() == 4
    cache.cache_finished_req(a, 7)
    assert a.req_pool_idx is None and cache.protected_size() == 0 and cache.evictable_size() == 7
    free_after_a = alloc.available_size()

    # request B repeats the prompt: the cached prefix is reused, its own copies are freed
    b = _req(pools, prompt + [99])
    b.prefix_indices, b.last_node = cache.match_prefix(b.fill_ids)
    assert torch.equal(b.prefix_indices, kv_a[:6])
    cache.inc_lock_ref(b.last_node)
    assert cache.protected_size() == 6
    kv_b = _slots(alloc, 1)
    req_pool.write(b.req_pool_idx, 0, b.prefix_indices)
    req_pool.write(b.req_pool_idx, 6, kv_b)
    cache.cache_finished_req(b, 7)
    assert cache.protected_size() == 0 and cache.total_size() == 8
    assert alloc.available_size() == free_after_a - 1
    _check_sizes(cache)

    # a request that ran beside A (matched nothing, computed all) gives its duplicates back
    c = _req(pools, prompt)
    c.last_node = cache.root
    kv_c = _slots(alloc, 6)
    req_pool.write(c.req_pool_idx, 0, kv_c)
    before = alloc.available_size()
    cache.cache_finished_req(c, 6)
    assert alloc.available_size() == before + 6


def test_chunk_cache_shares_nothing_and_frees_all(pools):
    req_pool, alloc = pools
    cache = ChunkCache(req_pool, alloc)
    slots, node = cache.match_prefix([1, 2, 3])
    assert slots.numel() == 0 and node is None
    cache.inc_lock_ref(node)
    assert cache.evict(10) == 0 and cache.total_size() == cache.evictable_size() == cache.protected_size() == 0
    req = _req(pools, [1, 2, 3, 4, 5])
    kv = _slots(alloc, 5)
    req_pool.write(req.req_pool_idx, 0, kv)
    cache.cache_unfinished_req(req, 3)
    assert torch.equal(req.prefix_indices, kv[:3])
    before, free_reqs = alloc.available_size(), req_pool.available_size()
    cache.cache_finished_req(req, 5)
    assert alloc.available_size() == before + 5 and req_pool.available_size() == free_reqs + 1
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0
