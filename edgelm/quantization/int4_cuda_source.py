"""The CUDA source of `cuda_w4` (int4_cuda.py), generated per shape and config: the batch-1 int4 GEMV with x staged in
shared memory, and its optional parts — split K with a last-program fixup, SiLU·mul or the residual add + RMSNorm
made while x is staged, the rotary + KV-write epilogue. int4_cuda compiles it with NVRTC and launches it."""

from __future__ import annotations

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
#define GLU %(glu)d
#define HAS_RES %(has_res)d
#define HALF %(half)d
#define QS %(qs)d
#define KVS %(kvs)d
#define SCALE_F16 %(f16)d
#define HAS_BIAS %(bias)d
#define PDL %(pdl)d
#define LATE %(late)d
#define XF16 %(xf16)d
#define PERSIST %(persist)d

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

__device__ __forceinline__ float warp_sum(float a) {
  a += __shfl_xor_sync(0xffffffffu, a, 16);
  a += __shfl_xor_sync(0xffffffffu, a, 8);
  a += __shfl_xor_sync(0xffffffffu, a, 4);
  a += __shfl_xor_sync(0xffffffffu, a, 2);
  a += __shfl_xor_sync(0xffffffffu, a, 1);
  return a;
}

// one step of a warp: block b's x pairs (from shared memory) times each of its R rows' four words (this lane's
// words 4·q4 .. 4·q4 + 3: word i, nibble j takes x[128b + 16j + i] (j < 4, low half of the pair) and
// x[128b + 64 + 16j + i] (nibble j + 4, high half)), scaled and offset, added to acc
__device__ __forceinline__ void dot_block(float (&acc)[R], const uint4 (&cur)[R], const u32 (&cs)[R],
                                          const u32 (&co)[R], const u16* xs, const float* xsum, int b, int q4) {
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
#elif GLU
  // gate ‖ up (N rows, N / 2 each): a warp takes R / 2 gate rows and the up rows N / 2 below them (R even)
#define GROW0(g) ((g) * (R / 2))
#define GROWS(g, r) ((r) < R / 2 ? GROW0(g) + (r) : GROW0(g) + (r) - R / 2 + N / 2)
#define GROUPS ((N / 2 + R / 2 - 1) / (R / 2))
#else
#define GROW0(g) ((g) * R)
#define GROWS(g, r) (GROW0(g) + (r))
#define GROUPS ((N + R - 1) / R)
#endif
#if !ROPE
  // PERSIST: the warps of all programs stride over the row groups (R rows each), x staged once a program
  int g = blockIdx.x * NW + warp;
  const int row0 = GROW0(g);
#define ROW(r) GROWS(g, r)
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
#if PERSIST
  // each warp streams its row groups' weights without a break: step c + S of the loop below is this group's chunk
  // c + S or the next group's chunk c + S - NCH (NCH a multiple of S, so the ring slot c %% S is the same)
  const int gstride = gridDim.x * NW;
  for (; g < GROUPS; g += gstride) {
    const int gn = g + gstride;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
#pragma unroll
    for (int c = 0; c < NCH; c++) {
      uint4 cur[R];
      u32 cs[R], co[R];
#pragma unroll
      for (int r = 0; r < R; r++) { cur[r] = wb[c %% S][r]; cs[r] = sb[c %% S][r]; co[r] = ob[c %% S][r]; }
      {
        const bool same = c + S < NCH;
        const int gg = same ? g : gn, cn = same ? c + S : c + S - NCH;
#pragma unroll
        for (int r = 0; r < R; r++) {
          const int row = GROWS(gg, r), b = cn * 8 + (lane >> 2);
          const bool ok = gg < GROUPS && row < N && b < NB;
          wb[c %% S][r] = ok ? __ldg(qw + (size_t)row * (NBT * 4) + cn * 32 + lane) : make_uint4(0, 0, 0, 0);
          sb[c %% S][r] = ok ? __ldg(sc + (size_t)row * NBT + b) : 0u;
          ob[c %% S][r] = ok ? __ldg(of + (size_t)row * NBT + b) : 0u;
        }
      }
      const int b = c * 8 + (lane >> 2);
      if (b < NB) dot_block(acc, cur, cs, co, xs, xsum, b, q4);
    }
    const int g0 = GROW0(g);
#pragma unroll
    for (int r = 0; r < R; r++) {
      float a = warp_sum(acc[r]);
#if HAS_BIAS
      if (GROWS(g, r) < N) a += xf(bias[GROWS(g, r)]);
#endif
      acc[r] = a;
    }
    if (lane == 0) {
#if GLU
#pragma unroll
      for (int r = 0; r < R / 2; r++)
        if (g0 + r < N / 2) y[g0 + r] = (u16)silu_mul1(to_x(acc[r]), to_x(acc[r + R / 2]));
#else
#pragma unroll
      for (int r = 0; r < R; r++)
        if (g0 + r < N) y[g0 + r] = to_x(acc[r]);
#endif
    }
  }
#if PDL && LATE && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
#else
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
    if (b < NB) dot_block(acc, cur, cs, co, xs, xsum, b, q4);
  }
#if PDL && LATE && __CUDA_ARCH__ >= 900
  // LATE: the next kernel launches only once this program's loads are done, so that its programs do not
  // take SM slots while this kernel's own programs still wait to start
  asm volatile("griddepcontrol.launch_dependents;");
#endif
#pragma unroll
  for (int r = 0; r < R; r++) {
    float a = warp_sum(acc[r]);
#if ROPE
#if HAS_BIAS
    if (ROW(r) < N) a += xf(bias[ROW(r)]);
#endif
    acc[r] = xf(to_x(a));  // rounded as the GEMV's output is before the rotary kernel reads it
#elif GLU
#if HAS_BIAS
    if (ROW(r) < N) a += xf(bias[ROW(r)]);
#endif
    acc[r] = a;
#elif KS == 1
#if HAS_BIAS
    if (row0 + r < N) a += xf(bias[row0 + r]);
#endif
    if (lane == 0 && row0 + r < N) y[row0 + r] = to_x(a);
#else
    if (lane == 0 && row0 + r < N) part[blockIdx.y * N + row0 + r] = a;
#endif
  }
#if GLU
  // silu(gate) · up of the warp's row pairs, each rounded as the GEMV's output is before the SiLU·mul kernel reads
  // it, and the product as that kernel rounds it
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R / 2; r++)
      if (row0 + r < N / 2) y[row0 + r] = (u16)silu_mul1(to_x(acc[r]), to_x(acc[r + R / 2]));
  }
#endif
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
#endif  // PERSIST
}
"""


def source(k: int, config: tuple, f16_scales: bool, has_bias: bool, pdl_on: bool, f16_x: bool = False,
           silu: bool = False, rope: tuple[int, int, int] | None = None, norm: int = 0, glu: bool = False,
           persist: bool = False) -> str:
    """The kernel's CUDA source for inputs K (a multiple of 128) and config (R, S, warps[, LATE[, KS]]); activations
    fp16 where f16_x, else bf16; silu: x is gate ‖ up [2K] and the kernel multiplies by silu(gate) · up; rope
    (head_dim, q_size, kv_size; R = 2, no split K): W is q ‖ k ‖ v and the kernel ends with the rotary and the KV
    write (gemv_w4_rope); norm 1: x is a layer's input and the kernel applies its RMSNorm first, 2: to x plus the
    residual stream (written out as well; NormIn); glu (R even, no split K or rope): W is gate ‖ up and the kernel
    writes silu(gate) · up [N / 2] (gemv_w4's glu); persist (persistent(k, config) > 0; no rope): a grid of
    fewer programs whose warps stride over the row groups, x staged once a program."""
    r, s, nw = config[:3]
    half, qs, kvs = (rope[0] // 2, rope[1], rope[2]) if rope else (1, 0, 0)
    return SOURCE % {"nw": nw, "r": r, "s": s, "nbt": k // 128, "ks": splits(k, config), "f16": int(f16_scales),
                     "bias": int(has_bias), "pdl": int(pdl_on), "late": int(len(config) > 3 and bool(config[3])),
                     "xf16": int(f16_x), "silu": int(silu), "rope": int(rope is not None), "half": half, "qs": qs,
                     "kvs": kvs, "norm": int(norm > 0), "has_res": int(norm == 2), "glu": int(glu),
                     "persist": int(persist)}


def splits(k: int, config: tuple) -> int:
    """The programs a row's K is split over: config[4] (1 if absent), down to the largest count dividing K's blocks
    of 128."""
    ks = max(1, int(config[4])) if len(config) > 4 else 1
    while (k // 128) % ks:
        ks -= 1
    return ks


def persistent(k: int, config: tuple) -> int:
    """Programs an SM of the persistent form (config[8]; 0: the one-tile-a-program form): it needs no split K and
    a chunk count (blocks of 1024 inputs) that is a multiple of S, so that a warp's weight ring runs on into its
    next row group."""
    p = int(config[8]) if len(config) > 8 else 0
    nch = (k // 128 + 7) // 8
    return p if p > 0 and splits(k, config) == 1 and config[1] <= nch and nch % config[1] == 0 else 0
