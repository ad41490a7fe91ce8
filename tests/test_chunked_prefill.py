"""Chunked prefill and prefix reuse: extending on KV already in the pool gives the logits of a
one-shot prefill (tiny random Llama-3 and Qwen3 checkpoints, float32 on the CPU)."""

from __future__ import annotations

import pytest
import torch

from edgelm.mem_cache.radix_cache import RadixCache
from tests.tiny_models import Driver, make_checkpoint, make_runner

ATOL = 2e-5
PROMPT = [7, 99, 3, 250, 18, 41, 5, 77, 120, 8, 64, 33, 2, 91, 150, 16]
OTHER = [300, 12, 45, 6, 200, 17, 81]


@pytest.fixture(scope="module", params=["llama3", "qwen3"])
def runner(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_checkpoint(request.param, directory)
    return make_runner(str(directory))


def _one_shot(runner, prompt):
    driver = Driver(runner)
    logits = driver.extend(driver.add_requests(1), [prompt], return_all_logits=True)
    driver.release()
    return logits


@pytest.mark.parametrize("chunks", [(6, 10), (5, 4, 7), (1, 14, 1)])
def test_chunked_prefill_equals_one_shot(runner, chunks):
    ref = _one_shot(runner, PROMPT)
    driver = Driver(runner)
    (r,) = driver.add_requests(1)
    got, start = [], 0
    for n in chunks:
        got.append(driver.extend([r], [PROMPT[start:start + n]], return_all_logits=True))
        start += n
    torch.testing.assert_close(torch.cat(got), ref, atol=ATOL, rtol=0)
    # the last-token logits (what the scheduler samples from) agree too
    last = driver.extend([driver.add_requests(1)[0]], [PROMPT])
    torch.testing.assert_close(last[0], ref[-1], atol=ATOL, rtol=0)


def test_chunk_batched_with_a_new_request(runner):
    """A request's second chunk (prefix in the pool) shares one extend pass with a fresh prompt."""
    ref_a, ref_b = _one_shot(runner, PROMPT), _one_shot(runner, OTHER)
    driver = Driver(runner)
    a, b = driver.add_requests(2)
    first = driver.extend([a], [PROMPT[:9]], return_all_logits=True)
    both = driver.extend([a, b], [PROMPT[9:], OTHER], return_all_logits=True)
    torch.testing.assert_close(first, ref_a[:9], atol=ATOL, rtol=0)
    torch.testing.assert_close(both[:len(PROMPT) - 9], ref_a[9:], atol=ATOL, rtol=0)
    torch.testing.assert_close(both[len(PROMPT) - 9:], ref_b, atol=ATOL, rtol=0)


def test_decode_after_chunked_prefill(runner):
    ref_tokens, ref_logits = Driver(runner).greedy([PROMPT], 6)
    driver = Driver(runner)
    (r,) = driver.add_requests(1)
    driver.extend([r], [PROMPT[:7]])
    logits = driver.extend([r], [PROMPT[7:]])
    tokens = []
    for step in range(6):
        torch.testing.assert_close(logits[0], ref_logits[step][0], atol=ATOL, rtol=0)
        tokens.append(int(logits[0].argmax()))
        if step < 5:
            logits = driver.decode([r], [tokens[-1]])
    assert tokens == ref_tokens[0]


def test_prefix_reuse_through_radix_cache(runner):
    """Request A's KV goes into the tree; B and C start on the matched slots (prefix_lens > 0)."""
    cache = RadixCache(runner.req_to_token_pool, runner.allocator)
    driver = Driver(runner)
    (a,) = driver.add_requests(1)
    driver.extend([a], [PROMPT])
    assert cache.insert(PROMPT, driver.kv_slots(a)) == 0

    b_prompt = PROMPT + [5, 6, 7]  # all of A, then more
    c_prompt = PROMPT[:10] + [111, 222, 333, 44]  # diverges inside A's edge: the node splits
    b, c = driver.add_requests(2)
    for r, prompt in ((b, b_prompt), (c, c_prompt)):
        slots, node = cache.match_prefix(prompt)
        cache.inc_lock_ref(node)
        driver.attach_prefix(r, slots)
    assert driver.seq_lens[b] == len(PROMPT) and driver.seq_lens[c] == 10
    logits = driver.extend([b, c], [b_prompt[len(PROMPT):], c_prompt[10:]], return_all_logits=True)
    ref_b, ref_c = _one_shot(runner, b_prompt), _one_shot(runner, c_prompt)
    torch.testing.assert_close(logits[:3], ref_b[len(PROMPT):], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[3:], ref_c[10:], atol=ATOL, rtol=0)
    # B and C read A's slots, not copies
    assert torch.equal(driver.kv_slots(b)[:len(PROMPT)], driver.kv_slots(a))
    assert torch.equal(driver.kv_slots(c)[:10], driver.kv_slots(a)[:10])
    assert cache.protected_size() == len(PROMPT)
