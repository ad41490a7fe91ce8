"""Skinny GEMM for decode-sized batches (M = 1..8): y = x Wᵀ (+ b), weight-bandwidth bound.

Two forms, chosen by `GemvConfig.use_dot`: a multiply-and-reduce over K (no tensor cores; best
suited to M = 1) and a tensor-core tile with M padded to 16. Each program owns BLOCK_N output
columns for all M rows and streams its BLOCK_N rows of W once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    use_dot: bool

    @property
    def name(self) -> str:
        form = "dot" if self.use_dot else "reduce"
        return f"{form}_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"


@triton.jit
def _skinny_gemm_kernel(x_ptr, x_stride, w_ptr, w_stride, b_ptr, out_ptr, out_stride, M, N, K,
                        HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """x [M, K]; w [N, K]; b [N]; out [M, N] (last dims contiguous), fp32 accumulation.
    Grid: (cdiv(N, BLOCK_N),)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * w_stride + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * x_stride + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + offs_k) < K
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if USE_DOT:
            if INTERPRET:  # Triton's CPU interpreter gets bf16 dots wrong: give it float32
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * out_stride + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig
                ) -> torch.Tensor:
    """x [..., K] with at most 8 rows; weight [N, K] contiguous; bias [N] or None → [..., N]."""
    shape, k = x.shape, x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = 16 if config.use_dot else max(triton.next_power_of_2(m), 1)
    grid = (triton.cdiv(n, config.block_n),)
    _skinny_gemm_kernel[grid](
        x2, x2.stride(0), weight, weight.stride(0), bias if bias is not None else weight, out, out.stride(0),
        m, n, k, HAS_BIAS=bias is not None, USE_DOT=config.use_dot, BLOCK_M=block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        INTERPRET=_INTERPRET, num_warps=config.num_warps, num_stages=config.num_stages)
    return out.view(*shape[:-1], n)


# the variants that benchmarks/gpu/decode_ops_bench.py compares with cuBLAS
CONFIGS = {c.name: c for c in (
    GemvConfig(16, 512, 4, 4, use_dot=False),
    GemvConfig(32, 256, 4, 4, use_dot=False),
    GemvConfig(8, 1024, 4, 3, use_dot=False),
    GemvConfig(16, 256, 4, 4, use_dot=True),
    GemvConfig(32, 256, 4, 4, use_dot=True),
    GemvConfig(64, 128, 4, 4, use_dot=True),
)}

MAX_M = 8
# Where a variant beat cuBLAS by 2 % or more (against the better of two cuBLAS runs; the spread was
# under 1 %) in benchmarks/results/decode_ops_h100.json, measured at M = 1, 2, 4, 8 (the dot form
# pads M to 16, so M = 3..8 run the same code). compute capability → (N, K) → ((largest M, config),
# ...), first match wins. GPUs not listed (Jetson Orin, SM 8.7, included) keep cuBLAS until measured.
WINS: dict[tuple[int, int], dict[tuple[int, int], tuple[tuple[int, str], ...]]] = {
    (9, 0): {  # H100 80GB HBM3, Llama-3.1-8B
        (6144, 4096): ((1, "reduce_n8_k1024_w4_s3"), (8, "dot_n64_k128_w4_s4")),  # qkv_proj
        (4096, 4096): ((1, "reduce_n8_k1024_w4_s3"), (8, "dot_n32_k256_w4_s4")),  # o_proj
        (28672, 4096): ((1, "reduce_n8_k1024_w4_s3"),),  # gate_up_proj: cuBLAS from M = 2
        (4096, 14336): ((1, "reduce_n8_k1024_w4_s3"), (8, "dot_n16_k256_w4_s4")),  # down_proj
        (128256, 4096): ((2, "reduce_n8_k1024_w4_s3"), (8, "dot_n16_k256_w4_s4")),  # lm_head
    },
}

_capability: dict[int | None, tuple[int, int]] = {}


def pick_config(x: torch.Tensor, weight: torch.Tensor) -> GemvConfig | None:
    """The measured winner for this GPU, weight shape and row count, or None (use cuBLAS)."""
    m = x.numel() // x.shape[-1]
    if not 0 < m <= MAX_M or weight.dim() != 2 or weight.stride(1) != 1:
        return None
    index = x.device.index
    if index not in _capability:
        _capability[index] = torch.cuda.get_device_capability(x.device)
    for max_m, name in WINS.get(_capability[index], {}).get(tuple(weight.shape), ()):
        if m <= max_m:
            return CONFIGS[name]
    return None
