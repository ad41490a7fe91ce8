"""Rotary position embedding (GPT-NeoX layout) in one launch for q and k: in place, or, for the Triton
attention backend, with the rotated k and v written straight into the KV pool (no separate KV write)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgelm.layers.triton_ops import pdl
from edgelm.layers.triton_ops.pdl import wait_and_release

BLOCK_H = 8  # heads per program


@triton.jit
def _rotary_kernel(pos_ptr, cache_ptr, cache_stride, q_ptr, q_stride, k_ptr, k_stride, num_q_heads,
                   num_k_heads, n_q_blocks, v_ptr, v_stride, k_buf, v_buf, kv_slots, n_k_blocks,
                   HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, STORE: tl.constexpr,
                   PDL: tl.constexpr):
    """positions [T]; cache [max_position, 2 * HALF] float32 (cos ‖ sin); q [T, num_q_heads * 2 * HALF],
    k [T, num_k_heads * 2 * HALF] (rows may be strided, heads packed). Per head:
    (x1, x2) → (x1 cos − x2 sin, x2 cos + x1 sin), in float32. q is rotated in place.

    STORE false: k is rotated in place too. Grid (T, n_q_blocks + n_k_blocks).
    STORE true: the rotated k, and v [T, num_k_heads * 2 * HALF] as it is, go to row kv_slots[t] of
    the KV pool (k_buf, v_buf [S, num_k_heads * 2 * HALF], the activations' dtype); k itself is left
    as it came. Grid (T, n_q_blocks + 2 * n_k_blocks): the last n_k_blocks programs copy v.
    """
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    wait_and_release(PDL)
    if hb >= n_q_blocks + n_k_blocks:  # (STORE only) v: copied into the pool as it is
        slot = tl.load(kv_slots + t).to(tl.int64)
        heads = (hb - n_q_blocks - n_k_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs = heads[:, None] * (2 * HALF) + d[None, :]
        mask = (heads < num_k_heads)[:, None] & d_mask[None, :]
        row = v_ptr + t * v_stride
        dst = v_buf + slot * (num_k_heads * 2 * HALF)
        tl.store(dst + offs, tl.load(row + offs, mask=mask), mask=mask)
        tl.store(dst + offs + HALF, tl.load(row + offs + HALF, mask=mask), mask=mask)
    else:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cache_ptr + pos * cache_stride + d, mask=d_mask, other=0.0)
        sin = tl.load(cache_ptr + pos * cache_stride + HALF + d, mask=d_mask, other=0.0)
        if hb < n_q_blocks:
            row_ptr = q_ptr + t * q_stride
            heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            h_mask = heads < num_q_heads
            dst_ptr = row_ptr
        else:
            row_ptr = k_ptr + t * k_stride
            heads = (hb - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            h_mask = heads < num_k_heads
            if STORE:
                dst_ptr = k_buf + tl.load(kv_slots + t).to(tl.int64) * (num_k_heads * 2 * HALF)
            else:
                dst_ptr = row_ptr
        offs = heads[:, None] * (2 * HALF) + d[None, :]
        mask = h_mask[:, None] & d_mask[None, :]
        x1 = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(row_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(dst_ptr + offs, o1.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(dst_ptr + offs + HALF, o2.to(q_ptr.dtype.element_ty), mask=mask)


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
    _launch(positions, q, k, cos_sin_cache, head_dim)
    return q, k


def supports_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, k_buf: torch.Tensor,
                   v_buf: torch.Tensor) -> bool:
    """Whether rotary_store_kv_ takes these tensors (pool buffers [S, Hkv, D], contiguous)."""
    return (supports(q, k, head_dim) and v.dtype == k.dtype == k_buf.dtype == v_buf.dtype and v.shape[0] == k.shape[0]
            and _as_rows(v, head_dim) == (v.stride(0), k_buf.shape[1]) and _as_rows(k, head_dim)[1] == k_buf.shape[1]
            and k_buf.dim() == 3 and k_buf.shape[2] == head_dim and k_buf.is_contiguous() and v_buf.is_contiguous()
            and v_buf.shape == k_buf.shape)


def rotary_store_kv_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_sin_cache: torch.Tensor, head_dim: int, k_buf: torch.Tensor, v_buf: torch.Tensor,
                     kv_slots: torch.Tensor) -> torch.Tensor:
    """One launch for a decode step's rotary and KV write: q rotated in place; the rotated k and v
    written to the pool rows kv_slots (k itself is not modified). Returns q."""
    _launch(positions, q, k, cos_sin_cache, head_dim, store=(v, k_buf, v_buf, kv_slots))
    return q


def _launch(positions, q, k, cos_sin_cache, head_dim, store=None):
    q_stride, num_q_heads = _as_rows(q, head_dim)
    k_stride, num_k_heads = _as_rows(k, head_dim)
    tokens = q.shape[0]
    if tokens == 0:
        return
    n_q_blocks = triton.cdiv(num_q_heads, BLOCK_H)
    n_k_blocks = triton.cdiv(num_k_heads, BLOCK_H)
    half = head_dim // 2
    if store is None:
        v, k_buf, v_buf, slots, v_stride = q, q, q, positions, 0
    else:
        v, k_buf, v_buf, slots = store
        v_stride = _as_rows(v, head_dim)[0]
    grid = (tokens, n_q_blocks + n_k_blocks * (1 if store is None else 2))
    pdl_on = pdl.mode(q.device, tokens)
    _rotary_kernel[grid](positions, cos_sin_cache, cos_sin_cache.stride(0), q, q_stride, k, k_stride,
                         num_q_heads, num_k_heads, n_q_blocks, v, v_stride, k_buf, v_buf, slots, n_k_blocks,
                         HALF=half, BLOCK_D=triton.next_power_of_2(half), BLOCK_H=BLOCK_H,
                         STORE=store is not None, PDL=pdl_on, num_warps=4, **pdl.launch_kwargs(pdl_on))
