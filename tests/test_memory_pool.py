"""The request → token table, the KV slot allocator and the per-layer KV buffers."""

from __future__ import annotations

import pytest
import torch

from edgelm.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool, TokenToKVPoolAllocator


def test_req_to_token_pool_alloc_free_write():
    pool = ReqToTokenPool(3, 16, "cpu")
    # one row more than requests: the padding row of CUDA-graph batches, never handed out
    assert pool.req_to_token.shape == (4, 16) and pool.req_to_token.dtype == torch.int32
    slots = [pool.alloc() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2] and pool.alloc() is None and pool.available_size() == 0
    assert pool.padding_row == 3 and pool.padding_row not in slots
    pool.write(slots[1], 4, torch.tensor([7, 8, 9], dtype=torch.int64))
    assert pool.req_to_token[slots[1], 3:8].tolist() == [0, 7, 8, 9, 0]
    pool.free(slots[1])
    assert pool.available_size() == 1 and pool.alloc() == slots[1]
    pool.clear()
    assert pool.available_size() == 3


def test_allocator_never_hands_out_slot_zero():
    alloc = TokenToKVPoolAllocator(10, "cpu")
    assert alloc.available_size() == 10
    got = alloc.alloc(10)
    assert sorted(got.tolist()) == list(range(1, 11)) and got.dtype == torch.int64
    assert alloc.alloc(1) is None and alloc.available_size() == 0


def test_allocator_refuses_more_than_it_has_and_keeps_its_state():
    alloc = TokenToKVPoolAllocator(8, "cpu")
    a = alloc.alloc(5)
    assert alloc.alloc(4) is None
    assert alloc.available_size() == 3
    b = alloc.alloc(3)
    assert set(a.tolist()).isdisjoint(b.tolist())


def test_allocator_free_returns_slots_for_reuse():
    alloc = TokenToKVPoolAllocator(8, "cpu")
    a = alloc.alloc(6)
    alloc.free(a[:4])
    alloc.free(torch.empty(0, dtype=torch.int64))  # freeing nothing is fine
    alloc.free(a[4:5].to(torch.int32))  # any integer dtype
    assert alloc.available_size() == 7
    b = alloc.alloc(7)
    assert sorted(b.tolist()) == sorted(set(range(1, 9)) - {int(a[5])})
    alloc.clear()
    assert alloc.available_size() == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_pool_buffers_and_writes(dtype):
    pool = MHATokenToKVPool(16, dtype, num_kv_heads=2, head_dim=4, num_layers=3, device="cpu")
    assert len(pool.k_buffer) == len(pool.v_buffer) == 3
    k_buf, v_buf = pool.get_kv_buffer(1)
    assert k_buf.shape == v_buf.shape == (17, 2, 4) and k_buf.dtype == dtype
    assert all((buf[0] == 0).all() for buf in pool.k_buffer + pool.v_buffer)  # the padding slot
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    slots = torch.tensor([5, 1, 16])
    pool.k_buffer[0][slots] = 0
    pool.set_kv_buffer(1, slots, k, v)
    torch.testing.assert_close(k_buf[slots], k.to(dtype))
    torch.testing.assert_close(v_buf[slots], v.to(dtype))
    assert (pool.k_buffer[0][slots] == 0).all()  # other layers untouched


def test_kv_bytes_per_token():
    # 2 (K and V) × layers × kv heads × head dim × element size
    assert MHATokenToKVPool.bytes_per_token(torch.float16, 8, 128, 32) == 2 * 32 * 8 * 128 * 2
    assert MHATokenToKVPool.bytes_per_token(torch.float32, 3, 64, 30) == 2 * 30 * 3 * 64 * 4
