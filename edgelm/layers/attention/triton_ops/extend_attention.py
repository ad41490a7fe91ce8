"""Extend (prefill) attention: each request's new tokens attend its cached prefix and, causally,
each other. All K/V (prefix and new, already written) are read from the pool through
req_to_token, so requests of any lengths share one launch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from edgelm.layers.attention.triton_ops.decode_attention import LOG2E


@dataclass(frozen=True)
class ExtendConfig:
    block_m: int = 64  # query rows per program
    block_n: int = 64  # context tokens per loop step
    num_warps: int = 4
    num_stages: int = 2


def default_extend_config(head_dim: int, dtype: torch.dtype, device: str) -> ExtendConfig:
    if device != "cuda":
        return ExtendConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if head_dim > 128 or dtype == torch.float32:
        return ExtendConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if torch.cuda.get_device_capability()[0] >= 9:
        # best of a sweep on H100 (benchmarks/results/attention_h100.json): 128 rows, 4 warps
        return ExtendConfig(block_m=128, block_n=64, num_warps=4, num_stages=2)
    # SM 8.x (Jetson Orin, A100): 64 x 64 tiles keep registers and shared memory modest
    return ExtendConfig()


@triton.jit
def _extend_kernel(
    Q, Out, K_buf, V_buf, req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_start,
    qk_scale,  # softmax scale * log2(e)
    num_m_blocks,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kbs, stride_kbh, stride_vbs, stride_vbh, stride_r2t,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Q, Out [T, H, D] (new tokens of all requests, request after request); K_buf, V_buf [S, Hkv, D];
    req_to_token [R, L]; per request b: prefix_lens, extend_lens, extend_start (offset in T),
    req_pool_indices. Query j of request b sits at position prefix_len + j and attends positions
    0 .. prefix_len + j."""
    # the last query blocks see the most keys: launch them first
    m_block = num_m_blocks - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    extend_len = tl.load(extend_lens + b)
    m0 = m_block * BLOCK_M
    if m0 < extend_len:
        prefix_len = tl.load(prefix_lens + b)
        start = tl.load(extend_start + b).to(tl.int64)
        req = tl.load(req_pool_indices + b).to(tl.int64)
        kv_head = h // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < extend_len
        mask_d = offs_d < HEAD_DIM
        q = tl.load(Q + (start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        q_pos = prefix_len + offs_m
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        row = req_to_token + req * stride_r2t
        kv_end = prefix_len + tl.minimum(m0 + BLOCK_M, extend_len)
        for n0 in range(0, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < kv_end
            slots = tl.load(row + offs_n, mask=mask_n, other=0).to(tl.int64)
            mask_nd = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K_buf + slots[:, None] * stride_kbs + kv_head * stride_kbh + offs_d[None, :],
                        mask=mask_nd, other=0.0)
            qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            # position 0 is visible to every row, so m_new is finite from the first step on
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V_buf + slots[:, None] * stride_vbs + kv_head * stride_vbh + offs_d[None, :],
                        mask=mask_nd, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + (start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, o: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, prefix_lens: torch.Tensor,
                     extend_lens: torch.Tensor, extend_start: torch.Tensor, max_extend_len: int,
                     scaling: float, cfg: ExtendConfig) -> None:
    """q, o [T, H, D] (last dim contiguous); k_buf, v_buf [S, Hkv, D] holding every token's K/V
    (the new ones included); per-request tensors [B]; max_extend_len: the largest extend_len."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    batch = extend_lens.shape[0]
    if batch == 0 or max_extend_len == 0:
        return
    num_m_blocks = triton.cdiv(max_extend_len, cfg.block_m)
    _extend_kernel[(num_m_blocks, batch, num_heads)](
        q, o, k_buf, v_buf, req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_start,
        scaling * LOG2E, num_m_blocks,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1), req_to_token.stride(0),
        GROUP=num_heads // k_buf.shape[1], HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
