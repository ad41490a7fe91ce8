"""Rotary position embedding applied in place to q and k (GPT-NeoX layout), one launch for both."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_H = 8  # heads per program


@triton.jit
def _rotary_kernel(pos_ptr, cache_ptr, cache_stride, q_ptr, q_stride, k_ptr, k_stride, num_q_heads,
                   num_k_heads, n_q_blocks, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    """positions [T]; cache [max_position, 2 * HALF] float32 (cos ‖ sin); q [T, num_q_heads * 2 * HALF],
    k [T, num_k_heads * 2 * HALF] (rows may be strided, heads packed). In place, per head:
    (x1, x2) → (x1 cos − x2 sin, x2 cos + x1 sin), in float32.

    Grid: (T, n_q_blocks + cdiv(num_k_heads, BLOCK_H)); program (t, b) does BLOCK_H heads of q, then of k.
    """
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    cos = tl.load(cache_ptr + pos * cache_stride + d, mask=d_mask, other=0.0)
    sin = tl.load(cache_ptr + pos * cache_stride + HALF + d, mask=d_mask, other=0.0)
    if hb < n_q_blocks:
        row_ptr = q_ptr + t * q_stride
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = heads < num_q_heads
    else:
        row_ptr = k_ptr + t * k_stride
        heads = (hb - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = heads < num_k_heads
    offs = heads[:, None] * (2 * HALF) + d[None, :]
    mask = h_mask[:, None] & d_mask[None, :]
    x1 = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(row_ptr + offs, o1.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(row_ptr + offs + HALF, o2.to(q_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor, head_dim: int) -> tuple[int, int] | None:
    """(row stride, heads) when x is [T, H * head_dim] or [T, H, head_dim] with packed heads, else None."""
    if x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % head_dim == 0:
        return x.stride(0), x.shape[1] // head_dim
    if x.dim() == 3 and x.shape[2] == head_dim and x.stride(2) == 1 and x.stride(1) == head_dim:
        return x.stride(0), x.shape[1]
    return None


def supports(q: torch.Tensor, k: torch.Tensor, head_dim: int) -> bool:
    return (head_dim % 2 == 0 and q.dtype == k.dtype and q.shape[0] == k.shape[0]
            and _as_rows(q, head_dim) is not None and _as_rows(k, head_dim) is not None)


def rotary_embedding_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      cos_sin_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place (they may be views into a merged qkv); returns (q, k)."""
    q_stride, num_q_heads = _as_rows(q, head_dim)
    k_stride, num_k_heads = _as_rows(k, head_dim)
    tokens = q.shape[0]
    if tokens > 0:
        n_q_blocks = triton.cdiv(num_q_heads, BLOCK_H)
        grid = (tokens, n_q_blocks + triton.cdiv(num_k_heads, BLOCK_H))
        half = head_dim // 2
        _rotary_kernel[grid](positions, cos_sin_cache, cos_sin_cache.stride(0), q, q_stride, k, k_stride,
                             num_q_heads, num_k_heads, n_q_blocks, HALF=half,
                             BLOCK_D=triton.next_power_of_2(half), BLOCK_H=BLOCK_H, num_warps=4)
    return q, k
