"""Write the new tokens' K and V into the KV pool, both in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(K, V, K_buf, V_buf, kv_slots, stride_kt, stride_vt, stride_kbs, stride_vbs,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    """K, V [T, ROW] (rows may be strided, elements contiguous); K_buf, V_buf [S, ROW] rows;
    kv_slots [T]. Row t of K/V goes to row kv_slots[t] of K_buf/V_buf, cast to the pool's dtype."""
    t = tl.program_id(0)
    slot = tl.load(kv_slots + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    k = tl.load(K + t.to(tl.int64) * stride_kt + offs, mask=mask)
    v = tl.load(V + t.to(tl.int64) * stride_vt + offs, mask=mask)
    tl.store(K_buf + slot * stride_kbs + offs, k.to(K_buf.dtype.element_ty), mask=mask)
    tl.store(V_buf + slot * stride_vbs + offs, v.to(V_buf.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
             kv_slots: torch.Tensor) -> None:
    """k, v [T, Hkv * D] or [T, Hkv, D]; k_buf, v_buf [S, Hkv, D] (contiguous); kv_slots [T]."""
    num_tokens = kv_slots.shape[0]
    if num_tokens == 0:
        return
    row = k_buf.shape[1] * k_buf.shape[2]
    k = k.reshape(num_tokens, row)
    v = v.reshape(num_tokens, row)
    if k.stride(1) != 1:
        k = k.contiguous()
    if v.stride(1) != 1:
        v = v.contiguous()
    block = triton.next_power_of_2(row)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_buf, v_buf, kv_slots, k.stride(0), v.stride(0), k_buf.stride(0), v_buf.stride(0),
        ROW=row, BLOCK=block, num_warps=4 if block >= 1024 else 2)
