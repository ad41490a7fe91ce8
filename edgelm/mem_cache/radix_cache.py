"""Radix prefix cache: a tree over token ids whose nodes own KV slots.

A finished request's KV goes into the tree, so the next request that starts with the same
tokens (a system prompt, a chat history) reuses those slots instead of recomputing them.
Requests lock the path they use; unlocked leaves are evicted least-recently-used first when
the KV pool runs short.
"""

from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from edgelm.managers.schedule_batch import Req
    from edgelm.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator

_clock = itertools.count()


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, parent: TreeNode | None = None, key: tuple[int, ...] = (),
                 value: torch.Tensor | None = None):
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key = key  # token ids on the edge into this node
        self.value = value  # kv slots of those tokens, int64, same length as key
        self.lock_ref = 0
        self.last_access = next(_clock)

    def __lt__(self, other: TreeNode) -> bool:
        return self.last_access < other.last_access


def _common_len(a: tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator):
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.device = allocator.device
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode(key=(), value=torch.empty(0, dtype=torch.int64))
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable = 0
        self._protected = 0

    # ------------------------------------------------------------------ queries
    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """Longest cached prefix of `key`: its kv slots and the node where it ends."""
        node, values = self.root, []
        node.last_access = next(_clock)
        while key:
            child = node.children.get(key[0])
            if child is None:
                break
            n = _common_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            child.last_access = next(_clock)
            node, key = child, key[n:]
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return slots.to(self.device), node

    # ------------------------------------------------------------------ updates
    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Insert `key` with kv slots `value`; return how many leading tokens were already cached
        (the caller frees its own slots for those: the tree keeps the ones it had)."""
        node, pos = self.root, 0
        value = value.to(torch.int64)
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                new = TreeNode(node, tuple(key[pos:]), value[pos:].clone())
                node.children[key[pos]] = new
                self._evictable += len(new.key)
                return pos
            n = _common_len(child.key, key[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            node, pos = child, pos + n
        return pos

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child`'s edge after n tokens; return the new upper node."""
        upper = TreeNode(child.parent, child.key[:n], child.value[:n])
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        child.parent.children[child.key[0]] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        upper.children[child.key[0]] = child
        return upper

    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots from unlocked leaves, oldest first; return how many."""
        leaves = [n for n in self._iter_nodes() if not n.children and n.lock_ref == 0 and n is not self.root]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.allocator.free(leaf.value)
            freed += len(leaf.key)
            self._evictable -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def _iter_nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ------------------------------------------------------------------ request hooks
    def cache_unfinished_req(self, req: Req, computed_len: int) -> None:
        """After a prefill chunk: share the computed tokens and move the request's lock down the tree."""
        self._insert_req(req, computed_len)
        slots, node = self.match_prefix(req.fill_ids[:computed_len])
        self.req_to_token_pool.write(req.req_pool_idx, 0, slots)
        self.dec_lock_ref(req.last_node)
        self.inc_lock_ref(node)
        req.prefix_indices, req.last_node = slots, node

    def cache_finished_req(self, req: Req, kv_len: int) -> None:
        """A request is done: its KV goes into the tree; its request slot is freed."""
        self._insert_req(req, kv_len)
        self.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx = None

    def _insert_req(self, req: Req, kv_len: int) -> None:
        kv_slots = self.req_to_token_pool.req_to_token[req.req_pool_idx, :kv_len].to(torch.int64)
        tokens = req.fill_ids[:kv_len]
        cached = self.insert(tokens, kv_slots)
        # slots in [len(prefix), cached) duplicate what the tree already holds: free ours
        own_start = len(req.prefix_indices)
        if cached > own_start:
            self.allocator.free(kv_slots[own_start:cached])


class ChunkCache:
    """The prefix cache turned off (--disable-radix-cache): nothing is shared, everything is freed."""

    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator):
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.root = None

    def reset(self) -> None:
        pass

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, None]:
        return torch.empty(0, dtype=torch.int64, device=self.allocator.device), None

    def inc_lock_ref(self, node) -> None:
        pass

    def dec_lock_ref(self, node) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def cache_unfinished_req(self, req: Req, computed_len: int) -> None:
        req.prefix_indices = self.req_to_token_pool.req_to_token[req.req_pool_idx, :computed_len].to(torch.int64)

    def cache_finished_req(self, req: Req, kv_len: int) -> None:
        kv_slots = self.req_to_token_pool.req_to_token[req.req_pool_idx, :kv_len].to(torch.int64)
        self.allocator.free(kv_slots)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx = None
