from __future__ import annotations

from torch import nn


class RadixAttention(nn.Module):
    """A layer's attention: its shape, and a hand-off to whichever backend the runner chose."""

    def __init__(self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int, layer_id: int):
        super().__init__()
        self.tp_q_head_num = num_heads
        self.tp_k_head_num = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.layer_id = layer_id

    def forward(self, q, k, v, forward_batch, rope=None):
        return forward_batch.attn_backend.forward(q, k, v, self, forward_batch, rope)
