"""Rotary position embedding (GPT-NeoX layout: the two halves of each head rotate together)."""

from __future__ import annotations

import math

import torch
from torch import nn

from edgelm.layers import triton_ops


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    is_mid = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_mid, mid, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        positions = torch.arange(max_position, dtype=torch.float64)
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            positions = positions / scaling["factor"]
        elif rope_type != "default":
            raise ValueError(f"rope scaling type {rope_type!r} is not supported yet")
        freqs = torch.outer(positions, inv_freq)  # [max_position, head_dim / 2]
        # [max_position, head_dim]: cos ‖ sin, kept in float32 for accuracy at long positions
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(torch.float32)
        self.register_buffer("cos_sin_cache", cache.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, num_heads * head_dim]; k [T, num_kv_heads * head_dim] → rotated (q, k).

        On CUDA (Triton switched on) q and k are rotated in place and returned as they came: views
        into the merged qkv stay views (rows strided). The torch path returns new contiguous tensors."""
        if q.is_cuda and triton_ops.enabled("rotary"):
            from edgelm.layers.triton_ops.rotary import rotary_embedding_, supports

            if supports(q, k, self.head_dim):
                return rotary_embedding_(positions, q, k, self.cos_sin_cache, self.head_dim)
        return self.forward_native(positions, q, k)

    def rotate_and_store(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_buf: torch.Tensor, v_buf: torch.Tensor, kv_slots: torch.Tensor) -> bool:
        """q rotated in place, and the rotated k and v written to the KV pool rows kv_slots, in one
        Triton launch (the Triton attention backend's path). Returns False, having done nothing,
        where that path does not apply (CPU tensors, Triton switched off, other layouts)."""
        if not (q.is_cuda and triton_ops.enabled("rotary") and triton_ops.enabled("rope_kv")):
            return False
        from edgelm.layers.triton_ops.rotary import rotary_store_kv_, supports_store

        if not supports_store(q, k, v, self.head_dim, k_buf, v_buf):
            return False
        rotary_store_kv_(positions, q, k, v, self.cos_sin_cache, self.head_dim, k_buf, v_buf, kv_slots)
        return True

    def forward_native(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        cos, sin = cos_sin.chunk(2, dim=-1)  # [T, head_dim / 2]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.view(shape[0], -1, self.head_dim).float()
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.view(shape).to(dtype)


def rope_config(hf_config) -> tuple[float, dict | None]:
    """(base, scaling) from an HF config: transformers 5 keeps both in `rope_parameters`,
    transformers 4 in `rope_theta` and `rope_scaling`."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(base), scaling
    return float(getattr(hf_config, "rope_theta", 10000.0)), getattr(hf_config, "rope_scaling", None)
