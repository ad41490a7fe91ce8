"""Probe: would a hand-written CUDA batch-1 int4 GEMV beat gemv_h2 on this GPU?

The same packed layout (int4_pack) and the same per-word arithmetic as gemv_h2's bf16 form (int4_ptx._dot_pairs_asm:
nibble pairs as BASE + q, one FMA to subtract BASE, one to multiply the x pair, the word's eight products summed
in a bf16 pair, then float32), but another memory structure: the whole of x copied once a program into shared
memory (padded against bank conflicts) with each 128-input block's sum, a warp per R rows whose lanes each take four
words (16 bytes) of one block, eight blocks a step, and the weights (with their scales and offsets) S steps ahead
in registers, the first S steps' loads issued before the PDL wait. Compiled at run time with NVRTC
(torch.cuda._compile_kernel), one kernel per (K, R, S, warps).

Each config is checked against dequantize-then-matmul, then timed as int4_bench times kernels (one CUDA graph
over weight copies that defeat the L2) beside the shipped gemv_h2 config with PDL on and off (the probe's
launches carry no PDL attribute, so "off" is the like-for-like comparison).

    python benchmarks/gpu/cuda_gemv_probe.py --out $OUT/cuda_gemv_probe_h100.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from edgelm.bench_utils import result_header, write_json  # noqa: E402

SRC = r"""
typedef unsigned int u32;
typedef unsigned short u16;
#define NW %(nw)d
#define R %(r)d
#define S %(s)d
#define NB %(nb)d
#define NCH ((NB + 7) / 8)
#define DBG %(dbg)d
#define SCALE_F16 %(f16)d
#define XPAD(k) ((k) + ((k) >> 7) * 16)

__device__ __forceinline__ float bf16f(u32 h) { return __uint_as_float(h << 16); }

__device__ __forceinline__ float meta_f(u32 h) {  // a scale or offset: fp16 (SCALE_F16) or bf16
#if SCALE_F16
  float f;
  asm("{ .reg .f16 t; mov.b16 t, %%1; cvt.f32.f16 %%0, t; }" : "=f"(f) : "h"((u16)h));
  return f;
#else
  return bf16f(h);
#endif
}

__device__ __forceinline__ u16 f2bf(float f) {
  u32 u = __float_as_uint(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}

__device__ __forceinline__ u32 step(u32 acc, u32 w, u32 p) {
  u32 c;
  asm("lop3.b32 %%0, %%1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(c) : "r"(w));
  asm("fma.rn.bf16x2 %%0, %%1, %%2, %%3;" : "=r"(c) : "r"(c), "r"(0x3F803F80u), "r"(0xC300C300u));
  asm("fma.rn.bf16x2 %%0, %%1, %%2, %%3;" : "=r"(acc) : "r"(c), "r"(p), "r"(acc));
  return acc;
}

__device__ __forceinline__ float dot_word(u32 w, u32 p0, u32 p1, u32 p2, u32 p3) {
  u32 acc = 0;
  acc = step(acc, w, p0);
  acc = step(acc, w >> 4, p1);
  acc = step(acc, w >> 8, p2);
  acc = step(acc, w >> 12, p3);
  return __uint_as_float(acc << 16) + __uint_as_float(acc & 0xFFFF0000u);
}

extern "C" __global__ void __launch_bounds__(NW * 32) gemv_w4(
    const u16* __restrict__ x, const uint4* __restrict__ qw, const u16* __restrict__ sc,
    const u16* __restrict__ of, u16* __restrict__ y, int N, int G) {
  __shared__ __align__(16) u16 xs[NCH * 8 * 144];
  __shared__ float xsum[NCH * 8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * NW + warp) * R;
  const int q4 = lane & 3;
  uint4 wb[S][R];
  u32 sb[S][R], ob[S][R];
#pragma unroll
  for (int s = 0; s < S; s++) {
#pragma unroll
    for (int r = 0; r < R; r++) {
      const int row = row0 + r, b = s * 8 + (lane >> 2);
      const bool ok = s < NCH && row < N && b < NB;
      wb[s][r] = ok ? __ldg(qw + (size_t)row * (NB * 4) + s * 32 + lane) : make_uint4(0, 0, 0, 0);
      sb[s][r] = ok ? __ldg(sc + (size_t)row * G + b) : 0u;
      ob[s][r] = ok ? __ldg(of + (size_t)row * G + b) : 0u;
    }
  }
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  for (int base = 0; base < NCH * 128; base += NW * 32) {
    const int v = base + threadIdx.x, b = v >> 4;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (v < NCH * 128 && b < NB) val = *(const uint4*)(x + v * 8);
    if (v < NCH * 128) *(uint4*)(xs + XPAD(v * 8)) = val;
    float sum = bf16f(val.x & 0xFFFFu) + bf16f(val.x >> 16) + bf16f(val.y & 0xFFFFu) + bf16f(val.y >> 16)
              + bf16f(val.z & 0xFFFFu) + bf16f(val.z >> 16) + bf16f(val.w & 0xFFFFu) + bf16f(val.w >> 16);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    sum += __shfl_xor_sync(0xffffffffu, sum, 4);
    sum += __shfl_xor_sync(0xffffffffu, sum, 8);
    if (v < NCH * 128 && (v & 15) == 0) xsum[b] = sum;
  }
  __syncthreads();
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
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
        const int row = row0 + r, b = (c + S) * 8 + (lane >> 2);
        const bool ok = row < N && b < NB;
        wb[c %% S][r] = ok ? __ldg(qw + (size_t)row * (NB * 4) + (c + S) * 32 + lane) : make_uint4(0, 0, 0, 0);
        sb[c %% S][r] = ok ? __ldg(sc + (size_t)row * G + b) : 0u;
        ob[c %% S][r] = ok ? __ldg(of + (size_t)row * G + b) : 0u;
      }
    }
    const int b = c * 8 + (lane >> 2);
    if (b < NB) {
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
      const float xsb = q4 == 0 ? xsum[b] : 0.f;
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
#if DBG == 1
  if (lane == 0) { for (int r = 0; r < R; r++) if (row0 + r < N) y[row0 + r] = f2bf(1.0f + row0 + r); }
  return;
#elif DBG == 2
  if (lane == 0) { for (int r = 0; r < R; r++) if (row0 + r < N) y[row0 + r] = f2bf(xsum[(row0 + r) %% NB]); }
  return;
#elif DBG == 3
  if (lane == 0) { for (int r = 0; r < R; r++) if (row0 + r < N) y[row0 + r] = f2bf(acc[r]); }
  return;
#endif
#pragma unroll
  for (int r = 0; r < R; r++) {
    float a = acc[r];
    a += __shfl_xor_sync(0xffffffffu, a, 16);
    a += __shfl_xor_sync(0xffffffffu, a, 8);
    a += __shfl_xor_sync(0xffffffffu, a, 4);
    a += __shfl_xor_sync(0xffffffffu, a, 2);
    a += __shfl_xor_sync(0xffffffffu, a, 1);
    if (lane == 0 && row0 + r < N) y[row0 + r] = f2bf(a);
  }
}
"""

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}
CONFIGS = [(r, s, nw) for r in (1, 2, 4) for s in (2, 4) for nw in (4, 8)]


def compile_probe(k: int, r: int, s: int, nw: int, dbg: int = 0, f16_scales: bool = True):
    nb = k // 128
    return torch.cuda._compile_kernel(SRC % {"nw": nw, "r": r, "s": s, "nb": nb, "dbg": dbg, "f16": int(f16_scales)},
                                      "gemv_w4")


def debug() -> None:
    """A small case, printed: the kernel's output and three debug forms (DBG 1: 1 + row; 2: the block sums of x;
    3: lane 0's partial sum) beside the reference and gemv_h2."""
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization.int4_kernels import dequantize
    from edgelm.quantization.int4_pack import quantize_int4

    n, k = 16, 1024
    w = quantize_int4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, 128, "minmax",
                      meta_precision=torch.bfloat16)
    print("qweight", w.qweight.shape, w.qweight.stride(), w.qweight.dtype, "scales", w.scales.shape,
          w.scales.stride(), w.scales.dtype, w.offsets.dtype)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = (x.float() @ dequantize(w, torch.float32).t()).flatten()
    print("ref", ref[:4].tolist(), "gemv_h2", kern.gemv_h2(x, w, None, None).flatten()[:4].tolist())
    print("block sums", x.float().view(-1, 128).sum(-1)[:4].tolist())
    for dbg in (0, 1, 2, 3):
        y = torch.full((n,), -7.0, device="cuda", dtype=torch.bfloat16)
        launcher(compile_probe(k, 1, 2, 4, dbg, w.scales.dtype == torch.float16), n, 1, 4)(x, w, y)
        torch.cuda.synchronize()
        print("DBG", dbg, y[:4].tolist())


def launcher(kernel, n: int, r: int, nw: int):
    rows = nw * r

    def run(x, w, y):
        kernel(grid=((n + rows - 1) // rows, 1, 1), block=(nw * 32, 1, 1),
               args=[x, w.qweight, w.scales, w.offsets, y, n, w.scales.shape[1]])
        return y
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--configs", help="r,s,nw;... (default: all of CONFIGS)")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args()
    if args.debug:
        return debug()
    from int4_bench import int4_bytes, int4_copies, time_calls

    from edgelm.layers import triton_ops
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization.int4_kernels import dequantize

    configs = CONFIGS if not args.configs else [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    rows = []
    plain_ops = ",".join(sorted(triton_ops._enabled))
    for name, (n, k) in SHAPES.items():
        ws = int4_copies(n, k, 128)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = (x.float() @ dequantize(ws[0], torch.float32).t()).flatten()
        nbytes = int4_bytes(ws[0], 1)
        kernel, config = kern.choose_kernel(1, ws[0])
        if kernel != "gemv_h2":  # the shapes that ship cuda_w4: gemv_h2 with the config it runs there otherwise
            kernel, config = kern.m1_unswept(n, k)
        for pdl_on in (True, False):
            triton_ops.set_enabled(plain_ops if pdl_on else ",".join(o for o in triton_ops._enabled if o != "pdl"))
            try:
                t = time_calls([lambda w=w, c=config, x=x: kern.gemv_h2(x, w, None, c) for w in ws])
            finally:
                triton_ops.set_enabled(plain_ops)
            rows.append({"shape": name, "N": n, "K": k, "kernel": f"gemv_h2 {list(config)}", "pdl": pdl_on,
                         "us": round(t * 1e6, 2), "GBps": round(nbytes / t / 1e9, 1)})
            print(rows[-1], flush=True)
        for r, s, nw in configs:
            row = {"shape": name, "N": n, "K": k, "kernel": f"cuda R={r} S={s} warps={nw}", "pdl": False}
            try:
                run = launcher(compile_probe(k, r, s, nw, 0, ws[0].scales.dtype == torch.float16), n, r, nw)
                y = torch.empty(n, device="cuda", dtype=torch.bfloat16)
                err = ((run(x, ws[0], y).float() - ref).norm() / ref.norm()).item()
                row["rel_err"] = round(err, 5)
                if err < 1e-2:
                    t = time_calls([lambda w=w, y=y, x=x, run=run: run(x, w, y) for w in ws])
                    row.update(us=round(t * 1e6, 2), GBps=round(nbytes / t / 1e9, 1))
            except Exception as e:  # a config that does not compile or launch: say so, go on
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(row, flush=True)
        del ws
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, {**result_header("cuda_gemv_probe", "benchmarks/gpu/cuda_gemv_probe.py", sys.argv[1:]),
                              "rows": rows})


if __name__ == "__main__":
    main()
