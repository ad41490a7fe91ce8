"""edgelm's int4 tensor-core kernel `_tc_kernel` ("tc", "tcw"; Triton, inline PTX, SM 8.0+) for
1 < M <= MAX_M_DOT, on the packed layout of int4_pack.

The PTX turns packed words into 16-bit values with ~1 integer instruction per weight (prmt pairs
halves of two words, lop3 masks a nibble and sets the exponent bits of 128 or 1024); Triton's CPU
interpreter runs a plain-op twin of every PTX step (tests/test_int4.py), and
tests/test_kernel_compile.py compiles the PTX paths for SM 8.0, 8.7 and 9.0. int4_kernels dispatches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgelm.layers.triton_ops import pdl
from edgelm.layers.triton_ops.pdl import wait_and_release
from edgelm.layers.triton_ops.scratch import scratch
from edgelm.quantization.int4_pack import WORDS_PER_BLOCK, Int4Weight
from edgelm.quantization.int4_ptx import _INTERPRET, _store_split, split_tiles

MAX_M_DOT = 64
TC_CONFIG = (16, 1, 4)  # (BLOCK_N, SPLIT_K, num_warps) when a caller names none


@triton.jit
def _nibbles_plain(words, scale, offset, BF16: tl.constexpr):
    """The interpreter's path: nibble j of each word as q·scale + offset in float32, rounded to 16 bits."""
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    return (((words & 0xF).to(tl.float32) * scale + offset).to(dt),
            (((words >> 4) & 0xF).to(tl.float32) * scale + offset).to(dt),
            (((words >> 8) & 0xF).to(tl.float32) * scale + offset).to(dt),
            (((words >> 12) & 0xF).to(tl.float32) * scale + offset).to(dt),
            (((words >> 16) & 0xF).to(tl.float32) * scale + offset).to(dt),
            (((words >> 20) & 0xF).to(tl.float32) * scale + offset).to(dt),
            (((words >> 24) & 0xF).to(tl.float32) * scale + offset).to(dt),
            (((words >> 28) & 0xF).to(tl.float32) * scale + offset).to(dt))


@triton.jit
def _input_order(o0, o1, o2, o3, o4, o5, o6, o7):
    """Nibble tiles [R, 16] (tile j: nibble j of word i at column i) → [R, 128] with nibble j of word i
    at 16·j + i, the block's input order. Nested joins put nibble j = g + 2f + 4e at [r, i, e, f, g];
    moving i last and flattening puts it at 16·(4e + 2f + g) + i."""
    w = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
    return tl.reshape(tl.permute(w, (0, 2, 3, 4, 1)), [o0.shape[0], 128])


# The 4-bit code → 16-bit float step of `_tc_kernel`. A half-precision float whose exponent field
# says 2^7 (bf16 bits 0x4300) or 2^10 (fp16 bits 0x6400) and whose low mantissa bits hold q is
# exactly 128 + q or 1024 + q: one and-or (a single LOP3) makes a pair of them from a register
# holding two 16-bit halves of packed words. On the GPU this is inline PTX (prmt pairs the halves
# of two words, lop3 masks and sets the exponent: ~1 integer instruction per weight, against 3 for
# the shift/and/or of the float32 path); the interpreter computes the same values with plain ops.
def _unpack_asm(base: str, fma: str | None = None, one: str = "", nbase: str = "") -> str:
    """PTX for `inline_asm_elementwise(pack=2)`: words $8, $9 → eight 16-bit pairs $0..$7, pair j the
    nibble j of both words: prmt puts the two words' low (high) halves side by side, a shift brings
    nibble j to the bottom of each half and lop3 (a & b) | c masks it and sets the exponent bits
    `base`. With `fma` (bf16x2 / f16x2), each pair then becomes (code - BASE)·$10 + $11."""
    lines = ["{", ".reg .b32 lo, hi, t, c, one, nbase;"]
    if fma is not None:
        lines += [f"mov.b32 one, {one};", f"mov.b32 nbase, {nbase};"]
    lines += ["prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    for j in range(8):
        half = "lo" if j < 4 else "hi"
        if j % 4:
            lines.append(f"shr.u32 t, {half}, {4 * (j % 4)};")
        src = "t" if j % 4 else half
        if fma is None:
            lines.append(f"lop3.b32 ${j}, {src}, 0x000F000F, {base}, 0xEA;")
        else:
            lines += [f"lop3.b32 c, {src}, 0x000F000F, {base}, 0xEA;", f"fma.rn.{fma} c, c, one, nbase;",
                      f"fma.rn.{fma} ${j}, c, $10, $11;"]
    return "\n".join(lines + ["}"])


_NIBBLE_ASM_BF16 = tl.constexpr(_unpack_asm("0x43004300"))
_NIBBLE_ASM_FP16 = tl.constexpr(_unpack_asm("0x64006400"))


@triton.jit
def _nibble_tile(words, BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 words [R, 16] (one packing block per row) → [R, 128] in bf16 (BF16) or fp16, element
    16·j + i = BASE + nibble j of word i (BASE 128 or 1024): the code of the block's input 16·j + i."""
    if USE_ASM:
        if BF16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _NIBBLE_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words], dtype=(tl.bfloat16,) * 8, is_pure=True,
                pack=2)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _NIBBLE_ASM_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words], dtype=(tl.float16,) * 8, is_pure=True,
                pack=2)
    else:
        base: tl.constexpr = 128.0 if BF16 else 1024.0
        o0, o1, o2, o3, o4, o5, o6, o7 = _nibbles_plain(words, 1.0, base, BF16)
    return _input_order(o0, o1, o2, o3, o4, o5, o6, o7)


# The weights themselves, for `_tc_kernel` WEIGHTS ("tcw"): the codes as above (BASE + q), then per pair c·1 − BASE
# (exact: q in 16 bits; an FMA, as sub.bf16x2 needs SM 9.0) and q·s + m (one rounding, to the
# activations' 16-bit type, as a dense checkpoint stores its weights). $10 and $11 hold the scale and
# the offset of the two words' row, each as a pair of 16-bit values (pack=2 packs 16-bit inputs).
_WEIGHT_ASM_BF16 = tl.constexpr(_unpack_asm("0x43004300", "bf16x2", one="0x3F803F80", nbase="0xC300C300"))
_WEIGHT_ASM_FP16 = tl.constexpr(_unpack_asm("0x64006400", "f16x2", one="0x3C003C00", nbase="0xE400E400"))


@triton.jit
def _weight_tile(words, s, m, BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 words [R, 16] (one packing block per row), scale and offset [R] → the dequantized block
    [R, 128] in bf16 (BF16) or fp16, inputs in order (element 16·j + i = q·s + m of nibble j, word i)."""
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    s16 = tl.broadcast_to(s.to(dt)[:, None], words.shape)
    m16 = tl.broadcast_to(m.to(dt)[:, None], words.shape)
    if USE_ASM:
        if BF16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _WEIGHT_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, s16, m16], dtype=(tl.bfloat16,) * 8,
                is_pure=True, pack=2)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _WEIGHT_ASM_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, s16, m16], dtype=(tl.float16,) * 8,
                is_pure=True, pack=2)
    else:
        o0, o1, o2, o3, o4, o5, o6, o7 = _nibbles_plain(words, s16.to(tl.float32), m16.to(tl.float32), BF16)
    return _input_order(o0, o1, o2, o3, o4, o5, o6, o7)


@triton.jit
def _tc_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, KW, NG, stride_xm,
               stride_ym, blocks_per_split, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BF16: tl.constexpr, USE_ASM: tl.constexpr,
               EVEN_K: tl.constexpr, WEIGHTS: tl.constexpr, ONE_ROW: tl.constexpr, PDL: tl.constexpr):
    """y [M, N] = x [M, K] · dequant(W)ᵀ on the tensor cores, M <= BLOCK_M (M = 1 included: the MMA
    pads it for free, what matters is the weight bytes); the MMA's M side is the weight rows. GROUP >= 128.

    WEIGHTS ("tcw"): each 128-input block's codes become the weights themselves in registers (q·s + m
    in x's 16-bit type, one rounding) and one accumulator runs through the K range.
    Otherwise ("tc"): acc = W' · xᵀ with W' the 16-bit codes 128 + q (1024 + q in fp16; exact),
    xsum = 1 · xᵀ (a second MMA), then per output row y += s·acc + (m − BASE·s)·xsum = Σ x·(q·s + m).
    SPLIT_K > 1: partials summed by the last program of each N tile (_store_split).
    ONE_ROW (M = 1): x is read once per block, not once per padded MMA row."""
    wait_and_release(PDL)  # triton_ops.pdl: launched while the previous kernel finishes
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, 128)
    ri = tl.arange(0, 16)
    n_ok = rn < N
    m_ok = rm < M
    rm_in = tl.minimum(rm, M - 1)  # padding rows re-read the last row: unmasked loads, dropped at the store
    base: tl.constexpr = 128.0 if BF16 else 1024.0
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    if not WEIGHTS:
        ones = tl.full([BLOCK_N, 128], 1.0, dtype=dt)
    out = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(KW // 16, b_start + blocks_per_split)
    w_rows = qw_ptr + rn[:, None] * KW + ri[None, :]
    for b in range(b_start, b_end):
        words = tl.load(w_rows + b * 16, mask=n_ok[:, None], other=0)
        k = b * 128 + kk
        if ONE_ROW:  # M = 1: one row from memory, repeated in registers for the MMA's padding rows
            x1 = tl.load(x_ptr + k) if EVEN_K else tl.load(x_ptr + k, mask=k < K, other=0.0)
            xr = tl.broadcast_to(x1[None, :], [BLOCK_M, 128])
        elif EVEN_K:
            xr = tl.load(x_ptr + rm_in[:, None] * stride_xm + k[None, :])
        else:
            xr = tl.load(x_ptr + rm_in[:, None] * stride_xm + k[None, :], mask=(k < K)[None, :], other=0.0)
        xt = tl.trans(xr.to(dt))  # [128, BLOCK_M]
        g = (b * 128) // GROUP
        sc = tl.load(s_ptr + rn * NG + g, mask=n_ok, other=0.0)
        off = tl.load(m_ptr + rn * NG + g, mask=n_ok, other=0.0)
        if WEIGHTS:
            w = _weight_tile(words, sc, off, BF16, USE_ASM)
            if USE_ASM:
                out = tl.dot(w, xt, out)
            else:  # Triton's CPU interpreter gets 16-bit dots wrong: give it float32
                out = tl.dot(w.to(tl.float32), xt.to(tl.float32), out, input_precision="ieee")
        else:
            codes = _nibble_tile(words, BF16, USE_ASM)
            if USE_ASM:
                acc = tl.dot(codes, xt)
                xsum = tl.dot(ones, xt)
            else:
                acc = tl.dot(codes.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
                xsum = tl.dot(ones.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            sc = sc.to(tl.float32)
            out += sc[:, None] * acc + (off.to(tl.float32) - base * sc)[:, None] * xsum
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    _store_split(y_ptr, ws_ptr, cnt_ptr, out, rm, rn, m_ok, n_ok, M, N, stride_ym, pid_n, pid_k, SPLIT_K,
                 BLOCK_M, BLOCK_N)


def gemm_tcw(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config=None) -> torch.Tensor:
    """As gemm_tc, the weights dequantized in registers and one accumulator (_tc_kernel WEIGHTS)."""
    return gemm_tc(x, w, bias, config, weights=True)


def gemm_tc(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config=None, weights: bool = False
            ) -> torch.Tensor:
    """x [M, K] (M <= 64; fp16 or bf16) → y [M, N]; config (BLOCK_N, SPLIT_K, num_warps[, ONE_ROW[, num_stages]]).
    The MMA's M side is the weight rows; x's rows pad to a power of two >= 16 on the other side."""
    block_n, split_k, num_warps, *rest = config or TC_CONFIG
    one_row = bool(rest and rest[0]) and x.shape[0] == 1  # config[3]: the ONE_ROW x load at M = 1
    stages = {"num_stages": rest[1]} if len(rest) > 1 and rest[1] else {}  # config[4]: software pipeline depth
    m = x.shape[0]
    n, kw = w.qweight.shape
    block_m = max(16, triton.next_power_of_2(m))
    if m > MAX_M_DOT or w.group_size < 128 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("gemm_tc: needs M <= 64, group size >= 128 and fp16/bf16 activations")
    split_k, per = split_tiles(kw // WORDS_PER_BLOCK, split_k)
    tiles = triton.cdiv(n, block_n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws = scratch(x.device, "int4", torch.float32, split_k * m * n) if split_k > 1 else y
    cnt = scratch(x.device, "int4", torch.int32, tiles) if split_k > 1 else y
    pdl_on = pdl.mode(x.device, x.shape[0], small=False)
    _tc_kernel[(tiles, split_k)](
        x, w.qweight, w.scales, w.offsets, bias if bias is not None else x, y, ws, cnt, m, n, w.in_features, kw,
        w.scales.shape[1], x.stride(0), y.stride(0), per, GROUP=w.group_size, BLOCK_M=block_m, BLOCK_N=block_n,
        SPLIT_K=split_k, HAS_BIAS=bias is not None, BF16=x.dtype == torch.bfloat16, USE_ASM=not _INTERPRET,
        EVEN_K=w.in_features % 128 == 0, WEIGHTS=weights, ONE_ROW=one_row, PDL=pdl_on, num_warps=num_warps,
        **stages, **pdl.launch_kwargs(pdl_on))
    return y
