"""The reference attention backend: plain PyTorch, readable, and the CPU path.

Extend attends request by request (each with its cached prefix read from the pool); decode
attends the whole batch at once over a padded `[batch, max_seq_len]` gather of KV slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgelm.layers.attention.base import AttentionBackend


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scaling: float) -> torch.Tensor:
    """q [B, Hkv, G, Q, D]; k, v [B, L, Hkv, D]; mask [B, 1, 1, Q, L] bool (True = attend).
    Grouped-query heads stay grouped: K/V are never repeated."""
    scores = torch.einsum("bkgqd,blkd->bkgql", q.float(), k.float()) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bkgql,blkd->bkgqd", probs, v.float())


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        self.device = model_runner.device
        self.req_to_token = model_runner.req_to_token_pool.req_to_token

    def init_forward_metadata(self, forward_batch) -> None:
        if forward_batch.forward_mode.is_decode():
            seq_lens = forward_batch.seq_lens
            max_len = int(forward_batch.seq_lens_cpu.max())
            rows = self.req_to_token[forward_batch.req_pool_indices, :max_len].long()
            valid = torch.arange(max_len, device=seq_lens.device)[None, :] < seq_lens[:, None]
            # padded positions read slot 0 and are masked out
            self.decode_kv_slots = torch.where(valid, rows, torch.zeros_like(rows))  # [B, max_len]
            self.decode_mask = valid[:, None, None, None, :]  # [B, 1, 1, 1, max_len]

    def forward_decode(self, q, k, v, layer, forward_batch):
        pool = forward_batch.token_to_kv_pool
        pool.set_kv_buffer(layer.layer_id, forward_batch.out_cache_loc, k.view(-1, layer.tp_k_head_num,
                           layer.head_dim), v.view(-1, layer.tp_k_head_num, layer.head_dim))
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        bs, hkv, d = q.shape[0], layer.tp_k_head_num, layer.head_dim
        qg = q.view(bs, hkv, layer.tp_q_head_num // hkv, 1, d)
        out = _attend(qg, k_buf[self.decode_kv_slots], v_buf[self.decode_kv_slots], self.decode_mask,
                      layer.scaling)
        return out.reshape(bs, -1).to(q.dtype)

    def forward_extend(self, q, k, v, layer, forward_batch):
        pool = forward_batch.token_to_kv_pool
        hkv, d = layer.tp_k_head_num, layer.head_dim
        pool.set_kv_buffer(layer.layer_id, forward_batch.out_cache_loc, k.view(-1, hkv, d), v.view(-1, hkv, d))
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        out = torch.empty_like(q)
        group = layer.tp_q_head_num // hkv
        start = 0
        for i in range(forward_batch.batch_size):
            prefix_len = forward_batch.extend_prefix_lens_cpu[i]
            extend_len = forward_batch.extend_seq_lens_cpu[i]
            seq_len = prefix_len + extend_len
            slots = self.req_to_token[forward_batch.req_pool_indices_cpu[i], :seq_len].long()
            qi = q[start : start + extend_len].view(extend_len, -1, d).transpose(0, 1)[None]  # [1, H, E, D]
            ki = k_buf[slots].transpose(0, 1)[None]  # [1, Hkv, S, D]
            vi = v_buf[slots].transpose(0, 1)[None]
            # query j sits at position prefix_len + j and sees keys 0..prefix_len + j
            mask = torch.ones(extend_len, seq_len, dtype=torch.bool, device=q.device).tril(prefix_len)
            oi = F.scaled_dot_product_attention(qi, ki.to(qi.dtype), vi.to(qi.dtype), attn_mask=mask,
                                                scale=layer.scaling, enable_gqa=group > 1)
            out[start : start + extend_len] = oi[0].transpose(0, 1).reshape(extend_len, -1)
            start += extend_len
        return out
