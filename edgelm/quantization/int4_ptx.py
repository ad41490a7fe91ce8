"""edgelm's batch-1 int4 GEMV fed by inline PTX (Triton; SM 8.0+): the packed-16-bit CUDA-core
`_gemv_h2_kernel`, for the packed layout of int4_pack (the tensor-core kernels: int4_tc), and the
store helpers both use.

Triton's CPU interpreter runs a plain-op twin of every PTX step (tests/test_int4.py), and
tests/test_kernel_compile.py compiles the PTX paths for SM 8.0, 8.7 and 9.0. int4_kernels dispatches.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from edgelm.layers import triton_ops
from edgelm.layers.triton_ops import pdl, xprep
from edgelm.layers.triton_ops.pdl import release_late, wait_and_release
from edgelm.layers.triton_ops.scratch import scratch
from edgelm.platform import sm_count
from edgelm.quantization.int4_pack import WORDS_PER_BLOCK, Int4Weight

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# how the PREP gemv_h2 loads its x pairs: _h2_tile_dot_prep's FORM (1 or 2); unset: 2 under triton_ops "int4_xprep"
# (every shape; form 2 measured faster than 1 on all but qkv), 1 under "int4_xprep_qkv" (qkv: 6.6 against 9.0 us)
PREP_FORM = int(os.environ.get("EDGELM_INT4_PREP_FORM", "0")) or None


@triton.jit
def _store_split(y_ptr, ws_ptr, cnt_ptr, tile, rm, rn, m_ok, n_ok, M, N, stride_ym, pid_n, pid_k,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write a [BLOCK_N, BLOCK_M] float32 tile of yᵀ. SPLIT_K > 1: the partial goes to ws[pid_k]
    ([SPLIT_K, M, N]); the N tile's last program to arrive (counter cnt[pid_n], left at zero) sums
    the partials in split order (the same sum every run) and writes y."""
    y_off = rm[None, :] * stride_ym + rn[:, None]
    y_ok = m_ok[None, :] & n_ok[:, None]
    if SPLIT_K == 1:
        tl.store(y_ptr + y_off, tile.to(y_ptr.dtype.element_ty), mask=y_ok)
    else:
        part = rm[None, :] * N + rn[:, None]
        tl.store(ws_ptr + pid_k * M * N + part, tile, mask=y_ok)
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for sk in range(SPLIT_K):
                total += tl.load(ws_ptr + sk * M * N + part, mask=y_ok, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + y_off, total.to(y_ptr.dtype.element_ty), mask=y_ok)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _store_row(y_ptr, ws_ptr, cnt_ptr, bias_ptr, out, rn, n_ok, N, pid_n, pid_k, SPLIT_K: tl.constexpr,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The one-row GEMVs' tail: float32 results [BLOCK_N] for rows rn, plus the bias (split 0 only),
    written through _store_split."""
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    rm = tl.arange(0, 1)
    _store_split(y_ptr, ws_ptr, cnt_ptr, out[:, None], rm, rn, rm < 1, n_ok, 1, N, N, pid_n, pid_k, SPLIT_K, 1,
                 BLOCK_N)


def _dot_pairs_asm(fp16: bool, fp16_one_shift: bool = True) -> str:
    """PTX for `_gemv_h2_kernel` (pack=1): word $1 and the four x pairs $2..$5 → $0, the float32 sum of
    the word's 8 products q·x. lop3 on the word shifted by 4j makes the codes of nibbles j and j + 4
    as a 16-bit pair (BASE + q), one FMA subtracts BASE (exact), one multiplies by the x pair
    (x[16j + i], x[64 + 16j + i]) and accumulates; the pair's halves are then added in float32.
    fp16 takes nibbles 1 and 3 where they lie (bits 4-7 of a half: BASE + 16q, scaled by 1/16 in the
    same FMA), so a word costs one shift instead of three (fp16_one_shift False: three, as bf16)."""
    kind, base, one, nbase = (("f16x2", "0x64006400", "0x3C003C00", "0xE400E400") if fp16 else
                              ("bf16x2", "0x43004300", "0x3F803F80", "0xC300C300"))
    lines = ["{", ".reg .b32 t, c, acc, one, nbase, r16, nb16;", ".reg .f32 lo, hi;", f"mov.b32 one, {one};",
             f"mov.b32 nbase, {nbase};", "mov.b32 acc, 0;"] + (
        ["mov.b32 r16, 0x2C002C00;", "mov.b32 nb16, 0xD400D400;"] if fp16 else [])  # fp16 1/16 and -64
    one_shift = fp16 and fp16_one_shift
    for j in range(4):
        up = one_shift and j % 2  # fp16: nibbles 1 and 3 taken at bits 4-7 (1024 + 16q), ·1/16 − 64 = q
        if j and (not one_shift or j == 2):  # bf16 (7 mantissa bits): every nibble shifted down to bits 0-3
            lines.append(f"shr.u32 t, $1, {4 * j};")
        lines += [f"lop3.b32 c, {'$1' if j < (2 if one_shift else 1) else 't'}, {'0x00F000F0' if up else '0x000F000F'}, "
                  f"{base}, 0xEA;", f"fma.rn.{kind} c, c, {'r16, nb16' if up else 'one, nbase'};",
                  f"fma.rn.{kind} acc, c, ${2 + j}, acc;"]
    if fp16:
        lines += ["{", ".reg .f16 a, b;", "mov.b32 {a, b}, acc;", "cvt.f32.f16 lo, a;", "cvt.f32.f16 hi, b;", "}"]
    else:  # a bf16 is the top half of the float32 it stands for
        lines += ["shl.b32 t, acc, 16;", "mov.b32 lo, t;", "and.b32 t, acc, 0xFFFF0000;", "mov.b32 hi, t;"]
    lines += ["add.f32 $0, lo, hi;", "}"]
    return "\n".join(lines)


# EDGELM_INT4_FP16_SHIFTS=3: fp16's word with three shifts (as bf16's), for A/B timings of the one-shift form
_DOT_PAIRS_FP16 = tl.constexpr(_dot_pairs_asm(True, os.environ.get("EDGELM_INT4_FP16_SHIFTS", "1") != "3"))
_DOT_PAIRS_BF16 = tl.constexpr(_dot_pairs_asm(False))
_PAIR_ASM = tl.constexpr("mov.b32 $0, {$1, $2};")


@triton.jit
def _x_raw(x_ptr, K, b):
    """The x a tile of blocks b ([BLOCK_B]) multiplies, as loaded: x[128·b + 16j + i] and x[128·b + 64 + 16j + i]
    for j = 0..3, eight [BLOCK_B, 16] tensors (lo_j, hi_j; 0 past K: blocks past the last one included)."""
    k0 = (b * 128)[:, None] + tl.arange(0, 16)[None, :]
    l0 = tl.load(x_ptr + k0, mask=k0 < K, other=0.0)
    h0 = tl.load(x_ptr + k0 + 64, mask=k0 + 64 < K, other=0.0)
    l1 = tl.load(x_ptr + k0 + 16, mask=k0 + 16 < K, other=0.0)
    h1 = tl.load(x_ptr + k0 + 80, mask=k0 + 80 < K, other=0.0)
    l2 = tl.load(x_ptr + k0 + 32, mask=k0 + 32 < K, other=0.0)
    h2 = tl.load(x_ptr + k0 + 96, mask=k0 + 96 < K, other=0.0)
    l3 = tl.load(x_ptr + k0 + 48, mask=k0 + 48 < K, other=0.0)
    h3 = tl.load(x_ptr + k0 + 112, mask=k0 + 112 < K, other=0.0)
    return l0, h0, l1, h1, l2, h2, l3, h3


@triton.jit
def _x_pair(lo, hi, k_lo, K, nw_ptr, rstd, BITS: tl.constexpr, NORM: tl.constexpr):
    """x[k_lo] and x[k_lo + 64] as loaded by _x_raw → the pair and its float32 sum. BITS: the pair as one
    int32 holding the two 16-bit values (for the PTX); else as two float32. NORM: RMSNorm applied,
    (x·rstd)·nw rounded back to 16 bits as the RMSNorm kernel rounds it."""
    if NORM:
        lo = ((lo.to(tl.float32) * rstd) * tl.load(nw_ptr + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)
              ).to(lo.dtype)
        hi = ((hi.to(tl.float32) * rstd) * tl.load(nw_ptr + k_lo + 64, mask=k_lo + 64 < K, other=0.0).to(tl.float32)
              ).to(hi.dtype)
    total = lo.to(tl.float32) + hi.to(tl.float32)
    if BITS:
        pair = tl.inline_asm_elementwise(_PAIR_ASM, "=r,h,h", [lo, hi], dtype=tl.int32, is_pure=True, pack=1)
    else:
        pair = tl.join(lo.to(tl.float32), hi.to(tl.float32))  # [.., 2]
    return pair, total


@triton.jit
def _word_dot(words, p0, p1, p2, p3, BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """Σ over each word's 8 nibbles of q·x in float32: words [R, B, 16] against the x pairs p_j of
    _x_pair ([B, 16] int32 with USE_ASM, else [B, 16, 2] float32)."""
    if USE_ASM:
        if BF16:
            total = tl.inline_asm_elementwise(_DOT_PAIRS_BF16, "=r,r,r,r,r,r", [words, p0[None, :, :], p1[None, :, :],
                                              p2[None, :, :], p3[None, :, :]], dtype=tl.float32, is_pure=True, pack=1)
        else:
            total = tl.inline_asm_elementwise(_DOT_PAIRS_FP16, "=r,r,r,r,r,r", [words, p0[None, :, :], p1[None, :, :],
                                              p2[None, :, :], p3[None, :, :]], dtype=tl.float32, is_pure=True, pack=1)
    else:
        total = (_nibble_pair_dot(words, 0, p0) + _nibble_pair_dot(words, 4, p1) + _nibble_pair_dot(words, 8, p2)
                 + _nibble_pair_dot(words, 12, p3))
    return total


@triton.jit
def _nibble_pair_dot(words, shift: tl.constexpr, pair):
    """The interpreter's path: q of the nibbles at bits shift and shift + 16 times x pair [B, 16, 2]."""
    lo, hi = tl.split(pair)
    return (((words >> shift) & 0xF).to(tl.float32) * lo[None, :, :]
            + ((words >> (shift + 16)) & 0xF).to(tl.float32) * hi[None, :, :])


def _dot_subnormal_asm() -> str:
    """PTX for the PREP form of `_gemv_h2_kernel` (pack=1): words $1, $2 (two of a block's 16) and their
    x pairs $3..$6, $7..$10 (triton_ops.xprep) → $0, the float32 sum of the 16 products q·x'·2^-24. A
    masked nibble is itself an fp16 subnormal (q·2^-24 at bits 0-3, 16q·2^-24 at bits 4-7; the odd pairs'
    x' carry the 1/16), so a pair costs one and plus one FMA (no code base to set and subtract), a word
    one shift; the 16-bit sums of both words share one accumulator pair (no overflow: the products are
    below 2^-4), converted to float32 once."""
    lines = ["{", ".reg .b32 t, c, acc;", ".reg .f16 a, b;", ".reg .f32 lo, hi;"]
    for w in range(2):
        for j in range(4):
            if j == 2:
                lines.append(f"shr.u32 t, ${1 + w}, 8;")
            lines.append(f"and.b32 c, {f'${1 + w}' if j < 2 else 't'}, {'0x00F000F0' if j % 2 else '0x000F000F'};")
            x = f"${3 + 4 * w + j}"
            lines.append(f"mul.rn.f16x2 acc, c, {x};" if w == j == 0 else f"fma.rn.f16x2 acc, c, {x}, acc;")
    lines += ["mov.b32 {a, b}, acc;", "cvt.f32.f16 lo, a;", "cvt.f32.f16 hi, b;", "add.f32 $0, lo, hi;", "}"]
    return "\n".join(lines)


_DOT_SUBNORMAL = tl.constexpr(_dot_subnormal_asm())


@triton.jit
def _halves(t):
    """[R, B, 16] → its even and odd words, [R, B, 8] each (neighbours in one thread's registers)."""
    return tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2] // 2, 2)))


@triton.jit
def _subnormal_pair_dot(words, shift: tl.constexpr, pair, f: tl.constexpr):
    """The interpreter's twin of one pair step of _dot_subnormal_asm: Σ q·x'·f·2^-24 over the two halves."""
    lo = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = ((pair >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (((words >> shift) & 0xF).to(tl.float32) * (lo * (f * 5.9604644775390625e-08))
            + ((words >> (shift + 16)) & 0xF).to(tl.float32) * (hi * (f * 5.9604644775390625e-08)))


@triton.jit
def _pair_halves(t, FORM: tl.constexpr):
    """The even and odd words' x pairs, to meet _halves(words): FORM 1, t in the words' shape [R, B, 16]
    → [R, B, 8] each; FORM 2, t [B, 16] → [1, B, 8] each."""
    if FORM == 1:
        lo, hi = _halves(t)
    else:
        lo, hi = tl.split(tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2)))
        lo, hi = lo[None, :, :], hi[None, :, :]
    return lo, hi


@triton.jit
def _h2_tile_dot_prep(xp_ptr, xs_ptr, xd_ptr, b, b_end, words, sc, off, USE_ASM: tl.constexpr, FORM: tl.constexpr):
    """_h2_tile_dot on prepared x (triton_ops.xprep): [BLOCK_N, BLOCK_B] s·Σ q·x + m·Σ x of each row's blocks b
    (sc, off float32).
    FORM 1: the pairs loaded in the words' own shape (every row's threads load them: no layout conversion
    through shared memory, but BLOCK_N times the loads); FORM 2: loaded once [BLOCK_B, 16] and broadcast
    to the rows (the plain form's way). Unmasked: xprep.buffers pads xp past the last block a tile reads."""
    b_ok = b < b_end
    if FORM == 1:
        q0 = (b * 64)[None, :, None] + tl.arange(0, 16)[None, None, :] + tl.zeros(words.shape, tl.int32)
    else:
        q0 = (b * 64)[:, None] + tl.arange(0, 16)[None, :]
    p0 = tl.load(xp_ptr + q0)
    p1 = tl.load(xp_ptr + q0 + 16)
    p2 = tl.load(xp_ptr + q0 + 32)
    p3 = tl.load(xp_ptr + q0 + 48)
    if USE_ASM:
        w0, w1 = _halves(words)
        a0, a1 = _pair_halves(p0, FORM)
        b0, b1 = _pair_halves(p1, FORM)
        c0, c1 = _pair_halves(p2, FORM)
        d0, d1 = _pair_halves(p3, FORM)
        qx = tl.inline_asm_elementwise(_DOT_SUBNORMAL, "=r" + ",r" * 10, [w0, w1, a0, b0, c0, d0, a1, b1, c1, d1],
                                       dtype=tl.float32, is_pure=True, pack=1)
    else:
        if FORM != 1:
            p0, p1, p2, p3 = p0[None, :, :], p1[None, :, :], p2[None, :, :], p3[None, :, :]
        qx = (_subnormal_pair_dot(words, 0, p0, 1.0) + _subnormal_pair_dot(words, 4, p1, 16.0)
              + _subnormal_pair_dot(words, 8, p2, 1.0) + _subnormal_pair_dot(words, 12, p3, 16.0))
    down = tl.load(xd_ptr + b, mask=b_ok, other=0.0)
    xsum = tl.load(xs_ptr + b, mask=b_ok, other=0.0)
    return sc * (tl.sum(qx, axis=2) * down[None, :]) + off * xsum[None, :]


@triton.jit
def _h2_tile(w_rows, s_ptr, m_ptr, rn, n_ok, NG, b, b_end, GROUP: tl.constexpr, META: tl.constexpr = 0):
    """The weights of blocks b ([BLOCK_B]) of rows rn: words [BLOCK_N, BLOCK_B, 16] and their scales
    and offsets [BLOCK_N, BLOCK_B] (zero past b_end). META (1: bf16, 2: fp16 bits): s_ptr is Int4Weight.meta,
    one int32 a group holding both, returned twice as loaded (_meta_f32 takes them apart where they are used:
    no 16-bit packing right after the load, which made the warps wait for it there)."""
    b_ok = b < b_end
    words = tl.load(w_rows + (b * 16)[None, :, None], mask=n_ok[:, None, None] & b_ok[None, :, None], other=0)
    g = (b * 128) // GROUP
    sm_ok = n_ok[:, None] & b_ok[None, :]
    if META:
        sc = tl.load(s_ptr + rn[:, None] * NG + g[None, :], mask=sm_ok, other=0)
        off = sc
    else:
        sc = tl.load(s_ptr + rn[:, None] * NG + g[None, :], mask=sm_ok, other=0.0)
        off = tl.load(m_ptr + rn[:, None] * NG + g[None, :], mask=sm_ok, other=0.0)
    return words, sc, off


@triton.jit
def _meta_f32(sc, off, META: tl.constexpr):
    """_h2_tile's scales and offsets as float32."""
    if META == 1:
        s = (sc << 16).to(tl.float32, bitcast=True)  # a bf16 is the top half of its float32
        m = (off & -65536).to(tl.float32, bitcast=True)
    elif META == 2:
        s = (sc & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        m = (off >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        s = sc.to(tl.float32)
        m = off.to(tl.float32)
    return s, m


@triton.jit
def _h2_tile_dot(x_ptr, K, b, b_end, words, sc, off, BF16: tl.constexpr, USE_ASM: tl.constexpr,
                 nw_ptr=None, rstd=None, NORM: tl.constexpr = False, xs_ptr=None, xd_ptr=None,
                 PREP: tl.constexpr = 0, META: tl.constexpr = 0):
    """[BLOCK_N, BLOCK_B]: s·Σ q·x + m·Σ x of each row's blocks b against x (RMSNorm(x) with NORM;
    PREP 1 or 2: x_ptr, xs_ptr, xd_ptr are triton_ops.xprep's xp, xs, xd, the pairs loaded in _h2_tile_dot_prep's
    FORM PREP)."""
    if PREP:
        s, m = _meta_f32(sc, off, META)
        out = _h2_tile_dot_prep(x_ptr, xs_ptr, xd_ptr, b, b_end, words, s, m, USE_ASM, PREP)
    else:
        l0, h0, l1, h1, l2, h2, l3, h3 = _x_raw(x_ptr, K, b)
        out = _h2_dot_x(l0, h0, l1, h1, l2, h2, l3, h3, K, b, b_end, words, sc, off, BF16, USE_ASM, nw_ptr, rstd, NORM,
                        META)
    return out


@triton.jit
def _h2_dot_x(l0, h0, l1, h1, l2, h2, l3, h3, K, b, b_end, words, sc, off, BF16: tl.constexpr, USE_ASM: tl.constexpr,
              nw_ptr, rstd, NORM: tl.constexpr, META: tl.constexpr = 0):
    """_h2_tile_dot's plain form on x already loaded (_x_raw of blocks b)."""
    k0 = (b * 128)[:, None] + tl.arange(0, 16)[None, :]  # [BLOCK_B, 16]: input 128·b + i, then + 16·j
    p0, x0 = _x_pair(l0, h0, k0, K, nw_ptr, rstd, USE_ASM, NORM)
    p1, x1 = _x_pair(l1, h1, k0 + 16, K, nw_ptr, rstd, USE_ASM, NORM)
    p2, x2 = _x_pair(l2, h2, k0 + 32, K, nw_ptr, rstd, USE_ASM, NORM)
    p3, x3 = _x_pair(l3, h3, k0 + 48, K, nw_ptr, rstd, USE_ASM, NORM)
    xsum = tl.sum(x0 + x1 + x2 + x3, axis=1)  # [BLOCK_B]: Σ x over each block
    qx = tl.sum(_word_dot(words, p0, p1, p2, p3, BF16, USE_ASM), axis=2)
    s, m = _meta_f32(sc, off, META)
    return s * qx + m * tl.where(b < b_end, xsum, 0.0)[None, :]


@triton.jit
def _row_rstd(x_ptr, K, eps):
    """1 / rms of the row x [K] (float32), as the RMSNorm kernel computes it."""
    offs = tl.arange(0, 1024)
    ss = tl.zeros([1024], dtype=tl.float32)
    for k0 in range(0, K, 1024):
        xk = tl.load(x_ptr + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        ss += xk * xk
    return tl.rsqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def _wait_then_rstd(x_ptr, K, eps, PDL: tl.constexpr, NORM: tl.constexpr):
    """The PDL wait (x is the previous kernel's output), then the 1/rms the NORM prologue scales x by."""
    wait_and_release(PDL)
    return _row_rstd(x_ptr, K, eps) if NORM else 1.0


@triton.jit
def _gemv_h2_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, KW, NG, blocks_per_split,
                    nw_ptr, eps, pos_ptr, cs_ptr, k_buf_ptr, v_buf_ptr, slot_ptr, q_size, kv_size, xs_ptr, xd_ptr,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SPLIT_K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BF16: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr,
                    PREFETCH: tl.constexpr, NORM: tl.constexpr = False, EPILOGUE: tl.constexpr = 0,
                    HALF: tl.constexpr = 1, PREP: tl.constexpr = 0, META: tl.constexpr = 0, STAGES: tl.constexpr = 1):
    """y [1, N] = x [1, K] · dequant(W)ᵀ on the CUDA cores in packed 16-bit arithmetic (GROUP >= 128).

    Tile [BLOCK_N rows, BLOCK_B blocks, 16 words]. Per word one inline-PTX call (_dot_pairs_asm) forms
    Σ q·x over its 8 nibbles with 16-bit-pair FMAs, about 2 instructions a weight; the 16 words of a
    block are summed in float32, then y += s·Σ q·x + m·Σ x per block.
    PREFETCH 1: each tile's weights are loaded one step ahead, the first tile before the PDL wait
    (weights never depend on the previous kernel): the stream of weight bytes starts while the
    previous kernel finishes, and twice the bytes are in flight per program (and twice the registers).
    PREFETCH 2: only the first tile is loaded before the wait; no more registers than without.
    STAGES > 1 (PREFETCH 0): Triton's software pipeline over the K loop, the weight tiles copied STAGES - 1
    steps ahead into shared memory (cp.async), not registers.
    PREFETCH 3 / 4: 1 / 2, and x one tile ahead too (its loads, L2 hits queued behind the weights', were
    where the warps stalled most: Nsight Compute, benchmarks/gpu/ncu_run.sh); with PREP, 1 / 2.
    PDL 3 (triton_ops.pdl): the next kernel may launch only once this program's loads are done.

    The fused batch-1 decoder layer (SPLIT_K 1; int4_fused, edgelm.models.llama): NORM: x is the
    residual stream and the input is RMSNorm(x) with weight nw: the row's 1/rms is computed right after
    the PDL wait (while the first weights load), then each x is normalised as it streams in, rounded as
    the RMSNorm kernel rounds it. EPILOGUE 1:
    y is the residual stream, updated in place: y = round(round(x Wᵀ + b) + y). EPILOGUE 2: W is
    gate ‖ up [2I, K]; a program's rows are I_0.. of gate and of up, interleaved, and it writes
    y [1, I] = silu(gate) · up, each rounded as the SiLU·mul kernel rounds it. EPILOGUE 3: W is
    q ‖ k ‖ v (heads of 2·HALF rows); a program's rows are pairs (d, d + HALF) of heads, and it writes
    the rotary (cos ‖ sin at position pos_ptr[0] of cs_ptr's [positions, 2·HALF] table) of q into
    y [1, q_size] and of k into the KV pool's row slot_ptr[0] of k_buf, v as it is into v_buf's
    (k_buf, v_buf [slots, kv_size]), rounded as the rotary + KV-write kernel rounds them.
    META (triton_ops "int4_meta_pairs"): s_ptr = m_ptr = Int4Weight.meta (_h2_tile).
    PREP (triton_ops "int4_xprep"): x_ptr, xs_ptr, xd_ptr are x prepared (triton_ops.xprep): already in
    fp16 pairs scaled per block, its block sums and scales; a word then costs ~12 instructions, not 18."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    r = tl.arange(0, BLOCK_N)
    if EPILOGUE == 2:  # row pairs (gate i, up i)
        out_n = pid_n * (BLOCK_N // 2) + r // 2
        n_ok = out_n < N // 2
        rn = out_n + (r % 2) * (N // 2)
    elif EPILOGUE == 3:  # row pairs (d, d + HALF) of a head
        pair = pid_n * (BLOCK_N // 2) + r // 2
        n_ok = pair < N // 2
        rn = (pair // HALF) * (2 * HALF) + pair % HALF + (r % 2) * HALF
    else:
        rn = pid_n * BLOCK_N + r
        n_ok = rn < N
    rb = tl.arange(0, BLOCK_B)
    ri = tl.arange(0, 16)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(KW // 16, b_start + blocks_per_split)
    w_rows = qw_ptr + rn[:, None, None] * KW + ri[None, None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    if PREFETCH >= 3 and PREP == 0:  # x one tile ahead as well
        words, sc, off = _h2_tile(w_rows, s_ptr, m_ptr, rn, n_ok, NG, b_start + rb, b_end, GROUP, META)
        rstd = _wait_then_rstd(x_ptr, K, eps, PDL, NORM)
        l0, h0, l1, h1, l2, h2, l3, h3 = _x_raw(x_ptr, K, b_start + rb)
        for b0 in range(b_start, b_start + blocks_per_split, BLOCK_B):
            b = b0 + rb
            if PREFETCH == 3:
                words_next, sc_next, off_next = _h2_tile(w_rows, s_ptr, m_ptr, rn, n_ok, NG, b + BLOCK_B, b_end, GROUP,
                                                         META)
            n0, m0, n1, m1, n2, m2, n3, m3 = _x_raw(x_ptr, K, b + BLOCK_B)
            acc += _h2_dot_x(l0, h0, l1, h1, l2, h2, l3, h3, K, b, b_end, words, sc, off, BF16, USE_ASM, nw_ptr, rstd,
                             NORM, META)
            l0, h0, l1, h1, l2, h2, l3, h3 = n0, m0, n1, m1, n2, m2, n3, m3
            if PREFETCH == 3:
                words, sc, off = words_next, sc_next, off_next
            else:
                words, sc, off = _h2_tile(w_rows, s_ptr, m_ptr, rn, n_ok, NG, b + BLOCK_B, b_end, GROUP, META)
    elif PREFETCH == 2 or PREFETCH == 4:
        words, sc, off = _h2_tile(w_rows, s_ptr, m_ptr, rn, n_ok, NG, b_start + rb, b_end, GROUP, META)
        rstd = _wait_then_rstd(x_ptr, K, eps, PDL, NORM)
        acc += _h2_tile_dot(x_ptr, K, b_start + rb, b_end, words, sc, off, BF16, USE_ASM, nw_ptr, rstd, NORM,
                            xs_ptr, xd_ptr, PREP, META)
        for b0 in range(b_start + BLOCK_B, b_start + blocks_per_split, BLOCK_B):
            b = b0 + rb
            words, sc, off = _h2_tile(w_rows, s_ptr, m_ptr, rn, n_ok, NG, b, b_end, GROUP, META)
            acc += _h2_tile_dot(x_ptr, K, b, b_end, words, sc, off, BF16, USE_ASM, nw_ptr, rstd, NORM,
                                xs_ptr, xd_ptr, PREP, META)
    elif PREFETCH == 1 or PREFETCH == 3:
        words, sc, off = _h2_tile(w_rows, s_ptr, m_ptr, rn, n_ok, NG, b_start + rb, b_end, GROUP, META)
        rstd = _wait_then_rstd(x_ptr, K, eps, PDL, NORM)  # triton_ops.pdl: launched while the previous kernel finishes
        for b0 in range(b_start, b_start + blocks_per_split, BLOCK_B):
            b = b0 + rb
            words_next, sc_next, off_next = _h2_tile(w_rows, s_ptr, m_ptr, rn, n_ok, NG, b + BLOCK_B, b_end, GROUP,
                                                     META)
            acc += _h2_tile_dot(x_ptr, K, b, b_end, words, sc, off, BF16, USE_ASM, nw_ptr, rstd, NORM,
                                xs_ptr, xd_ptr, PREP, META)
            words, sc, off = words_next, sc_next, off_next
    else:
        rstd = _wait_then_rstd(x_ptr, K, eps, PDL, NORM)
        for b0 in tl.range(b_start, b_start + blocks_per_split, BLOCK_B, num_stages=STAGES):
            b = b0 + rb
            words, sc, off = _h2_tile(w_rows, s_ptr, m_ptr, rn, n_ok, NG, b, b_end, GROUP, META)
            acc += _h2_tile_dot(x_ptr, K, b, b_end, words, sc, off, BF16, USE_ASM, nw_ptr, rstd, NORM,
                                xs_ptr, xd_ptr, PREP, META)
    release_late(PDL)
    out = tl.sum(acc, axis=1)
    if EPILOGUE == 0:
        _store_row(y_ptr, ws_ptr, cnt_ptr, bias_ptr, out, rn, n_ok, N, pid_n, pid_k, SPLIT_K, HAS_BIAS, BLOCK_N)
    else:
        dtype = y_ptr.dtype.element_ty
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        out = out.to(dtype).to(tl.float32)
        if EPILOGUE == 1:
            res = tl.load(y_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + rn, (out + res).to(dtype), mask=n_ok)
        elif EPILOGUE == 3:
            x1, x2 = tl.split(tl.reshape(out, (BLOCK_N // 2, 2)))
            pair = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            ok = pair < N // 2
            d = pair % HALF
            row = (pair // HALF) * (2 * HALF) + d  # x1's row; x2's is row + HALF
            pos = tl.load(pos_ptr).to(tl.int64)
            cos = tl.load(cs_ptr + pos * (2 * HALF) + d, mask=ok, other=0.0)
            sin = tl.load(cs_ptr + pos * (2 * HALF) + HALF + d, mask=ok, other=0.0)
            rot = row < q_size + kv_size  # q and k rotate, v does not
            o1 = tl.where(rot, x1 * cos - x2 * sin, x1).to(dtype)
            o2 = tl.where(rot, x2 * cos + x1 * sin, x2).to(dtype)
            is_q = ok & (row < q_size)
            tl.store(y_ptr + row, o1, mask=is_q)
            tl.store(y_ptr + row + HALF, o2, mask=is_q)
            kv = tl.load(slot_ptr).to(tl.int64) * kv_size + row - q_size
            is_k = ok & rot & (row >= q_size)
            tl.store(k_buf_ptr + kv, o1, mask=is_k)
            tl.store(k_buf_ptr + kv + HALF, o2, mask=is_k)
            is_v = ok & (row >= q_size + kv_size)
            tl.store(v_buf_ptr + kv - kv_size, o1, mask=is_v)
            tl.store(v_buf_ptr + kv - kv_size + HALF, o2, mask=is_v)
        else:
            gate, up = tl.split(tl.reshape(out, (BLOCK_N // 2, 2)))
            act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
            i = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(y_ptr + i, (act * up).to(dtype), mask=i < N // 2)


@triton.jit
def _gemv_h2_persistent_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, bias_ptr, y_ptr, N, K, KW, NG, tiles,
                               GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                               HAS_BIAS: tl.constexpr, BF16: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr):
    """_gemv_h2_kernel with as many programs as stay resident (the grid G): program p computes the row
    tiles p, p + G, ..., and loads each next tile's first block of weights before it stores the tile
    it has just summed (the first tile's before the PDL wait), so its loads do not pause between tiles
    and no program starts late. No split K."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    rb = tl.arange(0, BLOCK_B)
    ri = tl.arange(0, 16)
    blocks = KW // 16
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    words, sc, off = _h2_tile(qw_ptr + rn[:, None, None] * KW + ri[None, None, :], s_ptr, m_ptr, rn, rn < N, NG, rb,
                              blocks, GROUP)
    wait_and_release(PDL)
    for t in range(pid, tiles, grid):
        rn = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        w_rows = qw_ptr + rn[:, None, None] * KW + ri[None, None, :]
        acc = _h2_tile_dot(x_ptr, K, rb, blocks, words, sc, off, BF16, USE_ASM)
        for b0 in range(BLOCK_B, blocks, BLOCK_B):
            b = b0 + rb
            tile_words, tile_sc, tile_off = _h2_tile(w_rows, s_ptr, m_ptr, rn, n_ok, NG, b, blocks, GROUP)
            acc += _h2_tile_dot(x_ptr, K, b, blocks, tile_words, tile_sc, tile_off, BF16, USE_ASM)
        rn_next = (t + grid) * BLOCK_N + tl.arange(0, BLOCK_N)
        words, sc, off = _h2_tile(qw_ptr + rn_next[:, None, None] * KW + ri[None, None, :], s_ptr, m_ptr, rn_next,
                                  rn_next < N, NG, rb, blocks, GROUP)
        _store_row(y_ptr, y_ptr, y_ptr, bias_ptr, tl.sum(acc, axis=1), rn, n_ok, N, t, 0, 1, HAS_BIAS, BLOCK_N)
    release_late(PDL)


def split_tiles(total: int, split: int) -> tuple[int, int]:
    split = max(1, min(split, total))
    per = -(-total // split)
    return -(-total // per), per


class H2Launch(NamedTuple):
    """A gemv_h2 config (BLOCK_N, BLOCK_B, SPLIT_K, num_warps[, PREFETCH 0-4[, LATE[, PERSIST[, STAGES]]]]) resolved
    for a weight and device: the split K actually run, the 128-input blocks a split covers, the PDL mode."""
    block_n: int
    block_b: int
    split_k: int
    blocks_per_split: int
    num_warps: int
    prefetch: int
    persist: int
    pdl: int
    stages: int = 1


def h2_launch(config, w: Int4Weight, device: torch.device) -> H2Launch:
    block_n, block_b, split_k, num_warps, *rest = config or (8, 4, 1, 4)
    split_k, per = split_tiles(-(-(w.qweight.shape[1] // WORDS_PER_BLOCK) // block_b), split_k)
    pdl_on = pdl.mode(device, 1, small=False)
    if len(rest) > 1 and rest[1] and pdl_on == 1:  # LATE: PDL 3
        pdl_on = 3
    return H2Launch(block_n, block_b, split_k, per * block_b, num_warps, int(rest[0]) if rest else 0,
                    int(rest[2]) if len(rest) > 2 else 0, pdl_on, int(rest[3]) if len(rest) > 3 else 1)


def meta_args(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A gemv_h2 launch's s_ptr, m_ptr and META: Int4Weight.meta where it is set and triton_ops "int4_meta_pairs"
    is on, else the scales and offsets."""
    if w.meta is not None and triton_ops.enabled("int4_meta_pairs"):
        return w.meta, w.meta, 1 if w.scales.dtype == torch.bfloat16 else 2
    return w.scales, w.offsets, 0


def gemv_h2(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config=None) -> torch.Tensor:
    """x [1, K] → y [1, N] with _gemv_h2_kernel; config (BLOCK_N, BLOCK_B, SPLIT_K, num_warps[, PREFETCH 0-4
    [, LATE[, PERSIST[, STAGES]]]]): LATE 1, where PDL is on, lets the next kernel launch only after this one's
    loads (PDL 3); PERSIST p > 0 (SPLIT_K 1 only) runs _gemv_h2_persistent_kernel on p programs an SM; STAGES
    (PREFETCH 0): the K loop software-pipelined that deep (weights through shared memory)."""
    n, kw = w.qweight.shape
    if x.shape[0] != 1 or w.group_size < 128 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("gemv_h2: needs one row, group size >= 128 and fp16/bf16 activations")
    block_n, block_b, split_k, per_split, num_warps, prefetch, persist, pdl_on, stages = h2_launch(config, w, x.device)
    tiles = triton.cdiv(n, block_n)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    ws = scratch(x.device, "int4", torch.float32, split_k * n) if split_k > 1 else y
    cnt = scratch(x.device, "int4", torch.int32, tiles) if split_k > 1 else y
    if persist and split_k == 1:
        # (the interpreter: 2 "SMs", several tiles a program)
        _gemv_h2_persistent_kernel[(min(tiles, persist * (sm_count(x.device) if x.is_cuda else 2)),)](
            x, w.qweight, w.scales, w.offsets, bias if bias is not None else x, y, n, w.in_features, kw,
            w.scales.shape[1], tiles, GROUP=w.group_size, BLOCK_N=block_n, BLOCK_B=block_b, HAS_BIAS=bias is not None,
            BF16=x.dtype == torch.bfloat16, USE_ASM=not _INTERPRET, PDL=pdl_on, num_warps=num_warps,
            **pdl.launch_kwargs(pdl_on))
        return y
    bufs = xprep.for_gemv(x)
    prep = (PREP_FORM or (2 if triton_ops.enabled("int4_xprep") else 1)) if bufs else 0
    xp, xs, xd = bufs or (x, y, y)
    s_arg, m_arg, meta = meta_args(w)
    _gemv_h2_kernel[(tiles, split_k)](
        xp, w.qweight, s_arg, m_arg, bias if bias is not None else x, y, ws, cnt, n, w.in_features, kw,
        w.scales.shape[1], per_split, x, 0.0, x, x, x, x, x, 0, 0, xs, xd, GROUP=w.group_size, BLOCK_N=block_n,
        BLOCK_B=block_b, SPLIT_K=split_k, HAS_BIAS=bias is not None, BF16=x.dtype == torch.bfloat16, USE_ASM=not _INTERPRET,
        PDL=pdl_on, PREFETCH=prefetch, PREP=prep, META=meta, STAGES=stages, num_warps=num_warps,
        **pdl.launch_kwargs(pdl_on))
    return y
