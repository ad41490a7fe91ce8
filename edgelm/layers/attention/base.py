"""The attention backend interface: backends read only a ForwardBatch and the KV pool."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from edgelm.layers.attention.radix_attention import RadixAttention
    from edgelm.model_executor.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    """One instance per model runner. `init_forward_metadata` runs once per batch, before the
    layers; `forward_extend` / `forward_decode` run once per layer and write the new K/V into the
    pool at `forward_batch.out_cache_loc` before attending."""

    supports_cuda_graph = False

    @abstractmethod
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None: ...

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
                       forward_batch: ForwardBatch) -> torch.Tensor: ...

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
                       forward_batch: ForwardBatch) -> torch.Tensor: ...

    def forward(self, q, k, v, layer, forward_batch, rope=None):
        """q [T, H * D], k/v [T, Hkv * D] → [T, H * D]. rope: (positions, RotaryEmbedding) to apply
        to q and k first (a backend may fuse it with its KV write), or None."""
        if rope is not None:
            positions, rotary = rope
            q, k = rotary(positions, q, k)
        if forward_batch.forward_mode.is_decode():
            return self.forward_decode(q, k, v, layer, forward_batch)
        return self.forward_extend(q, k, v, layer, forward_batch)

    def fused_kv_target(self, layer: RadixAttention, forward_batch: ForwardBatch):
        """(k_buf, v_buf, slots): where a decode step's caller may write the new K/V itself (with
        the rotary already applied to q and k) and then call `forward_decode_stored`; None where this
        backend or step does not take that (the default)."""
        return None

    @staticmethod
    def decode_pool_target(layer: RadixAttention, forward_batch: ForwardBatch):
        """fused_kv_target for a backend that takes it: a decode step's pool buffers, where they are
        [S, Hkv, D] and contiguous (the layout callers write), and the step's slots."""
        if not forward_batch.forward_mode.is_decode():
            return None
        k_buf, v_buf = forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        if k_buf.dim() != 3 or not (k_buf.is_contiguous() and v_buf.is_contiguous()) or v_buf.shape != k_buf.shape:
            return None
        return k_buf, v_buf, forward_batch.out_cache_loc

    def forward_decode_stored(self, q: torch.Tensor, layer: RadixAttention, forward_batch: ForwardBatch,
                              k_buf: torch.Tensor, v_buf: torch.Tensor) -> torch.Tensor:
        """Decode attention of the rotated q [T, H * D] over the pool, the step's K/V written already
        (at the slots `fused_kv_target` gave)."""
        raise NotImplementedError

    # CUDA-graph hooks: backends that support graphs override these.
    def init_cuda_graph_state(self, max_bs: int, max_context_len: int) -> None:
        raise NotImplementedError

    def init_forward_metadata_capture_cuda_graph(self, bs: int, forward_batch: ForwardBatch) -> None:
        raise NotImplementedError

    def init_forward_metadata_replay_cuda_graph(self, bs: int, forward_batch: ForwardBatch) -> None:
        raise NotImplementedError
