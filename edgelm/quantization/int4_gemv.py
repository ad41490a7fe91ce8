"""edgelm's batch-1 int4 GEMV with x held in registers ("gemv_xs"; Triton, plain ops, SM 8.0+).

Why another GEMV: at one row of x a decode step reads each int4 weight once, and the GPU has only a few
instructions to spend on it before the memory stops being the limit (~4.8 thread-instructions per
weight on an H100, ~3.5 on an H200, ~6.5 on an AGX Orin: SM count x clock x 128 lanes over twice the
bandwidth in bytes). The other kernels spend more (benchmarks/sass_loop_stats.py: gemv_h2 ~8.2, tcw
~3.9 plus stalls); the H200 sweep of 2026-12-06 put the best of them at 0.29-0.50 of the int4 roofline.

The design, per warp:
- A program owns a chunk of REP·128 words (REP·1024 inputs) of every row it handles; each lane owns 4
  adjacent words (one 16-byte load) in each of the REP 128-word slices. The x values those words meet
  are loaded once per program, converted to float32 and kept in registers (x-stationary), and rows
  stream past them: each warp reads one row's chunk with fully coalesced 512-byte loads, the next row's
  words are loaded while the current one is computed, and programs stride over row tiles (persistent).
- A code becomes a float32 with one LOP3, no conversion: (v & mask) | 0x3F800000 is 1 + q·2^-7 when
  q sits at bits 16-19 of v, 1 + q·2^-11 at bits 12-15. The word itself has nibble 4 at 16-19 and
  nibble 3 at 12-15; v << 8 brings nibbles 2 and 1 there, v >> 8 nibbles 6 and 5, v << 16 nibble 0
  and v >> 16 nibble 7: 4 shifts, 8 LOP3 and 8 FFMA a word, ~2.5 instructions a weight.
- With x' = x for the bits-16-19 nibbles and 16·x for the others, Σ f·x' = X' + 2^-7·Σ q·x, X' the
  (register-held) Σ x' of the lane's inputs: per 128-input block, Σ x·(q·s + m) = s·(128·acc − 128·X')
  + m·Σ x, applied to the lane's own partial sum (its 4 words lie in one block), then one warp reduce
  per row. The q part keeps ~17 of float32's 24 bits (the 1 + ... part is at most 136 times larger):
  more exact than kernels that round q·s + m to 16 bits.
Launch configuration depends on the shapes and the SM count only: CUDA-graph capturable.

Measured (benchmarks/results/int4_tune_gemv_xs_h100.json, int4_tune_h100.json, int4_tune_h200.json,
2026-12-06): it loses on the H100 and the H200. Best config (REP 4, 4 warps, 2 programs an SM) on the
H100 at M = 1: gate_up 40 µs, down 40-42 µs against gemv_h2's 30 and 20-21 µs; more rows per warp
made it slower (gate_up 62-88 µs), a second tile loaded ahead changed nothing (40.0 vs 40.2 µs). So its
lower instruction count is not what limits these GPUs; where its time goes was not profiled. No
dispatch table names it: int4_bench.py --tune sweeps it, for GPUs where the issue budget is tighter
relative to bandwidth than on Hopper (not measured anywhere else).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from edgelm.layers.triton_ops.scratch import scratch
from edgelm.platform import sm_count
from edgelm.quantization.int4_pack import Int4Weight
from edgelm.quantization.int4_ptx import _store_row

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_XS_CONFIG = (2, 4, 4)  # (REP, num_warps, programs per SM) when a caller names none


@triton.jit
def _code(v, LO: tl.constexpr):
    """The float32 1 + q·2^-7 (q at bits 16-19 of v) or, LO, 1 + q·2^-11 (q at bits 12-15)."""
    if LO:
        bits = (v & 0x0000F000) | 0x3F800000
    else:
        bits = (v & 0x000F0000) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _x_at(x_ptr, kb, ok, j: tl.constexpr, LO: tl.constexpr):
    """x[kb + 16·j] in float32 (0 where not ok), times 16 for the nibbles read at bits 12-15."""
    v = tl.load(x_ptr + kb + 16 * j, mask=ok, other=0.0).to(tl.float32)
    if LO:
        v = v * 16.0
    return v


def _word_asm() -> str:
    """PTX for `_word_dot` (pack=1): word $1, the 8 inputs it meets $2..$9 (float32, in the order
    below), the register $10 holding 0x3F800000 → $0 = Σ f·x'. Shifts bring each pair of nibbles to
    bits 16-19 / 12-15, one lop3 (v & mask) | $10 per code, one fma per code. The magic stays a
    register operand: given two immediates, ptxas would rebuild one of them before every lop3."""
    lines = ["{", ".reg .b32 v, f;", ".reg .f32 acc;"]
    steps = [("mov.b32 v, $1;", (2, 3)), ("shl.b32 v, $1, 8;", (4, 5)), ("shr.u32 v, $1, 8;", (6, 7)),
             ("shl.b32 v, $1, 16;", (8,)), ("shr.u32 v, $1, 16;", (None, 9))]
    first = True
    for shift, (hi, *lo) in steps:
        lines.append(shift)
        for reg, mask in ((hi, "0x000F0000"), (lo[0] if lo else None, "0x0000F000")):
            if reg is None:
                continue
            lines.append(f"lop3.b32 f, v, {mask}, $10, 0xEA;")
            lines.append(f"mul.f32 acc, f, ${reg};" if first else f"fma.rn.f32 acc, f, ${reg}, acc;")
            first = False
    return "\n".join(lines + ["mov.b32 $0, acc;", "}"])


_WORD_ASM = tl.constexpr(_word_asm())


@triton.jit
def _word_dot(v, x4, x3, x2, x1, x6, x5, x0, x7, magic, USE_ASM: tl.constexpr):
    """Σ over a word's 8 codes of f·x' (see the module docstring): inline PTX on the GPU, plain ops
    (the same arithmetic) in Triton's CPU interpreter."""
    if USE_ASM:
        acc = tl.inline_asm_elementwise(_WORD_ASM, "=r,r,r,r,r,r,r,r,r,r,r", [v, x4, x3, x2, x1, x6, x5, x0, x7, magic],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        acc = _code(v, False) * x4
        acc += _code(v, True) * x3
        acc += _code(v << 8, False) * x2
        acc += _code(v << 8, True) * x1
        acc += _code(v >> 8, False) * x6
        acc += _code(v >> 8, True) * x5
        acc += _code(v << 16, False) * x0
        acc += _code(v >> 16, True) * x7
    return acc


@triton.jit
def _gemv_xs_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, KW, NG, num_tiles,
                    GROUP: tl.constexpr, REP: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, AHEAD: tl.constexpr):
    """y [1, N] = x [1, K] · dequant(W)ᵀ; program (p, c) handles word chunk c of row tiles p, p + P, ...
    (ROWS rows a tile, ROWS / num_warps per warp). Tensors are [REP, ROWS, 32 lanes, 4 words] so that a warp holds a
    row and a lane its 4 words of each slice (checked in tests/test_int4.py's layout test)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    nprog = tl.num_programs(0)
    rep = tl.arange(0, REP)[:, None, None, None]
    lane = tl.arange(0, 32)[None, None, :, None]
    word = tl.arange(0, 4)[None, None, None, :]
    col = pid_k * (REP * 128) + rep * 128 + lane * 4 + word  # word index in the row, [REP, 1, 32, 4]
    col_ok = col < KW
    kb = (col // 16) * 128 + col % 16  # input of the word's nibble 0; nibble j meets x[kb + 16·j]
    # x-stationary: the 8 inputs each word meets, as float32 (16·x for the nibbles read at bits 12-15)
    x4 = _x_at(x_ptr, kb, col_ok & (kb + 64 < K), 4, False)
    x3 = _x_at(x_ptr, kb, col_ok & (kb + 48 < K), 3, True)
    x2 = _x_at(x_ptr, kb, col_ok & (kb + 32 < K), 2, False)
    x1 = _x_at(x_ptr, kb, col_ok & (kb + 16 < K), 1, True)
    x6 = _x_at(x_ptr, kb, col_ok & (kb + 96 < K), 6, False)
    x5 = _x_at(x_ptr, kb, col_ok & (kb + 80 < K), 5, True)
    x0 = _x_at(x_ptr, kb, col_ok & (kb < K), 0, False)
    x7 = _x_at(x_ptr, kb, col_ok & (kb + 112 < K), 7, True)
    # per lane and slice: 128·Σ x' and Σ x over its 4 words' 32 inputs, [REP, 1, 32]
    x_sum = tl.sum(x4 + x2 + x6 + x0 + (x3 + x1 + x5 + x7) * 0.0625, axis=3)
    x_base = 128.0 * tl.sum(x4 + x2 + x6 + x0 + x3 + x1 + x5 + x7, axis=3)
    lane_col = pid_k * (REP * 128) + tl.arange(0, REP)[:, None, None] * 128 + tl.arange(0, 32)[None, None, :] * 4
    group = (lane_col // 16) * 128 // GROUP  # the lane's scale group in each slice, [REP, 1, 32]
    group_ok = lane_col < KW
    r_tile = tl.arange(0, ROWS)[None, :, None, None]
    # 0x3F800000 as a value the compiler cannot fold (num_tiles > 0): kept in a register for the PTX
    magic = tl.zeros([REP, 1, 32, 4], dtype=tl.int32) + ((num_tiles >> 31) | 0x3F800000)
    r_sm = tl.arange(0, ROWS)[None, :, None]
    r_out = tl.arange(0, ROWS)
    rows = pid * ROWS + r_tile
    nxt = tl.load(qw_ptr + rows * KW + col, mask=(rows < N) & col_ok, other=0)
    if AHEAD == 2:  # two tiles' words in flight while one is computed
        rows = (pid + nprog) * ROWS + r_tile
        nxt2 = tl.load(qw_ptr + rows * KW + col, mask=(rows < N) & col_ok, other=0)
    for tile in range(pid, num_tiles, nprog):
        v = nxt
        rows = (tile + AHEAD * nprog) * ROWS + r_tile
        if AHEAD == 2:
            nxt = nxt2
            nxt2 = tl.load(qw_ptr + rows * KW + col, mask=(rows < N) & col_ok, other=0)
        else:
            nxt = tl.load(qw_ptr + rows * KW + col, mask=(rows < N) & col_ok, other=0)  # the next tile's words
        acc = _word_dot(v, x4, x3, x2, x1, x6, x5, x0, x7, magic, USE_ASM)
        part = tl.sum(acc, axis=3)  # [REP, ROWS, 32]: the lane's 4 words, one 128-input block
        rs = tile * ROWS + r_sm
        sm_off = rs * NG + group
        sm_ok = (rs < N) & group_ok
        sc = tl.load(s_ptr + sm_off, mask=sm_ok, other=0.0).to(tl.float32)
        off = tl.load(m_ptr + sm_off, mask=sm_ok, other=0.0).to(tl.float32)
        contrib = sc * (128.0 * part - x_base) + off * x_sum
        out = tl.sum(tl.sum(contrib, axis=0), axis=1)  # [ROWS]: slices in-thread first, then one warp reduce
        rn = tile * ROWS + r_out
        _store_row(y_ptr, ws_ptr, cnt_ptr, bias_ptr, out, rn, rn < N, N, tile, pid_k, SPLIT_K, HAS_BIAS, ROWS)


def gemv_xs(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config=None) -> torch.Tensor:
    """x [1, K] → y [1, N]; config (REP, num_warps, programs per SM[, rows per warp[, tiles ahead]]).
    Groups of 128 inputs or more. Each row a warp holds at once, and each tile loaded ahead (1 or 2),
    adds REP·16 bytes a lane to the loads in flight."""
    rep, num_warps, per_sm, *rest = config or GEMV_XS_CONFIG
    rows_per_warp = rest[0] if rest else 1
    ahead = rest[1] if len(rest) > 1 else 1
    n, kw = w.qweight.shape
    if x.shape[0] != 1 or w.group_size < 128 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("gemv_xs: needs one row, group size >= 128 and fp16/bf16 activations")
    x = x.contiguous()
    split_k = -(-kw // (rep * 128))
    rows = num_warps * rows_per_warp
    tiles = triton.cdiv(n, rows)
    sms = sm_count(x.device) if x.is_cuda else 4
    programs = max(1, min(tiles, sms * per_sm // split_k))
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    ws = scratch(x.device, "int4", torch.float32, split_k * n) if split_k > 1 else y
    cnt = scratch(x.device, "int4", torch.int32, tiles) if split_k > 1 else y
    _gemv_xs_kernel[(programs, split_k)](
        x, w.qweight, w.scales, w.offsets, bias if bias is not None else x, y, ws, cnt, n, w.in_features, kw,
        w.scales.shape[1], tiles, GROUP=w.group_size, REP=rep, ROWS=rows, SPLIT_K=split_k, HAS_BIAS=bias is not None,
        USE_ASM=x.is_cuda and not _INTERPRET, AHEAD=ahead, num_warps=num_warps)
    return y

