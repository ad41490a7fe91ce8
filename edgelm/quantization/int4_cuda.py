"""`cuda_w4`: a hand-written CUDA batch-1 int4 GEMV (bf16 or fp16 activations, groups of 128), compiled at run time.

Why CUDA here, beside the Triton `gemv_h2`: the two share the packed layout (int4_pack) and the per-word
arithmetic (int4_ptx._dot_pairs_asm: each nibble pair made BASE + q by one lop3, BASE taken off by one FMA, the x
pair multiplied in by another, a word's eight products summed in a 16-bit pair, then float32; fp16 with its
one-shift word), but
not the memory structure, which Triton does not let us write: here a program first copies the whole of x into
shared memory (padded so that the lanes' reads do not collide in banks) with each 128-input block's sum, then a
warp takes R rows, its lanes four words (16 bytes) of one block each, eight blocks a step, with the weights,
scales and offsets of the next S steps in flight in registers; the first S steps are loaded before the PDL wait
(they do not depend on the kernel before). Timed alone on the H100 (benchmarks/gpu/cuda_gemv_probe.py,
results/cuda_gemv_probe_h100.json, both without PDL) it took 7.2 / 5.5 / 24.9 µs on Llama-3.1-8B's qkv / o /
gate_up against gemv_h2's 8.9 / 7.3 / 27.5, and 16.4 against 15.7 on down_proj (whose K of 14336 makes each
program copy 28 KB of x).

Compiled with NVRTC through torch (torch.cuda._utils._nvrtc_compile: PTX for the GPU at hand), loaded and
launched through the CUDA driver API with ctypes (cuLaunchKernelEx, the programmatic-serialization attribute
where PDL is on), on torch's current stream, so CUDA graphs capture it. Where any of that is missing (an older
torch, fp32 activations, another group size, K not a multiple of 128 or too long for the static shared memory),
`gemv_w4` runs gemv_h2 instead: a dispatch entry naming `cuda_w4` is never an error.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import NamedTuple

import torch

from edgelm.quantization.int4_pack import Int4Weight

logger = logging.getLogger(__name__)

# x as padded 16-bit values (144 a block of 128) and one float sum a block, in static shared memory (48 KB)
MAX_K = 20480

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
#define NW %(nw)d
#define R %(r)d
#define S %(s)d
#define NBT %(nbt)d
#define KS %(ks)d
#define NB (NBT / KS)
#define NCH ((NB + 7) / 8)
#define NT (NW * 32)
#define XIT ((NCH * 128 + NT - 1) / NT)
#define SILU %(silu)d
#define ROPE %(rope)d
#define NORM %(norm)d
#define HAS_RES %(has_res)d
#define HALF %(half)d
#define QS %(qs)d
#define KVS %(kvs)d
#define SCALE_F16 %(f16)d
#define HAS_BIAS %(bias)d
#define PDL %(pdl)d
#define LATE %(late)d
#define XF16 %(xf16)d

__device__ __forceinline__ float bf16f(u32 h) { return __uint_as_float(h << 16); }

__device__ __forceinline__ float f16f(u32 h) {
  float f;
  asm("{ .reg .f16 t; mov.b16 t, %%1; cvt.f32.f16 %%0, t; }" : "=f"(f) : "h"((u16)h));
  return f;
}

// an activation (x, bias) as float: bf16, or fp16 where XF16
__device__ __forceinline__ float xf(u32 h) {
#if XF16
  return f16f(h);
#else
  return bf16f(h);
#endif
}

__device__ __forceinline__ float meta_f(u32 h) {
#if SCALE_F16
  return f16f(h);
#else
  return bf16f(h);
#endif
}

// float to the activations' 16-bit type, rounded to nearest even
__device__ __forceinline__ u16 to_x(float f) {
#if XF16
  u16 h;
  asm("{ .reg .f16 t; cvt.rn.f16.f32 t, %%1; mov.b16 %%0, t; }" : "=h"(h) : "f"(f));
  return h;
#else
  u32 u = __float_as_uint(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
#endif
}

// silu(g) * u of one activation pair each, rounded as the SiLU·mul kernel rounds (silu(g) to 16 bits first)
__device__ __forceinline__ u32 silu_mul1(u32 g, u32 u) {
  const float gf = xf(g);
  return to_x(xf(to_x(gf * (1.f / (1.f + __expf(-gf))))) * xf(u));
}

// a + b of two activation pairs, each rounded to 16 bits (the residual stream's add)
__device__ __forceinline__ u32 add2(u32 a, u32 b) {
  return to_x(xf(a & 0xFFFFu) + xf(b & 0xFFFFu)) | (to_x(xf(a >> 16) + xf(b >> 16)) << 16);
}

__device__ __forceinline__ float sq2(u32 a) {
  const float l = xf(a & 0xFFFFu), h = xf(a >> 16);
  return l * l + h * h;
}

// (a * rstd) * g of an activation pair and a norm weight pair, rounded as the RMSNorm kernel rounds it
__device__ __forceinline__ u32 norm2(u32 a, u32 g, float rstd) {
  return to_x(xf(a & 0xFFFFu) * rstd * xf(g & 0xFFFFu)) | (to_x(xf(a >> 16) * rstd * xf(g >> 16)) << 16);
}

__device__ __forceinline__ u32 silu_mul2(u32 g, u32 u) {
  return silu_mul1(g & 0xFFFFu, u & 0xFFFFu) | (silu_mul1(g >> 16, u >> 16) << 16);
}

// one nibble pair (bits 0-3 and 16-19 of w) times the x pair p, added to the bf16 pair acc
__device__ __forceinline__ u32 step(u32 acc, u32 w, u32 p) {
  u32 c;
  asm("lop3.b32 %%0, %%1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(c) : "r"(w));
  asm("fma.rn.bf16x2 %%0, %%1, %%2, %%3;" : "=r"(c) : "r"(c), "r"(0x3F803F80u), "r"(0xC300C300u));
  asm("fma.rn.bf16x2 %%0, %%1, %%2, %%3;" : "=r"(acc) : "r"(c), "r"(p), "r"(acc));
  return acc;
}

// fp16: nibbles j = 0, 2 shifted to bits 0-3 (1024 + q, minus 1024), j = 1, 3 taken where they lie, bits 4-7
// (1024 + 16q, times 1/16 minus 64): one shift a word (int4_ptx._dot_pairs_asm's fp16 one-shift form)
__device__ __forceinline__ u32 step16(u32 acc, u32 w, u32 p, bool up) {
  u32 c;
  if (up) {
    asm("lop3.b32 %%0, %%1, 0x00F000F0, 0x64006400, 0xEA;" : "=r"(c) : "r"(w));
    asm("fma.rn.f16x2 %%0, %%1, %%2, %%3;" : "=r"(c) : "r"(c), "r"(0x2C002C00u), "r"(0xD400D400u));
  } else {
    asm("lop3.b32 %%0, %%1, 0x000F000F, 0x64006400, 0xEA;" : "=r"(c) : "r"(w));
    asm("fma.rn.f16x2 %%0, %%1, %%2, %%3;" : "=r"(c) : "r"(c), "r"(0x3C003C00u), "r"(0xE400E400u));
  }
  asm("fma.rn.f16x2 %%0, %%1, %%2, %%3;" : "=r"(acc) : "r"(c), "r"(p), "r"(acc));
  return acc;
}

__device__ __forceinline__ float dot_word(u32 w, u32 p0, u32 p1, u32 p2, u32 p3) {
  u32 acc = 0;
#if XF16
  acc = step16(acc, w, p0, false);
  acc = step16(acc, w, p1, true);
  const u32 t = w >> 8;
  acc = step16(acc, t, p2, false);
  acc = step16(acc, t, p3, true);
  return f16f(acc & 0xFFFFu) + f16f(acc >> 16);
#else
  acc = step(acc, w, p0);
  acc = step(acc, w >> 4, p1);
  acc = step(acc, w >> 8, p2);
  acc = step(acc, w >> 12, p3);
  return __uint_as_float(acc << 16) + __uint_as_float(acc & 0xFFFF0000u);
#endif
}

extern "C" __global__ void __launch_bounds__(NW * 32) gemv_w4(
    const u16* __restrict__ x, const uint4* __restrict__ qw, const u16* __restrict__ sc,
    const u16* __restrict__ of, const u16* __restrict__ bias, u16* __restrict__ y, int N,
    float* __restrict__ part, unsigned* __restrict__ cnt, const long long* __restrict__ pos,
    const float* __restrict__ cs, u16* __restrict__ kbuf, u16* __restrict__ vbuf, const long long* __restrict__ slot,
    const u16* __restrict__ gamma, const u16* __restrict__ res, u16* __restrict__ res_out, float eps) {
  __shared__ __align__(16) u16 xs[NCH * 8 * 144];
  __shared__ float xsum[NCH * 8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#if ROPE
  // q | k | v, heads of 2 * HALF rows: a warp takes rows d and d + HALF of one head (R = 2), for the rotary
  const int pair = blockIdx.x * NW + warp, dd = pair %% HALF;
  const int row0 = (pair / HALF) * (2 * HALF) + dd;
#define ROW(r) (row0 + (r) * HALF)
#else
  const int row0 = (blockIdx.x * NW + warp) * R;
#define ROW(r) (row0 + (r))
#endif
  const int q4 = lane & 3;
  const size_t kb0 = (size_t)blockIdx.y * NB;  // this program's first block of 128 inputs (split K: KS programs a row)
  uint4 wb[S][R];
  u32 sb[S][R], ob[S][R];
  // the first S steps' weights, scales and offsets: before the wait (nothing an earlier kernel wrote)
#pragma unroll
  for (int s = 0; s < S; s++) {
#pragma unroll
    for (int r = 0; r < R; r++) {
      const int row = ROW(r), b = s * 8 + (lane >> 2);
      const bool ok = s < NCH && row < N && b < NB;
      wb[s][r] = ok ? __ldg(qw + (size_t)row * (NBT * 4) + kb0 * 4 + s * 32 + lane) : make_uint4(0, 0, 0, 0);
      sb[s][r] = ok ? __ldg(sc + (size_t)row * NBT + kb0 + b) : 0u;
      ob[s][r] = ok ? __ldg(of + (size_t)row * NBT + kb0 + b) : 0u;
    }
  }
#if NORM
  // the RMSNorm's weight (no earlier kernel writes it), before the wait as well
  uint4 gv[XIT];
#pragma unroll
  for (int i = 0; i < XIT; i++) {
    const int v = i * NT + threadIdx.x;
    gv[i] = v < NB * 16 ? __ldg((const uint4*)(gamma + v * 8)) : make_uint4(0, 0, 0, 0);
  }
#endif
#if PDL && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#if !LATE
  asm volatile("griddepcontrol.launch_dependents;");
#endif
#endif
  // x into shared memory, 16 values of padding after each block of 128 (lanes of one step read 4 blocks'
  // slices at once: 288-byte strides fall in different banks); each block's sum (for the offsets). All of a
  // thread's loads are issued before any is used (one L2 round trip, not one an iteration). SILU: x is gate | up
  // (2 * NBT * 128 values) and silu(gate) * up is what is stored.
  const u16* xk = x + kb0 * 128;
  uint4 xv[XIT];
#if SILU || (NORM && HAS_RES)
  uint4 uv[XIT];
#endif
#pragma unroll
  for (int i = 0; i < XIT; i++) {
    const int v = i * NT + threadIdx.x, b = v >> 4;
    const bool ok = v < NCH * 128 && b < NB;
    xv[i] = ok ? *(const uint4*)(xk + v * 8) : make_uint4(0, 0, 0, 0);
#if SILU
    uv[i] = ok ? *(const uint4*)(xk + NBT * 128 + v * 8) : make_uint4(0, 0, 0, 0);
#endif
#if NORM && HAS_RES
    uv[i] = ok ? *(const uint4*)(res + v * 8) : make_uint4(0, 0, 0, 0);
#endif
  }
#if NORM
  // NORM (no split K): x is the layer's input before its RMSNorm; HAS_RES: plus the residual stream, the sum
  // rounded and (by the first program) written to res_out; every program sums the squares of all of it
  float ssq = 0.f;
#pragma unroll
  for (int i = 0; i < XIT; i++) {
#if HAS_RES
    const int v = i * NT + threadIdx.x;
    xv[i] = make_uint4(add2(xv[i].x, uv[i].x), add2(xv[i].y, uv[i].y), add2(xv[i].z, uv[i].z), add2(xv[i].w, uv[i].w));
    if (blockIdx.x == 0 && v < NB * 16) *(uint4*)(res_out + v * 8) = xv[i];
#endif
    ssq += sq2(xv[i].x) + sq2(xv[i].y) + sq2(xv[i].z) + sq2(xv[i].w);
  }
  __shared__ float red[NW];
  ssq += __shfl_xor_sync(0xffffffffu, ssq, 16);
  ssq += __shfl_xor_sync(0xffffffffu, ssq, 8);
  ssq += __shfl_xor_sync(0xffffffffu, ssq, 4);
  ssq += __shfl_xor_sync(0xffffffffu, ssq, 2);
  ssq += __shfl_xor_sync(0xffffffffu, ssq, 1);
  if (lane == 0) red[warp] = ssq;
  __syncthreads();
  ssq = 0.f;
#pragma unroll
  for (int j = 0; j < NW; j++) ssq += red[j];
  const float rstd = rsqrtf(ssq / (float)(NBT * 128) + eps);
#pragma unroll
  for (int i = 0; i < XIT; i++)
    xv[i] = make_uint4(norm2(xv[i].x, gv[i].x, rstd), norm2(xv[i].y, gv[i].y, rstd), norm2(xv[i].z, gv[i].z, rstd),
                       norm2(xv[i].w, gv[i].w, rstd));
#endif
#pragma unroll
  for (int i = 0; i < XIT; i++) {
    const int v = i * NT + threadIdx.x, b = v >> 4;
    uint4 val = xv[i];
#if SILU
    val = make_uint4(silu_mul2(val.x, uv[i].x), silu_mul2(val.y, uv[i].y), silu_mul2(val.z, uv[i].z),
                     silu_mul2(val.w, uv[i].w));
#endif
    if (v < NCH * 128) *(uint4*)(xs + v * 8 + b * 16) = val;
    float sum = xf(val.x & 0xFFFFu) + xf(val.x >> 16) + xf(val.y & 0xFFFFu) + xf(val.y >> 16)
              + xf(val.z & 0xFFFFu) + xf(val.z >> 16) + xf(val.w & 0xFFFFu) + xf(val.w >> 16);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    sum += __shfl_xor_sync(0xffffffffu, sum, 4);
    sum += __shfl_xor_sync(0xffffffffu, sum, 8);
    if (v < NCH * 128 && (v & 15) == 0) xsum[b] = sum;
  }
  __syncthreads();
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; r++) acc[r] = 0.f;
#pragma unroll
  for (int c = 0; c < NCH; c++) {
    uint4 cur[R];
    u32 cs[R], co[R];
#pragma unroll
    for (int r = 0; r < R; r++) { cur[r] = wb[c %% S][r]; cs[r] = sb[c %% S][r]; co[r] = ob[c %% S][r]; }
    if (c + S < NCH) {
#pragma unroll
      for (int r = 0; r < R; r++) {
        const int row = ROW(r), b = (c + S) * 8 + (lane >> 2);
        const bool ok = row < N && b < NB;
        wb[c %% S][r] = ok ? __ldg(qw + (size_t)row * (NBT * 4) + kb0 * 4 + (c + S) * 32 + lane) : make_uint4(0, 0, 0, 0);
        sb[c %% S][r] = ok ? __ldg(sc + (size_t)row * NBT + kb0 + b) : 0u;
        ob[c %% S][r] = ok ? __ldg(of + (size_t)row * NBT + kb0 + b) : 0u;
      }
    }
    const int b = c * 8 + (lane >> 2);
    if (b < NB) {
      // words 4·q4 .. 4·q4 + 3 of block b: word i, nibble j takes x[128b + 16j + i] (j < 4, low half of the
      // pair) and x[128b + 64 + 16j + i] (nibble j + 4, high half)
      const u16* xb = xs + b * 144 + 4 * q4;
      u32 p[4][4];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const uint2 lo = *(const uint2*)(xb + 16 * j), hi = *(const uint2*)(xb + 64 + 16 * j);
        p[0][j] = __byte_perm(lo.x, hi.x, 0x5410);
        p[1][j] = __byte_perm(lo.x, hi.x, 0x7632);
        p[2][j] = __byte_perm(lo.y, hi.y, 0x5410);
        p[3][j] = __byte_perm(lo.y, hi.y, 0x7632);
      }
      const float xsb = q4 == 0 ? xsum[b] : 0.f;  // one lane of the four adds the block's offset term
#pragma unroll
      for (int r = 0; r < R; r++) {
        const float d = dot_word(cur[r].x, p[0][0], p[0][1], p[0][2], p[0][3])
                      + dot_word(cur[r].y, p[1][0], p[1][1], p[1][2], p[1][3])
                      + dot_word(cur[r].z, p[2][0], p[2][1], p[2][2], p[2][3])
                      + dot_word(cur[r].w, p[3][0], p[3][1], p[3][2], p[3][3]);
        acc[r] += meta_f(cs[r]) * d + meta_f(co[r]) * xsb;
      }
    }
  }
#if PDL && LATE && __CUDA_ARCH__ >= 900
  // LATE: the next kernel launches only once this program's loads are done, so that its programs do not
  // take SM slots while this kernel's own programs still wait to start
  asm volatile("griddepcontrol.launch_dependents;");
#endif
#pragma unroll
  for (int r = 0; r < R; r++) {
    float a = acc[r];
    a += __shfl_xor_sync(0xffffffffu, a, 16);
    a += __shfl_xor_sync(0xffffffffu, a, 8);
    a += __shfl_xor_sync(0xffffffffu, a, 4);
    a += __shfl_xor_sync(0xffffffffu, a, 2);
    a += __shfl_xor_sync(0xffffffffu, a, 1);
#if ROPE
#if HAS_BIAS
    if (ROW(r) < N) a += xf(bias[ROW(r)]);
#endif
    acc[r] = xf(to_x(a));  // rounded as the GEMV's output is before the rotary kernel reads it
#elif KS == 1
#if HAS_BIAS
    if (row0 + r < N) a += xf(bias[row0 + r]);
#endif
    if (lane == 0 && row0 + r < N) y[row0 + r] = to_x(a);
#else
    if (lane == 0 && row0 + r < N) part[blockIdx.y * N + row0 + r] = a;
#endif
  }
#if ROPE
  // the rotary of q and k at the token's position (cos | sin table, float32), q into y, k and v into the KV pool's
  // row of the token's slot, rounded as the rotary + KV-write kernel rounds them
  if (lane == 0 && row0 < N) {
    const long long p = pos[0];
    const float c = cs[p * (2 * HALF) + dd], sn = cs[p * (2 * HALF) + HALF + dd];
    const float x1 = acc[0], x2 = acc[1];
    const bool rot = row0 < QS + KVS;
    const u16 o1 = to_x(rot ? x1 * c - x2 * sn : x1), o2 = to_x(rot ? x2 * c + x1 * sn : x2);
    if (row0 < QS) {
      y[row0] = o1;
      y[row0 + HALF] = o2;
    } else {
      const long long kv = slot[0] * KVS + row0 - QS;
      if (rot) {
        kbuf[kv] = o1;
        kbuf[kv + HALF] = o2;
      } else {
        vbuf[kv - KVS] = o1;
        vbuf[kv - KVS + HALF] = o2;
      }
    }
  }
#endif
#if KS > 1
  // split K: each program leaves its rows' partial sums; the last of a row tile's KS programs to finish (a
  // counter a tile, set back to 0 by it) adds them in split order (the same sums every run) and writes y
  __shared__ unsigned last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(cnt + blockIdx.x, 1u) == KS - 1;
  __syncthreads();
  if (last) {
    __threadfence();
    for (int t = threadIdx.x; t < NW * R; t += NT) {
      const int row = blockIdx.x * NW * R + t;
      if (row < N) {
        float a = 0.f;
#pragma unroll
        for (int k = 0; k < KS; k++) a += __ldcg(part + (size_t)k * N + row);
#if HAS_BIAS
        a += xf(bias[row]);
#endif
        y[row] = to_x(a);
      }
    }
    if (threadIdx.x == 0) cnt[blockIdx.x] = 0u;
  }
#endif
}
"""


def source(k: int, config: tuple, f16_scales: bool, has_bias: bool, pdl_on: bool, f16_x: bool = False,
           silu: bool = False, rope: tuple[int, int, int] | None = None, norm: int = 0) -> str:
    """The kernel's CUDA source for inputs K (a multiple of 128) and config (R, S, warps[, LATE[, KS]]); activations
    fp16 where f16_x, else bf16; silu: x is gate ‖ up [2K] and the kernel multiplies by silu(gate) · up; rope
    (head_dim, q_size, kv_size; R = 2, no split K): W is q ‖ k ‖ v and the kernel ends with the rotary and the KV
    write (gemv_w4_rope); norm 1: x is a layer's input and the kernel applies its RMSNorm first, 2: to x plus the
    residual stream (written out as well; NormIn)."""
    r, s, nw = config[:3]
    half, qs, kvs = (rope[0] // 2, rope[1], rope[2]) if rope else (1, 0, 0)
    return SOURCE % {"nw": nw, "r": r, "s": s, "nbt": k // 128, "ks": splits(k, config), "f16": int(f16_scales),
                     "bias": int(has_bias), "pdl": int(pdl_on), "late": int(len(config) > 3 and bool(config[3])),
                     "xf16": int(f16_x), "silu": int(silu), "rope": int(rope is not None), "half": half, "qs": qs,
                     "kvs": kvs, "norm": int(norm > 0), "has_res": int(norm == 2)}


def splits(k: int, config: tuple) -> int:
    """The programs a row's K is split over: config[4] (1 if absent), down to the largest count dividing K's blocks
    of 128."""
    ks = max(1, int(config[4])) if len(config) > 4 else 1
    while (k // 128) % ks:
        ks -= 1
    return ks


class NormIn(NamedTuple):
    """A linear's input still to be normalised (batch 1): the RMSNorm's weight and eps, the residual stream to add
    first (None: none) and the tensor the sum goes to (the next residual stream)."""
    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None
    res_out: torch.Tensor | None


def takes_norm(config: tuple | None) -> bool:
    """Whether a linear dispatched to cuda_w4 with this config is handed its input before the RMSNorm (config[6]):
    it makes the norm (and the residual add) while it stages x, so that no RMSNorm kernel runs before it."""
    return config is not None and len(config) > 6 and bool(config[6])


def _norm_code(x: torch.Tensor, k: int, norm: NormIn | None) -> int | None:
    """0 (no norm), 1 (norm), 2 (residual add and norm) where the kernel takes it, None where it does not."""
    if norm is None:
        return 0
    w, r, o = norm.weight, norm.residual, norm.res_out
    if not (w.dtype == x.dtype and w.is_contiguous() and w.numel() == k and w.data_ptr() % 16 == 0):
        return None
    if r is None:
        return 1
    ok = all(t is not None and t.dtype == x.dtype and t.is_contiguous() and t.numel() == k and t.data_ptr() % 16 == 0
             for t in (r, o))
    return 2 if ok else None


def norm_runs(x: torch.Tensor, w: Int4Weight, norm: NormIn) -> bool:
    """Whether cuda_w4 itself can make this norm for this input (else gemv_w4 would do it apart)."""
    return supported(x, w) and _norm_code(x, w.in_features, norm) is not None


def apply_norm(x: torch.Tensor, norm: NormIn) -> torch.Tensor:
    """What the kernel's NORM staging computes, done apart (the add+RMSNorm kernel where it runs, else torch's
    reference), res_out written."""
    from edgelm.layers import triton_ops
    from edgelm.layers.layernorm import rms_norm_ref

    r = norm.residual
    if x.is_cuda and triton_ops.enabled("rmsnorm" if r is None else "add_rmsnorm"):
        from edgelm.layers.triton_ops.rmsnorm import rms_norm, supports

        if supports(x, norm.weight, r):
            if r is None:
                return rms_norm(x, norm.weight, norm.eps)
            out, s = rms_norm(x, norm.weight, norm.eps, r)
            norm.res_out.copy_(s)
            return out
    if r is None:
        return rms_norm_ref(x, norm.weight, norm.eps)
    s = x + r
    norm.res_out.copy_(s)
    return rms_norm_ref(s, norm.weight, norm.eps)


def takes_silu(config: tuple | None) -> bool:
    """Whether a down_proj dispatched to cuda_w4 with this config is handed gate ‖ up itself (config[5]), making
    silu(gate) · up while it stages x, so that no SiLU·mul kernel runs before it (LlamaMLP)."""
    return config is not None and len(config) > 5 and bool(config[5])


def supported(x: torch.Tensor, w: Int4Weight) -> bool:
    """Whether cuda_w4 runs this call (else gemv_w4 runs gemv_h2)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] == 1 and w.group_size == 128
            and x.data_ptr() % 16 == 0  # x is read 16 bytes at a time (a slice of another tensor may not be)
            and w.in_features % 128 == 0 and w.in_features <= MAX_K and w.scales.dtype in (torch.float16, torch.bfloat16)
            and w.qweight.is_contiguous() and w.scales.is_contiguous() and w.offsets.is_contiguous()
            and _toolchain() and torch.cuda.get_device_capability(x.device) >= (8, 0))


@functools.cache
def _toolchain() -> bool:
    """NVRTC through torch (2.8 and later) and the CUDA driver's cuLaunchKernelEx."""
    try:
        from torch.cuda._utils import _nvrtc_compile  # noqa: F401

        _driver().cuLaunchKernelEx  # noqa: B018
    except (ImportError, OSError, AttributeError):
        return False
    return True


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"cuda_w4: {what} failed with CUDA driver error {result}")


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_MODULES: list[ctypes.c_void_p] = []
_BROKEN: set[tuple] = set()  # kernels (_function's keys) that did not compile or load here


_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _scratch(device: torch.device, n: int, ks: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split K's partial sums (float32 [ks, n]) and row-tile counters (zero, and set back to zero by the kernel
    that used them). One pair a shape on a device, shared by all layers: their launches are ordered on the
    stream, and with PDL a kernel touches them only after its wait (every kernel before it has finished)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), n, ks, tiles)
    if key not in _SCRATCH:
        _SCRATCH[key] = (torch.empty(ks * n, dtype=torch.float32, device=device),
                         torch.zeros(tiles, dtype=torch.int32, device=device))
    return _SCRATCH[key]


@functools.cache
def _function(device_index: int, key: tuple) -> ctypes.c_void_p:
    """The compiled kernel of source(*key) on that device (compiled once a process: a few hundred milliseconds;
    later calls cost one lookup of the small key, not the source's formatting)."""
    src = source(*key)
    from torch.cuda._utils import _nvrtc_compile

    major, minor = torch.cuda.get_device_capability(device_index)
    with torch.cuda.device(device_index):
        ptx, name = _nvrtc_compile(src, "gemv_w4", f"{major}{minor}")
        module, func = ctypes.c_void_p(), ctypes.c_void_p()
        _check(_driver().cuModuleLoadData(ctypes.byref(module), ptx if isinstance(ptx, bytes) else ptx.encode()),
               "cuModuleLoadData")
        _check(_driver().cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "cuModuleGetFunction")
    _MODULES.append(module)  # never unloaded
    return func


def gemv_w4(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config=None, silu: bool = False,
            norm: NormIn | None = None) -> torch.Tensor:
    """x [1, K] → y [1, N] with the CUDA kernel; config (R rows a warp, S steps ahead, warps a program[, LATE 1:
    with PDL, the next kernel launched after this program's K loop instead of right after its wait[, KS: K split
    over that many programs a row, the last to finish adding the partial sums[, SILU: see takes_silu]]]).
    silu: x is gate ‖ up [1, 2K] and y = (silu(gate) · up) Wᵀ (+ bias). Calls it cannot take go to gemv_h2 with
    the config batch 1 would otherwise run (int4_kernels.m1_unswept), after torch's SiLU·mul where silu.
    norm: x is the layer's input before its RMSNorm (NormIn; not with silu or split K)."""
    config = tuple(config or (2, 2, 8))
    k = w.in_features
    func = None
    code = 0 if norm is None else _norm_code(x, k, norm) if not silu and splits(k, config) == 1 else None
    if x.shape[1] == (2 * k if silu else k) and code is not None:
        func = _kernel(x, w, bias, config, silu=silu, norm=code)
    if func is None:
        if norm is not None:
            x = apply_norm(x, norm)
        from edgelm.quantization.int4_kernels import m1_unswept
        from edgelm.quantization.int4_ptx import gemv_h2

        if silu:  # silu(gate) rounded to x's type before the product, as the SiLU·mul kernel does
            x = torch.nn.functional.silu(x[:, :k]) * x[:, k:]
        kernel, fallback = m1_unswept(w.out_features, w.in_features)  # (a loaded dispatch may name another kernel)
        return gemv_h2(x, w, bias, fallback if kernel == "gemv_h2" else None)
    y = torch.empty(1, w.out_features, dtype=x.dtype, device=x.device)
    _launch(func, x, w, bias, y, config, norm=norm)
    return y


def gemv_w4_rope(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config, rope,
                 norm: NormIn | None = None) -> torch.Tensor | None:
    """qkv_proj with the rotary and the KV write at its end (int4_fused.RopeStore rope: position, cos ‖ sin table,
    head_dim, q / kv widths, pool buffers, slot): q rotated [1, q_size], k and v written to the pool; or None where
    this kernel cannot take it (config with R ≠ 2 or split K, a layout or dtype it does not handle; the caller then
    runs the projection and the rotary apart). norm: as gemv_w4's."""
    config = tuple(config)
    n, k = w.out_features, w.in_features
    if (config[0] != 2 or splits(k, config) != 1 or x.shape[1] != k or rope.head_dim % 2
            or n != rope.q_size + 2 * rope.kv_size or rope.k_buf.dtype != x.dtype or rope.v_buf.dtype != x.dtype
            or not (rope.k_buf.is_contiguous() and rope.v_buf.is_contiguous())
            or rope.k_buf[0].numel() != rope.kv_size or rope.cos_sin.dtype != torch.float32
            or not rope.cos_sin.is_contiguous() or rope.cos_sin.shape[1] != rope.head_dim
            or rope.positions.dtype != torch.int64 or rope.slots.dtype != torch.int64):
        return None
    code = _norm_code(x, k, norm)
    func = None if code is None else _kernel(x, w, bias, config, rope=(rope.head_dim, rope.q_size, rope.kv_size),
                                             norm=code)
    if func is None:
        return None
    y = torch.empty(1, rope.q_size, dtype=x.dtype, device=x.device)
    _launch(func, x, w, bias, y, config, rope, norm)
    return y


def _kernel(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config: tuple, silu: bool = False,
            rope: tuple | None = None, norm: int = 0) -> ctypes.c_void_p | None:
    """The compiled kernel for this call, or None where cuda_w4 cannot run it (compile failures logged once)."""
    from edgelm.layers.triton_ops import pdl

    if not (supported(x, w) and (bias is None or bias.dtype == x.dtype)):
        return None
    pdl_on = pdl.mode(x.device, 1, small=False) != 0
    key = (w.in_features, config[:5], w.scales.dtype == torch.float16, bias is not None, pdl_on,
           x.dtype == torch.float16, silu, rope, norm)
    if key in _BROKEN:
        return None
    try:
        return _function(x.device.index if x.device.index is not None else torch.cuda.current_device(), key)
    except Exception as e:  # NVRTC or the driver refused it: gemv_h2 runs this config from now on
        _BROKEN.add(key)
        logger.warning("cuda_w4 %s unavailable (%s: %s); running gemv_h2 instead", config, type(e).__name__, e)
        return None


def _launch(func, x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, y: torch.Tensor, config: tuple,
            rope=None, norm: NormIn | None = None) -> None:
    from edgelm.layers.triton_ops import pdl

    r, _, nw = config[:3]
    n, k = w.out_features, w.in_features
    pdl_on = pdl.mode(x.device, 1, small=False) != 0
    tiles, ks = (n + nw * r - 1) // (nw * r), splits(k, config)
    part, cnt = _scratch(x.device, n, ks, tiles) if ks > 1 else (y, y)
    tensors = [x, w.qweight, w.scales, w.offsets, bias if bias is not None else x, y]
    rest = ([rope.positions, rope.cos_sin, rope.k_buf, rope.v_buf, rope.slots] if rope is not None else [y] * 5)
    if norm is not None:
        res = norm.residual if norm.residual is not None else y
        rest += [norm.weight, res, norm.res_out if norm.residual is not None else y]
    else:
        rest += [y] * 3
    args = ([ctypes.c_void_p(t.data_ptr()) for t in tensors] + [ctypes.c_int(n)]
            + [ctypes.c_void_p(t.data_ptr()) for t in [part, cnt] + rest]
            + [ctypes.c_float(norm.eps if norm is not None else 0.0)])
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(p), ctypes.c_void_p) for p in args])
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    cfg = _LaunchConfig(grid_x=tiles, grid_y=ks, grid_z=1, block_x=nw * 32, block_y=1, block_z=1,
                        shared_bytes=0, stream=torch.cuda.current_stream(x.device).cuda_stream,
                        attrs=ctypes.pointer(attr) if pdl_on else None, num_attrs=1 if pdl_on else 0)
    _check(_driver().cuLaunchKernelEx(ctypes.byref(cfg), func, params, None), "cuLaunchKernelEx")
