"""Decode attention over the token-paged KV pool, split along the context (flash-decoding).

Stage 1: one program per (request, group of q heads sharing one kv head, kv split) attends its
split of the context and writes a partial output with its log-sum-exp. Stage 2 merges the partials:
by default inside the same launch, in whichever split program of a (request, head group) finishes
last (an atomic counter per group says which; it resets the counter for the next step); otherwise
one program per (request, q head) of a second kernel. The grid's split count is fixed by the caller (so a CUDA
graph can replay it); each request's split length is derived on the device from its seq_len, so
short requests use few splits and idle programs exit at once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from edgelm.layers import triton_ops as switches
from edgelm.layers.triton_ops import l2_prefetch, pdl
from edgelm.layers.triton_ops.pdl import wait_and_release

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64  # context tokens per loop step
    num_warps: int = 4
    num_stages: int = 2
    min_split_len: int = 64  # a split covers at least this many tokens (a multiple of block_n)
    max_splits: int = 64
    programs_per_sm: int = 2  # aim for this many stage-1 programs per SM when choosing splits
    # the last split of each (request, head group) to finish merges all of them (an atomic counter
    # tells it that it is last): no second launch. False: the separate merge kernel (on CUDA unless
    # EDGELM_TRITON_OPS names attn_merge: the one launch measured slower on an H200, and on the H100 with its
    # heads merged in one load too: 2406-2410 us an int4 step against 2380, results/ablations/cuda_w4_round25/).
    merge_in_kernel: bool = False
    # the first block of each split's K/V loaded before the PDL wait (see _decode_partial_kernel), where
    # PDL is on (batch 1, SM 9.0+; other CUDA launches keep their load order). On the H100 it took the
    # Llama-3.1-8B batch-1 step from 5.61 / 5.60 to 5.49 / 5.49 ms in bf16 and 2.58 / 2.59 to 2.52 / 2.53 in
    # int4wo-128, off / on twice in one call (benchmarks/gpu/prefetch_kv_run.sh, results/ablations/prefetch_kv/)
    prefetch_kv: bool = True


def default_decode_config(head_dim: int, dtype: torch.dtype, device: str) -> DecodeConfig:
    """The measured default, with EDGELM_DECODE_CONFIG="field=value,..." applied on top (experiments)."""
    cfg = _default_decode_config(head_dim, dtype, device)
    override = os.environ.get("EDGELM_DECODE_CONFIG")
    if override:
        fields = {f.name: f.type for f in dataclasses.fields(DecodeConfig)}
        items = dict(item.split("=", 1) for item in override.split(",") if item.strip())
        unknown = set(items) - set(fields)
        if unknown:
            raise ValueError(f"EDGELM_DECODE_CONFIG: unknown field(s) {sorted(unknown)}; known: {sorted(fields)}")
        cfg = dataclasses.replace(cfg, **{k: (v.lower() in ("1", "true")) if fields[k] in ("bool", bool) else int(v)
                                          for k, v in items.items()})
    return cfg


def _default_decode_config(head_dim: int, dtype: torch.dtype, device: str) -> DecodeConfig:
    if device != "cuda":  # the interpreter: few, small steps; both merges tested there
        return DecodeConfig(block_n=16, num_warps=1, num_stages=1, min_split_len=16, max_splits=4,
                            merge_in_kernel=True)
    merge = switches.enabled("attn_merge")
    if head_dim > 128 or dtype == torch.float32:
        return DecodeConfig(block_n=32, min_split_len=64, merge_in_kernel=merge)
    return DecodeConfig(merge_in_kernel=merge)


def heads_per_program(group: int) -> int:
    """q heads one stage-1 program handles: the whole group, or the largest divisor <= 16."""
    if group <= 16:
        return group
    return max(d for d in range(1, 17) if group % d == 0)


def num_kv_splits(batch_size: int, num_heads: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                  cfg: DecodeConfig) -> int:
    """Splits enough to fill the GPU, but none shorter than cfg.min_split_len."""
    head_programs = num_heads // heads_per_program(num_heads // num_kv_heads)
    programs = max(1, batch_size * head_programs)
    want = triton.cdiv(cfg.programs_per_sm * num_sms, programs)
    by_len = triton.cdiv(max(max_seq_len, 1), cfg.min_split_len)
    return max(1, min(want, by_len, cfg.max_splits))


@triton.jit
def _split_len(seq_len, num_splits, MIN_SPLIT: tl.constexpr, ALIGN: tl.constexpr):
    n = tl.maximum(tl.cdiv(seq_len, num_splits), MIN_SPLIT)
    return tl.cdiv(n, ALIGN) * ALIGN


@triton.jit
def _kv_block(row, offs_n, load_mask, K_buf, V_buf, kv_head, offs_d, mask_d, stride_kbs, stride_kbh, stride_vbs,
              stride_vbh):
    """K and V [BLOCK_N, BLOCK_D] of context positions offs_n (rows where load_mask is off: zero),
    through the request's req_to_token row."""
    slots = tl.load(row + offs_n, mask=load_mask, other=0).to(tl.int64)
    mask_nd = load_mask[:, None] & mask_d[None, :]
    k = tl.load(K_buf + slots[:, None] * stride_kbs + kv_head * stride_kbh + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(V_buf + slots[:, None] * stride_vbs + kv_head * stride_vbh + offs_d[None, :], mask=mask_nd, other=0.0)
    return k, v


@triton.jit
def _scores(q, k, mask_n, m_i, l_i, qk_scale, PRECISION: tl.constexpr):
    """The online softmax's step for keys k (rows mask_n): the new max, the rescale of what came
    before, the block's weights p and the new normaliser."""
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
    qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _decode_partial_kernel(
    Q, K_buf, V_buf, req_to_token, req_pool_indices, seq_lens, Mid_O, Mid_LSE, Out, Counter,
    qk_scale,  # softmax scale * log2(e)
    num_splits,
    stride_qb, stride_qh, stride_kbs, stride_kbh, stride_vbs, stride_vbh, stride_r2t,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    PF0, PF0_N, PF1, PF1_N,
    GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    DIRECT: tl.constexpr, MERGE: tl.constexpr, MAX_SPLITS: tl.constexpr, PDL: tl.constexpr,
    PREFETCH_KV: tl.constexpr, L2PF: tl.constexpr = False, MERGE_HEADS: tl.constexpr = 1,
):
    """Q [B, H, D]; K_buf, V_buf [S, Hkv, D]; req_to_token [R, L]; Mid_O [B, H, splits, D] and
    Mid_LSE [B, H, splits] (float32, log2 domain) receive this split's normalised output.
    DIRECT (one split): write the final output to Out [B, H, D] instead.
    MERGE: Counter [B, programs along axis 1] int32, zero on entry and left zero; the last split
    program of each (request, head group) to arrive merges the splits into Out.
    PREFETCH_KV: the split's first block of K and V is loaded before the PDL wait, all but the newest
    token's (which the kernel before this one writes; loaded after the wait). Safe because seq_lens,
    req_pool_indices and req_to_token are written before the step's first layer and older K/V in
    earlier steps, and with PDL this kernel starts only after the GEMV before it passed its own wait.
    L2PF (batch 1, triton_ops "l2_prefetch"): first, each program prefetches into the L2 its share of the
    bytes PF0[:PF0_N] and PF1[:PF1_N] (the next GEMVs' weights)."""
    if L2PF:
        part = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
        parts = tl.num_programs(1) * tl.num_programs(2)
        l2_prefetch.prefetch_region(PF0, PF0_N, part, parts, 256)
        l2_prefetch.prefetch_region(PF1, PF1_N, part, parts, 256)
    b = tl.program_id(0)
    head0 = tl.program_id(1) * HEADS
    split = tl.program_id(2)
    kv_head = head0 // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    if not PREFETCH_KV:
        wait_and_release(PDL)
    seq_len = tl.load(seq_lens + b)
    split_len = _split_len(seq_len, num_splits, MIN_SPLIT, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    row = req_to_token + tl.load(req_pool_indices + b).to(tl.int64) * stride_r2t
    if PREFETCH_KV:
        offs_first = start + tl.arange(0, BLOCK_N)
        k0, v0 = _kv_block(row, offs_first, offs_first < tl.minimum(end, seq_len - 1), K_buf, V_buf, kv_head, offs_d,
                           mask_d, stride_kbs, stride_kbh, stride_vbs, stride_vbh)
        wait_and_release(PDL)
    if start < end:
        offs_h = tl.arange(0, BLOCK_H)
        mask_h = offs_h < HEADS
        heads = head0 + offs_h
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_h[:, None] & mask_d[None, :], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        first = start
        if PREFETCH_KV:  # the first block: the newest token's row (if it is here) joins the prefetched rows
            newest = offs_first == seq_len - 1
            k1, v1 = _kv_block(row, offs_first, newest, K_buf, V_buf, kv_head, offs_d, mask_d, stride_kbs, stride_kbh,
                               stride_vbs, stride_vbh)
            m_i, alpha, p, l_i = _scores(q, tl.where(newest[:, None], k1, k0), offs_first < end, m_i, l_i, qk_scale,
                                         PRECISION)
            v = tl.where(newest[:, None], v1, v0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
            first = start + BLOCK_N
        for n0 in range(first, end, BLOCK_N):  # V is loaded after the scores (fewer live registers)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            slots = tl.load(row + offs_n, mask=mask_n, other=0).to(tl.int64)
            mask_nd = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K_buf + slots[:, None] * stride_kbs + kv_head * stride_kbh + offs_d[None, :],
                        mask=mask_nd, other=0.0)
            m_i, alpha, p, l_i = _scores(q, k, mask_n, m_i, l_i, qk_scale, PRECISION)
            v = tl.load(V_buf + slots[:, None] * stride_vbs + kv_head * stride_vbh + offs_d[None, :],
                        mask=mask_nd, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        out = acc / l_i[:, None]
        mask_hd = mask_h[:, None] & mask_d[None, :]
        if DIRECT:
            tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=mask_hd)
        else:
            tl.store(Mid_O + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :],
                     out, mask=mask_hd)
            tl.store(Mid_LSE + b * stride_mlb + heads * stride_mlh + split, m_i + tl.log2(l_i), mask=mask_h)
            if MERGE:
                active = tl.cdiv(seq_len, split_len)
                counter = Counter + b * tl.num_programs(1) + tl.program_id(1)
                # acq_rel: this program's partials are visible before its arrival counts, and the
                # last one sees every other program's partials after it reads the count
                arrived = tl.atomic_add(counter, 1, sem="acq_rel")
                if arrived == active - 1:
                    offs_s = tl.arange(0, MAX_SPLITS)
                    mask_s = offs_s < active
                    # MERGE_HEADS heads' splits at a time in one load (every split of a head: no serial chain)
                    offs_mh = tl.arange(0, MERGE_HEADS)
                    for h0 in tl.static_range(0, HEADS, MERGE_HEADS):
                        hs = head0 + h0 + offs_mh
                        mask_mh = (h0 + offs_mh) < HEADS
                        mask_hs = mask_mh[:, None] & mask_s[None, :]
                        # .cg: read from L2, where the other SMs' writes are
                        lse = tl.load(Mid_LSE + b * stride_mlb + hs[:, None] * stride_mlh + offs_s[None, :],
                                      mask=mask_hs, other=float("-inf"), cache_modifier=".cg")
                        part = tl.load(Mid_O + b * stride_mob + hs[:, None, None] * stride_moh
                                       + offs_s[None, :, None] * stride_mos + offs_d[None, None, :],
                                       mask=mask_hs[:, :, None] & mask_d[None, None, :], other=0.0,
                                       cache_modifier=".cg")
                        w = tl.exp2(lse - tl.max(lse, 1)[:, None])
                        w = tl.where(mask_hs, w, 0.0)
                        merged = tl.sum(w[:, :, None] * part, 1) / tl.sum(w, 1)[:, None]
                        tl.store(Out + b * stride_ob + hs[:, None] * stride_oh + offs_d[None, :],
                                 merged.to(Out.dtype.element_ty), mask=mask_mh[:, None] & mask_d[None, :])
                    tl.atomic_xchg(counter, 0)


@triton.jit
def _decode_merge_kernel(
    Mid_O, Mid_LSE, Out, seq_lens, num_splits,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MIN_SPLIT: tl.constexpr, ALIGN: tl.constexpr,
    PDL: tl.constexpr, MAX_SPLITS: tl.constexpr,
):
    """Merge the non-empty splits of request b, head h: Out[b, h] = sum_s w_s * Mid_O[b, h, s], every split read in
    one load (MAX_SPLITS: a power of 2 >= the split count). On the H100 this and a loop over the splits took the
    same step time (results/ablations/cuda_w4_round25/int4_variants_bs1_round25_h100.json)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    wait_and_release(PDL)
    seq_len = tl.load(seq_lens + b)
    split_len = _split_len(seq_len, num_splits, MIN_SPLIT, ALIGN)
    active = tl.cdiv(seq_len, split_len)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_s = tl.arange(0, MAX_SPLITS)
    mask_s = offs_s < active
    lse = tl.load(Mid_LSE + b * stride_mlb + h * stride_mlh + offs_s, mask=mask_s, other=float("-inf"))
    part = tl.load(Mid_O + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
                   mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    w = tl.where(mask_s, tl.exp2(lse - tl.max(lse, 0)), 0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs keep full precision; half types ignore this
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, o: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     mid_o: torch.Tensor, mid_lse: torch.Tensor, scaling: float, cfg: DecodeConfig,
                     counters: torch.Tensor | None = None, prefetch=None) -> None:
    """q, o [B, H, D] (last dim contiguous); k_buf, v_buf [S, Hkv, D]; req_to_token [R, L];
    req_pool_indices, seq_lens [B]; mid_o [B, H, splits, D] and mid_lse [B, H, splits] float32
    scratch, whose split count sets the grid (one split: stage 1 writes o, no merge). counters:
    int32 zeros, at least decode_counters(B, H, Hkv) of them, for the in-kernel merge of
    cfg.merge_in_kernel (left zero); None: the separate merge kernel. prefetch: (tensor, bytes) regions pulled
    into the L2 by the kernel's programs (l2_prefetch; batch 1 on a CUDA GPU only). Writes o; no host
    synchronisation. Every request needs seq_len >= 1."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    splits = mid_o.shape[2]
    if batch == 0:
        return
    group = num_heads // num_kv_heads
    heads = heads_per_program(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    min_split = triton.cdiv(cfg.min_split_len, cfg.block_n) * cfg.block_n
    merge = splits > 1 and cfg.merge_in_kernel and counters is not None
    pdl_on = pdl.mode(q.device, batch)
    if merge and counters.numel() < decode_counters(batch, num_heads, num_kv_heads):
        raise ValueError("decode_attention: too few merge counters for this batch")
    l2pf = bool(prefetch) and batch == 1 and q.device.type == "cuda"
    max_splits = max(2, triton.next_power_of_2(splits))
    # the in-kernel merge's heads a load: at most 64 float32 partials a thread (cfg.num_warps warps)
    merge_heads = 1
    while (merge_heads < triton.next_power_of_2(heads)
           and 2 * merge_heads * max_splits * block_d <= 64 * 32 * cfg.num_warps):
        merge_heads *= 2
    _decode_partial_kernel[(batch, num_heads // heads, splits)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse, o,
        counters if merge else seq_lens, scaling * LOG2E, splits,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        o.stride(0), o.stride(1),
        *l2_prefetch.launch_args(prefetch if l2pf else None, q),
        GROUP=group, HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_N=cfg.block_n, MIN_SPLIT=min_split,
        PRECISION=_precision(q.dtype), DIRECT=splits == 1, MERGE=merge,
        MAX_SPLITS=max_splits, PDL=pdl_on, MERGE_HEADS=merge_heads,
        # without PDL (Ampere, Orin, batch > 1) a CUDA GPU keeps the load order (the prefetch untimed there);
        # the CPU interpreter (no PDL) runs the prefetch order, for the tests
        PREFETCH_KV=cfg.prefetch_kv and (bool(pdl_on) or q.device.type != "cuda"), L2PF=l2pf,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl.launch_kwargs(pdl_on),
    )
    if splits == 1 or merge:
        return
    _decode_merge_kernel[(batch, num_heads)](
        mid_o, mid_lse, o, seq_lens, splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        o.stride(0), o.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, MIN_SPLIT=min_split, ALIGN=cfg.block_n, PDL=pdl_on,
        MAX_SPLITS=max_splits, num_warps=max(1, min(8, max_splits * block_d // 1024)),  # ~32 partials a thread
        **pdl.launch_kwargs(pdl_on),
    )


def decode_counters(batch: int, num_heads: int, num_kv_heads: int) -> int:
    """How many int32 merge counters decode_attention needs for `batch` requests."""
    return batch * (num_heads // heads_per_program(num_heads // num_kv_heads))
