"""ForwardBatch: everything one forward pass needs, and all that attention backends read."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, auto
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from edgelm.layers.attention.base import AttentionBackend
    from edgelm.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool


class ForwardMode(IntEnum):
    EXTEND = auto()  # prefill, or a chunk of it, after a cached prefix
    DECODE = auto()  # one new token per request

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE

    def is_extend(self) -> bool:
        return self == ForwardMode.EXTEND


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    # the device tensors of a decode batch made by for_decode are None until `materialize` (a
    # CUDA-graph replay never needs them: it copies decode_host into its static buffers at once)
    input_ids: torch.Tensor | None  # [num_tokens]
    positions: torch.Tensor | None  # [num_tokens]
    out_cache_loc: torch.Tensor  # [num_tokens] kv slots the new tokens' K/V go to
    req_pool_indices: torch.Tensor | None  # [batch] rows of req_to_token
    seq_lens: torch.Tensor | None  # [batch] tokens in context after this pass (prefix + new)
    req_pool_indices_cpu: list[int]
    seq_lens_cpu: torch.Tensor  # [batch], on the host
    # decode only (for_decode): int64 [4, batch] on the host: input_ids, positions, req_pool_indices, seq_lens
    decode_host: torch.Tensor | None = None
    # decode only: the token ids already on the device (the samples of the step still in flight, with
    # overlap scheduling); they replace decode_host's first row, which then holds placeholders
    input_ids_device: torch.Tensor | None = None
    # extend only
    extend_prefix_lens_cpu: list[int] = field(default_factory=list)
    extend_seq_lens_cpu: list[int] = field(default_factory=list)
    extend_prefix_lens: torch.Tensor | None = None  # [batch]
    extend_seq_lens: torch.Tensor | None = None  # [batch]
    extend_start_loc: torch.Tensor | None = None  # [batch] offset of each request's first new token
    # the logits of every position, not only each request's last (tests; prompt logprobs)
    return_all_logits: bool = False
    # set by the model runner
    req_to_token_pool: ReqToTokenPool | None = None
    token_to_kv_pool: MHATokenToKVPool | None = None
    attn_backend: AttentionBackend | None = None

    @classmethod
    def for_extend(cls, input_ids: list[int], req_pool_indices: list[int], prefix_lens: list[int],
                   extend_lens: list[int], out_cache_loc: torch.Tensor, device: str,
                   return_all_logits: bool = False) -> ForwardBatch:
        positions = torch.cat([torch.arange(p, p + e, dtype=torch.int64) for p, e in zip(prefix_lens, extend_lens)])
        seq_lens = torch.tensor([p + e for p, e in zip(prefix_lens, extend_lens)], dtype=torch.int32)
        extend_lens_t = torch.tensor(extend_lens, dtype=torch.int32)
        start_loc = torch.zeros_like(extend_lens_t)
        start_loc[1:] = torch.cumsum(extend_lens_t[:-1], 0)
        return cls(
            forward_mode=ForwardMode.EXTEND,
            batch_size=len(req_pool_indices),
            input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device, non_blocking=True),
            positions=positions.to(device, non_blocking=True),
            out_cache_loc=out_cache_loc.to(device),
            req_pool_indices=torch.tensor(req_pool_indices, dtype=torch.int64).to(device, non_blocking=True),
            seq_lens=seq_lens.to(device, non_blocking=True),
            req_pool_indices_cpu=list(req_pool_indices),
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=list(prefix_lens),
            extend_seq_lens_cpu=list(extend_lens),
            extend_prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32).to(device, non_blocking=True),
            extend_seq_lens=extend_lens_t.to(device, non_blocking=True),
            extend_start_loc=start_loc.to(device, non_blocking=True),
            return_all_logits=return_all_logits,
        )

    @classmethod
    def for_decode(cls, input_ids: list[int] | torch.Tensor, req_pool_indices: list[int], seq_lens: list[int],
                   out_cache_loc: torch.Tensor, device: str, lazy: bool = False) -> ForwardBatch:
        """A decode batch. Its inputs are one int64 block on the host; `lazy` leaves them there
        until needed (the model runner's CUDA-graph path moves the block in one copy, its eager
        path calls `materialize`). Recording `out_cache_loc` in req_to_token is the model runner's
        job: it does so for every decode forward."""
        on_device = isinstance(input_ids, torch.Tensor)  # a device tensor: the in-flight step's samples
        ids = [0] * len(seq_lens) if on_device else input_ids
        host = torch.tensor([ids, [n - 1 for n in seq_lens], req_pool_indices, seq_lens], dtype=torch.int64)
        batch = cls(
            forward_mode=ForwardMode.DECODE,
            batch_size=len(req_pool_indices),
            input_ids=None, positions=None, req_pool_indices=None, seq_lens=None,
            out_cache_loc=out_cache_loc.to(device),
            req_pool_indices_cpu=list(req_pool_indices),
            seq_lens_cpu=host[3].to(torch.int32),
            decode_host=host,
            input_ids_device=input_ids if on_device else None,
        )
        if not lazy:
            batch.materialize(device)
        return batch

    def materialize(self, device) -> None:
        """Device tensors of a for_decode batch: one host-to-device copy of decode_host."""
        if self.input_ids is not None or self.decode_host is None:
            return
        block = self.decode_host.to(device, non_blocking=True)
        self.input_ids, self.positions, self.req_pool_indices = block[0], block[1], block[2]
        if self.input_ids_device is not None:
            self.input_ids = self.input_ids_device.to(torch.int64)
        self.seq_lens = block[3].to(torch.int32)
