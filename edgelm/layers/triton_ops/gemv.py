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

from edgelm.layers.triton_ops import pdl
from edgelm.layers.triton_ops.pdl import wait_and_release

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
def _load_w(w_ptrs, n_mask, k_mask, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
    return tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _chunk(acc, w, x_ptrs, k0, K, offs_k, m_mask, k_mask, norm_w_ptr, rstd, dtype: tl.constexpr,
           USE_DOT: tl.constexpr, INTERPRET: tl.constexpr, PROLOGUE: tl.constexpr):
    """acc += (the input's columns k0 .. k0 + BLOCK_K) · wᵀ, the prologue applied to the input."""
    x_mask = m_mask[:, None] & k_mask[None, :]
    if PROLOGUE == 2:
        gate = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptrs + K, mask=x_mask, other=0.0).to(tl.float32)
        x = ((gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up).to(dtype)
    else:
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    if PROLOGUE == 1:
        nw = tl.load(norm_w_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        x = ((x.to(tl.float32) * rstd[:, None]) * nw[None, :]).to(dtype)
    if USE_DOT:
        if INTERPRET:  # Triton's CPU interpreter gets bf16 dots wrong: give it float32
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _skinny_gemm_kernel(x_ptr, x_stride, w_ptr, w_stride, b_ptr, out_ptr, out_stride, M, N, K,
                        norm_w_ptr, ss_in_ptr, ss_in_count, ss_out_ptr, eps,
                        HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                        INTERPRET: tl.constexpr, PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr,
                        BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    """x [M, K]; w [N, K]; b [N]; out [M, N] (last dims contiguous), fp32 accumulation.
    Grid: (cdiv(N, BLOCK_N),).

    PROLOGUE 1 (RMSNorm): x is the residual stream; each row is normalised on the fly with
    rstd = rsqrt(sum(ss_in[m, :ss_in_count]) / K + eps) and weight norm_w, rounded to the model
    dtype as the RMSNorm kernel rounds it. PROLOGUE 2 (SiLU·mul): x [M, 2K] is gate ‖ up and the
    input is silu(gate) * up, rounded as the SiLU·mul kernel rounds it.
    RESIDUAL: out is the residual stream, updated in place: out = round(round(x Wᵀ + b) + out);
    each program also writes the sum of squares of its columns of the new row to
    ss_out[m, program] (the next PROLOGUE 1 consumes them: deterministic, no atomics).
    PDL (triton_ops.pdl): the first BLOCK_K columns of the weights load while the previous kernel
    finishes; everything else waits for it.
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    dtype = out_ptr.dtype.element_ty
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * w_stride + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * x_stride + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = 0
    if EVEN_K:
        first_mask = offs_k < BLOCK_K
    else:
        first_mask = offs_k < K
    if PDL:
        w_first = _load_w(w_ptrs, n_mask, first_mask, EVEN_K)
        wait_and_release(PDL)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == 1:
        offs_p = tl.arange(0, BLOCK_P)
        ss = tl.load(ss_in_ptr + offs_m[:, None] * ss_in_count + offs_p[None, :],
                     mask=m_mask[:, None] & (offs_p < ss_in_count)[None, :], other=0.0)
        rstd = tl.rsqrt(tl.sum(ss, axis=1) / K + eps)
    if PDL:
        acc = _chunk(acc, w_first, x_ptrs, 0, K, offs_k, m_mask, first_mask, norm_w_ptr, rstd, dtype,
                     USE_DOT, INTERPRET, PROLOGUE)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        if EVEN_K:
            k_mask = offs_k < BLOCK_K
        else:
            k_mask = (k0 + offs_k) < K
        w = _load_w(w_ptrs, n_mask, k_mask, EVEN_K)
        acc = _chunk(acc, w, x_ptrs, k0, K, offs_k, m_mask, k_mask, norm_w_ptr, rstd, dtype, USE_DOT, INTERPRET,
                     PROLOGUE)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * out_stride + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if RESIDUAL:
        res = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        new = (acc.to(dtype).to(tl.float32) + res).to(dtype)
        tl.store(out_ptrs, new, mask=out_mask)
        newf = tl.where(out_mask, new.to(tl.float32), 0.0)
        tl.store(ss_out_ptr + offs_m * tl.num_programs(0) + pid, tl.sum(newf * newf, axis=1), mask=m_mask)
    else:
        tl.store(out_ptrs, acc.to(dtype), mask=out_mask)


def _launch(x2, weight, bias, out, config, k, prologue=0, residual=False, norm_w=None, ss_in=None, ss_out=None,
            eps=0.0):
    m, n = x2.shape[0], weight.shape[0]
    block_m = 16 if config.use_dot else max(triton.next_power_of_2(m), 1)
    grid = (triton.cdiv(n, config.block_n),)
    ss_count = ss_in.shape[1] if ss_in is not None else 1
    pdl_on = pdl.mode(x2.device, m, small=False)
    _skinny_gemm_kernel[grid](
        x2, x2.stride(0), weight, weight.stride(0), bias if bias is not None else weight, out, out.stride(0),
        m, n, k, norm_w if norm_w is not None else weight, ss_in if ss_in is not None else weight, ss_count,
        ss_out if ss_out is not None else weight, eps,
        HAS_BIAS=bias is not None, USE_DOT=config.use_dot, BLOCK_M=block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        INTERPRET=_INTERPRET, PROLOGUE=prologue, RESIDUAL=residual,
        BLOCK_P=max(triton.next_power_of_2(ss_count), 2), PDL=pdl_on, num_warps=config.num_warps,
        num_stages=config.num_stages, **pdl.launch_kwargs(pdl_on))


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig
                ) -> torch.Tensor:
    """x [..., K] with at most 8 rows; weight [N, K] contiguous; bias [N] or None → [..., N]."""
    shape, k = x.shape, x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    _launch(x2, weight, bias, out, config, k)
    return out.view(*shape[:-1], weight.shape[0])


def gemm_add_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                      config: GemvConfig) -> torch.Tensor:
    """residual [M, N] += x Wᵀ (+ b), in place, each sum rounded as the add+RMSNorm kernel rounds
    it. Returns the sums of squares of the new residual rows in pieces, [M, programs] float32:
    the `ss` that `gemm_rmsnorm` normalises with."""
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    ss = torch.empty((x2.shape[0], triton.cdiv(weight.shape[0], config.block_n)), dtype=torch.float32,
                     device=x.device)
    _launch(x2, weight, bias, residual, config, x2.shape[-1], residual=True, ss_out=ss)
    return ss


def gemm_rmsnorm(residual: torch.Tensor, ss: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                 weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig) -> torch.Tensor:
    """RMSNorm(residual) Wᵀ (+ b), the norm applied as the rows stream in; `ss` from
    gemm_add_residual on the same residual. [M, K] → [M, N]."""
    out = torch.empty((residual.shape[0], weight.shape[0]), dtype=residual.dtype, device=residual.device)
    _launch(residual, weight, bias, out, config, residual.shape[-1], prologue=1, norm_w=norm_weight, ss_in=ss,
            eps=eps)
    return out


def gemm_silu_add_residual(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           residual: torch.Tensor, config: GemvConfig) -> torch.Tensor:
    """residual += (silu(gate) * up) Wᵀ (+ b) for gate_up [M, 2K], in place; returns the `ss`
    pieces as gemm_add_residual does."""
    ss = torch.empty((gate_up.shape[0], triton.cdiv(weight.shape[0], config.block_n)), dtype=torch.float32,
                     device=gate_up.device)
    _launch(gate_up, weight, bias, residual, config, weight.shape[1], prologue=2, residual=True, ss_out=ss)
    return ss


# the variants that benchmarks/gpu/decode_ops_bench.py compares with cuBLAS, and the M = 1 winners
# of benchmarks/gpu/decode_variants.py (whole decode steps, PDL on)
CONFIGS = {c.name: c for c in (
    GemvConfig(16, 512, 4, 4, use_dot=False),
    GemvConfig(32, 256, 4, 4, use_dot=False),
    GemvConfig(8, 1024, 4, 3, use_dot=False),
    GemvConfig(16, 256, 4, 4, use_dot=True),
    GemvConfig(32, 256, 4, 4, use_dot=True),
    GemvConfig(64, 128, 4, 4, use_dot=True),
    GemvConfig(4, 2048, 4, 3, use_dot=False),
    GemvConfig(4, 4096, 4, 1, use_dot=False),
    GemvConfig(2, 2048, 2, 3, use_dot=False),
    GemvConfig(4, 1024, 4, 4, use_dot=False),
)}

MAX_M = 8
# compute capability → (N, K) → ((largest M, config), ...), first match wins. GPUs not listed
# (Jetson Orin, SM 8.7, included) keep cuBLAS until measured.
# M >= 2: where a variant beat cuBLAS by 2 % or more (against the better of two cuBLAS runs; the
# spread was under 1 %) in benchmarks/results/decode_ops_h100.json, measured at M = 2, 4, 8 (the dot
# form pads M to 16, so M = 3..8 run the same code).
# M = 1: the configs with the shortest batch-1 decode step of Llama-3.1-8B on an H100 with PDL on,
# each shape varied on one loaded model (benchmarks/results/decode_variants_bs1_h100_round*.json):
# narrow tiles (2-4 rows, many programs) won once the next GEMV's programs start during the small
# kernels before it (triton_ops.pdl, batch 1 only): with reduce_n8_k1024_w4_s3 everywhere the step took
# 5920 us, with these (round 3's pick, there with 128-token attention steps, not shipped) 5587-5595 us
# (decode_variants recaptures the graphs per variant; bench_one_batch's first capture reads ~1 % slower).
WINS: dict[tuple[int, int], dict[tuple[int, int], tuple[tuple[int, str], ...]]] = {
    (9, 0): {  # H100 80GB HBM3, Llama-3.1-8B
        (6144, 4096): ((1, "reduce_n4_k2048_w4_s3"), (8, "dot_n64_k128_w4_s4")),  # qkv_proj
        (4096, 4096): ((1, "reduce_n4_k4096_w4_s1"), (8, "dot_n32_k256_w4_s4")),  # o_proj
        (28672, 4096): ((1, "reduce_n2_k2048_w2_s3"),),  # gate_up_proj: cuBLAS from M = 2
        (4096, 14336): ((1, "reduce_n4_k1024_w4_s4"), (8, "dot_n16_k256_w4_s4")),  # down_proj
        (128256, 4096): ((1, "reduce_n4_k2048_w4_s3"), (2, "reduce_n8_k1024_w4_s3"),
                         (8, "dot_n16_k256_w4_s4")),  # lm_head
    },
}

_capability: dict[int | None, tuple[int, int]] = {}


def pick_config(x: torch.Tensor, weight: torch.Tensor) -> GemvConfig | None:
    """The measured winner for this GPU, weight shape and row count, or None (use cuBLAS)."""
    return config_for(x.numel() // x.shape[-1], x.device, weight)


def config_for(m: int, device: torch.device, weight: torch.Tensor) -> GemvConfig | None:
    """pick_config for `m` rows on `device`."""
    if not 0 < m <= MAX_M or weight.dim() != 2 or weight.stride(1) != 1:
        return None
    index = device.index
    if index not in _capability:
        _capability[index] = torch.cuda.get_device_capability(device)
    for max_m, name in WINS.get(_capability[index], {}).get(tuple(weight.shape), ()):
        if m <= max_m:
            return CONFIGS[name]
    return None
