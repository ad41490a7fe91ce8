"""The reference attention backend: plain PyTorch, readable, and the CPU path.

Extend attends request by request (each with its cached prefix read from the pool); decode
attends the whole batch at once over a padded `[batch, max_seq_len]` gather of KV slots. Both
compute in float32 through one `scaled_dot_product_attention` call per layer, and everything
that is the same for every layer (slot lists, masks) is built once per batch: on a CPU each
extra small op per layer costs a thread fork/join, and many of them on a busy machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgelm.layers.attention.base import AttentionBackend


def _gather(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """buf [pool, Hkv, D], slots [B, L] → [B, Hkv, L, D] in float32."""
    b, length = slots.shape
    out = buf.index_select(0, slots.reshape(-1)).view(b, length, buf.shape[1], buf.shape[2])
    return out.transpose(1, 2).float()


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        self.device = model_runner.device
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.decode_kv_slots: torch.Tensor | None = None  # [B, max_len] int64
        self.decode_mask: torch.Tensor | None = None  # [B, 1, 1, 1, max_len] bool, None: no padding
        self.extend_meta: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def init_forward_metadata(self, forward_batch) -> None:
        if forward_batch.forward_mode.is_decode():
            seq_lens_cpu = forward_batch.seq_lens_cpu
            max_len = int(seq_lens_cpu.max())
            rows = self.req_to_token[forward_batch.req_pool_indices, :max_len].long()
            if int(seq_lens_cpu.min()) == max_len:  # no padding (always so at batch 1)
                self.decode_kv_slots, self.decode_mask = rows, None
                return
            seq_lens = forward_batch.seq_lens
            valid = torch.arange(max_len, device=seq_lens.device)[None, :] < seq_lens[:, None]
            # padded positions read slot 0 and are masked out
            self.decode_kv_slots = torch.where(valid, rows, torch.zeros_like(rows))  # [B, max_len]
            self.decode_mask = valid[:, None, None, None, :]  # [B, 1, 1, 1, max_len]
            return
        self.extend_meta = []
        for i in range(forward_batch.batch_size):
            prefix_len = forward_batch.extend_prefix_lens_cpu[i]
            extend_len = forward_batch.extend_seq_lens_cpu[i]
            seq_len = prefix_len + extend_len
            slots = self.req_to_token[forward_batch.req_pool_indices_cpu[i], :seq_len].long()
            # query j sits at position prefix_len + j and sees keys 0..prefix_len + j; without a
            # prefix that is plain causal attention (no mask tensor needed)
            mask = None
            if prefix_len:
                mask = torch.ones(extend_len, seq_len, dtype=torch.bool, device=self.device).tril(prefix_len)
            self.extend_meta.append((slots[None], mask))

    def forward_decode(self, q, k, v, layer, forward_batch):
        pool = forward_batch.token_to_kv_pool
        hkv, d = layer.tp_k_head_num, layer.head_dim
        pool.set_kv_buffer(layer.layer_id, forward_batch.out_cache_loc, k.view(-1, hkv, d), v.view(-1, hkv, d))
        return self.forward_decode_stored(q, layer, forward_batch, *pool.get_kv_buffer(layer.layer_id))

    def fused_kv_target(self, layer, forward_batch):
        return self.decode_pool_target(layer, forward_batch)

    def forward_decode_stored(self, q, layer, forward_batch, k_buf, v_buf):
        bs, hkv, d = q.shape[0], layer.tp_k_head_num, layer.head_dim
        slots = self.decode_kv_slots
        mask = None if self.decode_mask is None else self.decode_mask.view(bs, 1, 1, slots.shape[1])
        qh = q.view(bs, layer.tp_q_head_num, 1, d).float()
        out = F.scaled_dot_product_attention(qh, _gather(k_buf, slots), _gather(v_buf, slots), attn_mask=mask,
                                             scale=layer.scaling, enable_gqa=layer.tp_q_head_num != hkv)
        return out.reshape(bs, -1).to(q.dtype)

    def forward_extend(self, q, k, v, layer, forward_batch):
        pool = forward_batch.token_to_kv_pool
        hkv, d = layer.tp_k_head_num, layer.head_dim
        pool.set_kv_buffer(layer.layer_id, forward_batch.out_cache_loc, k.view(-1, hkv, d), v.view(-1, hkv, d))
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        out = torch.empty_like(q)
        start = 0
        for slots, mask in self.extend_meta:
            extend_len = mask.shape[0] if mask is not None else slots.shape[1]
            qi = q[start : start + extend_len].view(extend_len, -1, d).transpose(0, 1)[None].float()  # [1, H, E, D]
            oi = F.scaled_dot_product_attention(qi, _gather(k_buf, slots), _gather(v_buf, slots), attn_mask=mask,
                                                is_causal=mask is None, scale=layer.scaling,
                                                enable_gqa=layer.tp_q_head_num != hkv)
            out[start : start + extend_len] = oi[0].transpose(0, 1).reshape(extend_len, -1).to(q.dtype)
            start += extend_len
        return out
