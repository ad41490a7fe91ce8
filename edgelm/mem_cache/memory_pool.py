"""KV memory: the request → token table and the token-granular KV pool.

A KV slot holds one token's K and V for every layer. Slot 0 is never handed out: padded
positions in batched kernels and CUDA graphs point at it, so it must stay harmless to read.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """`req_to_token[req_slot, position] -> kv slot` for every running request.

    Row `size` (`padding_row`) is never handed out: padded rows of a CUDA-graph batch read and
    write it, so they can never touch a live request's row.
    """

    def __init__(self, size: int, max_context_len: int, device: str):
        self.size = size
        self.padding_row = size
        self.max_context_len = max_context_len
        self.device = device
        # [size + 1, max_context_len] int32: kv slot of each position of each request
        self.req_to_token = torch.zeros((size + 1, max_context_len), dtype=torch.int32, device=device)
        self.free_slots = list(range(size))

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self) -> int | None:
        return self.free_slots.pop() if self.free_slots else None

    def free(self, req_slot: int) -> None:
        self.free_slots.append(req_slot)

    def write(self, req_slot: int, start: int, kv_slots: torch.Tensor) -> None:
        self.req_to_token[req_slot, start : start + len(kv_slots)] = kv_slots.to(torch.int32)

    def clear(self) -> None:
        self.free_slots = list(range(self.size))


class TokenToKVPoolAllocator:
    """Hands out KV slots one token at a time (page size 1: nothing is wasted to fragmentation)."""

    def __init__(self, size: int, device: str):
        self.size = size
        self.device = device
        self.clear()

    def clear(self) -> None:
        # slots 1..size are usable; 0 is the padding slot
        self.free_slots = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)
        self._release_buffer: list[torch.Tensor] = []

    def available_size(self) -> int:
        self._merge_released()
        return len(self.free_slots)

    def alloc(self, need: int) -> torch.Tensor | None:
        self._merge_released()
        if need > len(self.free_slots):
            return None
        out = self.free_slots[:need]
        self.free_slots = self.free_slots[need:]
        return out

    def free(self, kv_slots: torch.Tensor) -> None:
        if kv_slots.numel():
            self._release_buffer.append(kv_slots.to(torch.int64))

    def _merge_released(self) -> None:
        if self._release_buffer:
            self.free_slots = torch.cat([self.free_slots, *self._release_buffer])
            self._release_buffer = []


class MHATokenToKVPool:
    """Per-layer K and V buffers, each `[size + 1, num_kv_heads, head_dim]`."""

    def __init__(self, size: int, dtype: torch.dtype, num_kv_heads: int, head_dim: int, num_layers: int,
                 device: str):
        self.size = size
        self.dtype = dtype
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.device = device
        shape = (size + 1, num_kv_heads, head_dim)
        # torch.empty: pages of a large pool are only touched (and, on a CPU, committed) as they fill.
        self.k_buffer = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffer = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for buf in self.k_buffer + self.v_buffer:
            buf[0].zero_()

    @staticmethod
    def bytes_per_token(dtype: torch.dtype, num_kv_heads: int, head_dim: int, num_layers: int) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer_id], self.v_buffer[layer_id]

    def set_kv_buffer(self, layer_id: int, kv_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [num_tokens, num_kv_heads, head_dim] written at kv_slots [num_tokens]."""
        self.k_buffer[layer_id][kv_slots] = k.to(self.dtype)
        self.v_buffer[layer_id][kv_slots] = v.to(self.dtype)
