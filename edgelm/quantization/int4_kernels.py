"""edgelm's W4A16 kernels (Triton): y = x · dequant(W)ᵀ for the packed layout of int4_pack, and which
one runs for a given batch (DISPATCH, SHAPE_DISPATCH, `int4_linear`).

- M == 1, groups >= 128 (the default): int4_ptx's "gemv_h2" (packed 16-bit FMAs on the CUDA cores), or
  int4_cuda's "cuda_w4" (CUDA C through NVRTC, x in shared memory; Llama-3.1-8B's qkv_proj, gate_up_proj and
  down_proj in SHAPE_DISPATCH, gemv_h2 wherever it cannot run); also swept: int4_gemv's "gemv_xs" (x held in
  registers; lost on H100/H200).
- 1 < M <= MAX_M_DOT, groups >= 128: the tensor-core kernels of int4_tc ("tcw", "tc").
- M == 1, groups of 32/64: `_gemv_unit_kernel` here, CUDA-core FMAs on [rows, 128-input blocks,
  16 words] tiles (a code becomes the float 1 + q/16 by one shift and one and-or).
- 1 < M <= MAX_M_DOT, groups of 32/64: `_gemm_kernel`, dequantizes a [16, BLOCK_N] slice per nibble
  in registers and feeds the tensor cores (tl.dot, fp32 accumulate); split-K with fp32 atomics.
- larger M (prefill): `_dequant_kernel` writes the dense weight, then cuBLAS.
Launch configuration depends on shapes only (never on data): CUDA-graph capturable. No
Hopper-only features: runs on SM 8.0+ (Ampere, Jetson Orin SM 8.7, Ada, Hopper).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from edgelm.layers.triton_ops import xprep
from edgelm.quantization.int4_cuda import gemv_w4
from edgelm.quantization.int4_gemv import gemv_xs
from edgelm.quantization.int4_pack import WORDS_PER_BLOCK, Int4Weight
from edgelm.quantization.int4_ptx import gemv_h2, split_tiles
from edgelm.quantization.int4_tc import MAX_M_DOT, gemm_tc, gemm_tcw


@triton.jit
def _codes(packed, j: tl.constexpr):
    """Nibble j of each int32 as float32 (exact): bits 0x4B000000 | q are the float 2^23 + q."""
    bits = ((packed >> (4 * j)) & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, bias_ptr, y_ptr, M, N, K, KW, NG, stride_xm, stride_ym,
                 blocks_per_split, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """x [M, K] (fp16/bf16), qweight int32 [N, KW], scales/offsets fp16 [N, NG] → y [M, N].

    Each K step is one 128-input block: 16 words per row; nibble j is the 16 inputs 128·b + 16·j + i,
    dequantized to x's dtype as a [16, BLOCK_N] tile and multiplied on the tensor cores.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = tl.arange(0, 16)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(pid_k * blocks_per_split, (pid_k + 1) * blocks_per_split):
        w_idx = b * 16 + ri
        packed = tl.load(qw_ptr + rn[None, :] * KW + w_idx[:, None], mask=(w_idx < KW)[:, None] & n_ok[None, :],
                         other=0)
        for j in tl.static_range(8):
            if j % (8 if GROUP >= 128 else GROUP // 16) == 0:
                g = tl.zeros([BLOCK_N], dtype=tl.int32) + (b * 128 + 16 * j) // GROUP
                s = tl.load(s_ptr + rn * NG + g, mask=n_ok & (g < NG), other=0.0).to(tl.float32)
                m = tl.load(m_ptr + rn * NG + g, mask=n_ok & (g < NG), other=0.0).to(tl.float32)
            kj = b * 128 + 16 * j + ri
            xj = tl.load(x_ptr + rm[:, None] * stride_xm + kj[None, :], mask=m_ok[:, None] & (kj < K)[None, :],
                         other=0.0)
            w = (_codes(packed, j) * s[None, :] + m[None, :]).to(xj.dtype)  # [16, BLOCK_N]
            acc = tl.dot(xj, w, acc)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_off = rm[:, None] * stride_ym + rn[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_ok)
    else:
        tl.atomic_add(y_ptr + y_off, acc, mask=y_ok)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, m_ptr, w_ptr, N, K, KW, NG, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """qweight int32 [N, KW] → dense w [N, K] in w's dtype; one 128-input block per program column."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = tl.arange(0, 16)
    n_ok = rn < N
    packed = tl.load(qw_ptr + rn[:, None] * KW + (b * 16 + ri)[None, :], mask=n_ok[:, None], other=0)
    for j in tl.static_range(8):
        g = (b * 128 + 16 * j) // GROUP
        s = tl.load(s_ptr + rn * NG + g, mask=n_ok, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + rn * NG + g, mask=n_ok, other=0.0).to(tl.float32)
        kj = b * 128 + 16 * j + ri
        w = _codes(packed, j) * s[:, None] + m[:, None]
        tl.store(w_ptr + rn[:, None] * K + kj[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & (kj < K)[None, :])


@triton.jit
def _unit_codes_f32(packed, j: tl.constexpr):
    """Nibble j of each int32 as the float32 1 + q/16 (q moved to mantissa bits 19..22): one shift and
    one and-or, no conversion instruction. Summing x·(1 + q/16) keeps q's information 4 bits below
    the leading bit, far above fp32 rounding."""
    if j <= 4:
        moved = packed << (19 - 4 * j)
    else:
        moved = packed >> (4 * j - 19)
    return ((moved & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_unit_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, bias_ptr, y_ptr, N, K, KW, NG, blocks_per_split,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                      SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr):
    """x [K] (fp16/bf16), qweight int32 [N, KW], scales/offsets fp16 [N, NG] → y [N]; CUDA-core FMAs.

    The tile is [BLOCK_N rows, BLOCK_B 128-input blocks, 16 words]: words load 16 bytes at a time,
    and nibble j of the tile's words meets x[128·b + 16·j + i], a contiguous [BLOCK_B, 16] slice that
    every row of the tile reuses. With f = 1 + q/16 (see _unit_codes_f32), per group
    Σ x·(q·s + m) = 16s·Σ x·f + (m - 16s)·Σ x.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_B)
    ri = tl.arange(0, 16)
    n_ok = rn < N
    NPG: tl.constexpr = 8 if GROUP >= 128 else GROUP // 16
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(KW // 16, b_start + blocks_per_split)
    w_rows = qw_ptr + rn[:, None, None] * KW + ri[None, None, :]
    if PREFETCH:  # the next tile's words are loaded while this one is computed
        b = b_start + rb
        packed_next = tl.load(w_rows + (b * 16)[None, :, None], mask=n_ok[:, None, None] & (b < b_end)[None, :, None],
                              other=0)
    acc = tl.zeros([BLOCK_N, BLOCK_B, 16], dtype=tl.float32)
    for b0 in range(b_start, b_start + blocks_per_split, BLOCK_B):
        b = b0 + rb
        b_ok = b < b_end
        if PREFETCH:
            packed = packed_next
            bn = b + BLOCK_B
            packed_next = tl.load(w_rows + (bn * 16)[None, :, None],
                                  mask=n_ok[:, None, None] & (bn < b_end)[None, :, None], other=0)
        else:
            packed = tl.load(w_rows + (b * 16)[None, :, None], mask=n_ok[:, None, None] & b_ok[None, :, None],
                             other=0)
        p = tl.zeros([BLOCK_N, BLOCK_B, 16], dtype=tl.float32)
        xs = tl.zeros([BLOCK_B, 16], dtype=tl.float32)
        for j in tl.static_range(8):
            k = (b * 128 + 16 * j)[:, None] + ri[None, :]
            xj = tl.load(x_ptr + k, mask=(k < K) & b_ok[:, None], other=0.0).to(tl.float32)
            p += _unit_codes_f32(packed, j) * xj[None, :, :]
            xs += xj
            if (j + 1) % NPG == 0:
                g = (b * 128 + 16 * (j + 1 - NPG)) // GROUP
                sm_off = rn[:, None] * NG + g[None, :]
                sm_ok = n_ok[:, None] & b_ok[None, :]
                s16 = 16.0 * tl.load(s_ptr + sm_off, mask=sm_ok, other=0.0).to(tl.float32)
                m = tl.load(m_ptr + sm_off, mask=sm_ok, other=0.0).to(tl.float32)
                acc += p * s16[:, :, None] + (m - s16)[:, :, None] * xs[None, :, :]
                p = tl.zeros([BLOCK_N, BLOCK_B, 16], dtype=tl.float32)
                xs = tl.zeros([BLOCK_B, 16], dtype=tl.float32)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(y_ptr + rn, y, mask=n_ok)


# ---------------------------------------------------------------- launch configuration
# Fastest on the H100 of the 81 swept (benchmarks/results/int4_tune_h100.json; geometric mean over the
# Llama-3.1-8B shapes). gemv_unit: (BLOCK_N, BLOCK_B, SPLIT_K, num_warps, PREFETCH);
# gemm: (BLOCK_M, BLOCK_N, SPLIT_K, num_warps).
GEMV_UNIT_CONFIG = (8, 4, 1, 4, 1)
GEMM_CONFIG = (16, 64, 4, 4)
GEMM_CONFIG_M64 = (32, 64, 4, 4)


def gemm(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config=None) -> torch.Tensor:
    """x [M, K] (last dim contiguous) → y [M, N] on the tensor cores."""
    block_m, block_n, split_k, num_warps = config or GEMM_CONFIG
    m = x.shape[0]
    n, kw = w.qweight.shape
    split_k, blocks_per_split = split_tiles(kw // WORDS_PER_BLOCK, split_k)
    if split_k == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _gemm_kernel[grid](x, w.qweight, w.scales, w.offsets, bias if bias is not None else x, y, m, n,
                       w.in_features, kw, w.scales.shape[1], x.stride(0), y.stride(0), blocks_per_split,
                       GROUP=w.group_size, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k,
                       HAS_BIAS=bias is not None, num_warps=num_warps)
    return y if split_k == 1 else y.to(x.dtype)


def dequantize(w: Int4Weight, dtype: torch.dtype, block_n: int = 32) -> torch.Tensor:
    """The dense [N, K] weight in ``dtype`` (for prefill: then a cuBLAS GEMM)."""
    n, kw = w.qweight.shape
    out = torch.empty(n, w.in_features, dtype=dtype, device=w.qweight.device)
    grid = (triton.cdiv(n, block_n), kw // WORDS_PER_BLOCK)
    _dequant_kernel[grid](w.qweight, w.scales, w.offsets, out, n, w.in_features, kw, w.scales.shape[1],
                          GROUP=w.group_size, BLOCK_N=block_n)
    return out


def gemv_unit(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config=None) -> torch.Tensor:
    """x [1, K] → y [1, N]; config (BLOCK_N, BLOCK_B, SPLIT_K, num_warps, PREFETCH)."""
    block_n, block_b, split_k, num_warps, prefetch = config or GEMV_UNIT_CONFIG
    n, kw = w.qweight.shape
    blocks = kw // WORDS_PER_BLOCK
    split_k, per = split_tiles(-(-blocks // block_b), split_k)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device) if split_k == 1 else \
        torch.zeros(1, n, dtype=torch.float32, device=x.device)
    _gemv_unit_kernel[(triton.cdiv(n, block_n), split_k)](
        x, w.qweight, w.scales, w.offsets, bias if bias is not None else x, y, n, w.in_features, kw,
        w.scales.shape[1], per * block_b, GROUP=w.group_size, BLOCK_N=block_n, BLOCK_B=block_b,
        SPLIT_K=split_k, HAS_BIAS=bias is not None, PREFETCH=bool(prefetch), num_warps=num_warps)
    return y if split_k == 1 else y.to(x.dtype)


def dequant_matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config=None) -> torch.Tensor:
    """x [M, K] → y [M, N]: the dense weight, then cuBLAS."""
    return torch.nn.functional.linear(x, dequantize(w, x.dtype), bias)


KERNELS = {"gemv_unit": gemv_unit, "gemm": gemm, "dequant": dequant_matmul, "tc": gemm_tc, "tcw": gemm_tcw,
           "gemv_h2": gemv_h2, "gemv_xs": gemv_xs, "cuda_w4": gemv_w4}
# largest M of each bucket → (kernel, launch config); M above the last bucket: dequantize, then cuBLAS.
# The geometric-mean winners over the Llama-3.1-8B shapes of the H100 sweep of 2026-12-06
# (benchmarks/gpu/int4_bench.py --tune: benchmarks/results/int4_tune_h100.json); the H200 sweep of the
# same day (int4_tune_h200.json) picked the same kernels and configs, bar one per-shape config at M <= 16.
DISPATCH: dict[int, tuple[str, tuple]] = {
    1: ("gemv_h2", (8, 8, 1, 4)),
    16: ("tcw", (128, 8, 4)),
    MAX_M_DOT: ("tcw", (64, 4, 4)),
}
# (N, K) → buckets as in DISPATCH, for the shapes where the same sweep found another config faster
# than DISPATCH's by more than 2 % (per shape, single timings). Batch 1 (bucket 1): whole decode steps on
# the H100 (benchmarks/gpu/int4_variants.py). Round 1 (int4_variants_bs1_round1_h100.json): wider tiles
# for qkv_proj (6144, 4096), gate_up_proj and down_proj, 3.19 -> 2.77 ms a step although alone they timed
# no faster. Rounds 2-3 (int4_variants_bs1_round23_h100.json): o_proj (8, 16) and down_proj's next tile
# loaded ahead (config[4]), 2.72 -> 2.66 ms; wider tiles still (fewer SASS instructions a weight) all lost.
# Round 4 (int4_variants_bs1_round4_h100.json): o_proj's next tile ahead too, 2.66 -> 2.64 ms (twice).
# Round 5 (int4_variants_bs1_round5_h100.json): qkv_proj's first tile before the PDL wait (config[4] = 2),
# 2.61 -> 2.58 ms (twice); the same for gate_up and down was no faster or slower.
# Round 8 (int4_variants_bs1_round8_h100.json, 2026-12-07): down_proj with x loaded a tile ahead as well
# (config[4] = 3), 2525-2538 -> 2492-2494 us (three runs); the same for qkv / o / gate_up was even or slower.
# Qwen2.5-7B's shapes (round 11, int4_variants_bs1_round11_qwen2.5-7b_h100.json): the Llama-3.1-8B configs role by
# role, each faster than DISPATCH's default alone, together 2948-2962 -> 2446-2458 us a step (twice).
# Rounds 13-15 (int4_variants_bs1_round13_h100.json ... _round15_): the CUDA GEMV cuda_w4 (int4_cuda.py) on qkv_proj and,
# releasing the next kernel after its K loop, on gate_up_proj: together 2428 / 2428 us a step against 2482-2493 (round
# 15); where cuda_w4 cannot run (torch without NVRTC, ...) these shapes run gemv_h2 with their role's config
# (M1_BY_ROLE: the entries they had before). o_proj and down_proj were slower on it. With fp16 activations
# (ablations/cuda_w4_fp16/) gate_up_proj back on gemv_h2 took 2537 us a step against 2454-2462, qkv_proj even.
# Round 12 (int4_variants_bs1_round12_llama-3.2-3b_h100.json / _qwen2.5-1.5b_): shapes with no entry run their role's
# config (M1_BY_ROLE); DISPATCH's old default lost to it in every role but one (even); Llama-3.2-3B's down_proj with
# 4-row tiles 1555-1558 us against 1564-1570 for the role default (three runs, four baselines).
# Round 19 (ablations/cuda_w4_round19/): qkv_proj's cuda_w4 making the add+RMSNorm itself while it stages x (config[6])
# 2466-2469 us a step against 2495-2500 (three each); split K (config[4]) and down_proj's SiLU·mul staging (config[5])
# slower (2571 and 2801-2872).
# Round 23 (ablations/cuda_w4_round23/): gate_up_proj's cuda_w4 writing silu(gate)·up itself (config[7], GLU; LlamaMLP
# runs down_proj on it, no SiLU·mul launch) 2377-2384 us a step against 2444-2448 (three each); R 4 × 8 warps 2485.
# Rounds 25-28 (ablations/cuda_w4_round25/): cuda_w4's persistent form (config[8], programs an SM; warps stride over
# row groups, x staged once a program). down_proj with one row a warp, 8 warps, 2 programs an SM 2349.5 / 2368.6 /
# 2356.6 us a step against 2365.2 / 2384.7 / 2380.4 (round 27; gemv_h2 where cuda_w4 cannot run); on gate_up_proj
# (2498-3259, 2372 with 8 warps) and o_proj (2424-2459) it lost.
SHAPE_DISPATCH: dict[tuple[int, int], dict[int, tuple[str, tuple]]] = {
    (6144, 4096): {1: ("cuda_w4", (2, 2, 8, 0, 1, 0, 1))},
    (4096, 4096): {1: ("gemv_h2", (8, 16, 1, 4, 1)), 16: ("tc", (64, 8, 4))},
    (28672, 4096): {1: ("cuda_w4", (2, 4, 4, 1, 1, 0, 0, 1)), 16: ("tcw", (128, 1, 8)), MAX_M_DOT: ("tcw", (128, 1, 4))},
    (4096, 14336): {1: ("cuda_w4", (1, 7, 8, 1, 1, 0, 0, 0, 2)), MAX_M_DOT: ("tcw", (128, 8, 8))},
    (4608, 3584): {1: ("gemv_h2", (8, 16, 1, 4, 2))},  # Qwen2.5-7B: qkv, o, gate_up, down
    (3584, 3584): {1: ("gemv_h2", (8, 16, 1, 4, 1))},
    (37888, 3584): {1: ("gemv_h2", (16, 8, 1, 4))},
    (3584, 18944): {1: ("gemv_h2", (8, 16, 1, 4, 3))},
    (3072, 8192): {1: ("gemv_h2", (4, 16, 1, 4, 3))},  # Llama-3.2-3B's down_proj (round 12, below)
}


# Batch 1 on a shape no sweep has timed (none of SHAPE_DISPATCH's): the shipped Llama-3.1-8B config of the linear
# the shape looks like (m1_role). DISPATCH's default (8, 8, 1, 4) lost to these role by role on Qwen2.5-7B (round 11,
# before its shapes were added to SHAPE_DISPATCH). A dispatch file loaded with load_dispatch replaces this too.
M1_BY_ROLE: dict[str, tuple[str, tuple]] = {
    "qkv": ("gemv_h2", (8, 16, 1, 4, 2)),
    "o": ("gemv_h2", (8, 16, 1, 4, 1)),
    "gate_up": ("gemv_h2", (16, 8, 1, 4)),
    "down": ("gemv_h2", (8, 16, 1, 4, 3)),
}


def m1_role(n: int, k: int) -> str:
    """The decoder linear an (N, K) weight most likely is: fewer outputs than inputs, down_proj (or an o_proj whose
    heads are wider than the hidden size); square, o_proj; at least twice as many outputs, the fused gate_up_proj;
    a few more, the fused qkv_proj (grouped K/V heads)."""
    if k > n:
        return "down"
    if n == k:
        return "o"
    return "gate_up" if n >= 2 * k else "qkv"


def m1_unswept(n: int, k: int) -> tuple[str, tuple]:
    """Batch 1's (kernel, config) for an (N, K) weight of group size 128 that SHAPE_DISPATCH has no batch-1 entry
    for: its role's (M1_BY_ROLE), or DISPATCH's where a loaded dispatch file emptied that table."""
    default = DISPATCH.get(1, ("gemv_h2", None))
    return M1_BY_ROLE[m1_role(n, k)] if M1_BY_ROLE and default[0] == "gemv_h2" else default


def dispatch_json(dispatch: dict | None = None, shape_dispatch: dict | None = None) -> dict:
    """The "dispatch" and "dispatch_by_shape" tables (DISPATCH and SHAPE_DISPATCH unless given) as JSON
    values, in the format load_dispatch reads back."""
    dispatch = DISPATCH if dispatch is None else dispatch
    shape_dispatch = SHAPE_DISPATCH if shape_dispatch is None else shape_dispatch
    return {"dispatch": {str(m): [k, list(c) if c is not None else None] for m, (k, c) in dispatch.items()},
            "dispatch_by_shape": {f"{n}x{k}": {str(m): [kern, list(c) if c is not None else None]
                                               for m, (kern, c) in sorted(t.items())}
                                  for (n, k), t in shape_dispatch.items()}}


def load_dispatch(path: str) -> dict[int, tuple[str, tuple]]:
    """Replace DISPATCH (and SHAPE_DISPATCH) with the "dispatch" (and "dispatch_by_shape") tables of a
    tuning run's JSON (int4_bench.py --tune-out): how to use launch configs measured on this GPU
    (EDGELM_INT4_DISPATCH=path does it at import)."""
    import json

    with open(path) as f:
        tuned = json.load(f)

    def parse(table: dict) -> dict[int, tuple[str, tuple]]:
        out = {int(m): (kernel, tuple(config) if config is not None else None) for m, (kernel, config) in table.items()}
        for kernel, _ in out.values():
            if kernel not in KERNELS:
                raise ValueError(f"{path}: unknown int4 kernel {kernel!r}")
        return dict(sorted(out.items()))

    buckets = parse(tuned["dispatch"])
    shapes = {tuple(int(v) for v in shape.split("x")): parse(table)
              for shape, table in tuned.get("dispatch_by_shape", {}).items()}
    DISPATCH.clear()
    DISPATCH.update(buckets)
    SHAPE_DISPATCH.clear()  # the built-in per-shape picks were measured on another GPU
    SHAPE_DISPATCH.update(shapes)
    M1_BY_ROLE.clear()  # so were the role defaults: the file's own batch-1 bucket holds for its unswept shapes
    return DISPATCH


# groups of 32 or 64 inputs, where DISPATCH names "tc" or "tcw"
SMALL_GROUP_DISPATCH: dict[int, tuple[str, tuple]] = {
    1: ("gemv_unit", GEMV_UNIT_CONFIG),
    16: ("gemm", GEMM_CONFIG),
    MAX_M_DOT: ("gemm", GEMM_CONFIG_M64),
}


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · dequant(W)ᵀ (+ bias) for x [..., K] on a CUDA device; y [..., N] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:  # rows may be strided (gemm takes the row stride), elements not
        x2 = x2.contiguous()
    choice = choose_kernel(x2.shape[0], w) if x.dtype in (torch.float16, torch.bfloat16) else None
    if choice is None or choice[0] != "gemv_h2":
        xprep.take(x2)  # x prepared by its producer is for gemv_h2 only: never left for a later GEMV
    if choice is None:
        y = torch.nn.functional.linear(x2, dequantize(w, x.dtype), bias)
    else:
        y = KERNELS[choice[0]](x2, w, bias, choice[1])
    return y.view(*shape[:-1], w.out_features)


def choose_kernel(m: int, w: Int4Weight) -> tuple[str, tuple] | None:
    """(kernel, launch config) for m rows of x against w, or None: dequantize, then cuBLAS."""
    by_shape = SHAPE_DISPATCH.get((w.out_features, w.in_features), {})
    for m_max, choice in DISPATCH.items():
        if m <= m_max:
            kernel, config = by_shape.get(m_max, choice)
            if m_max == 1 and 1 not in by_shape:
                kernel, config = m1_unswept(w.out_features, w.in_features)
            if kernel in ("tc", "tcw", "gemv_h2", "gemv_xs", "cuda_w4") and w.group_size < 128:  # their scales are per 128-input block
                kernel, config = next(c for b, c in SMALL_GROUP_DISPATCH.items() if m <= b)
            return kernel, config
    return None


if os.environ.get("EDGELM_INT4_DISPATCH"):
    load_dispatch(os.environ["EDGELM_INT4_DISPATCH"])
