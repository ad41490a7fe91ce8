"""Greedy token choice: the argmax of each row of the logits in one launch.

torch's argmax reduces a [1, 128256] row with a single thread block (27 us on an H100, once per
decode step). Here each row is cut into BLOCK-wide chunks, one program each (16 chunks took 19.5 us
in one program, benchmarks/results/decode_profile_llama-3.1-8b_bf16_bs1_h100.json); the last
program of a row to finish (an atomic counter per row says which) reduces the chunks' winners.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgelm.layers.triton_ops.scratch import scratch

BLOCK = 4096


@triton.jit
def _argmax_kernel(x_ptr, x_stride, out_ptr, n_cols, best_ptr, idx_ptr, counter_ptr, BLOCK: tl.constexpr,
                   CHUNKS: tl.constexpr):
    """Program (row, chunk): the chunk's largest value and its first index go to best/idx[row, chunk];
    the row's last program to arrive writes out[row] = the first index of the row's largest value."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
    value, idx = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(best_ptr + row * CHUNKS + chunk, value)
    tl.store(idx_ptr + row * CHUNKS + chunk, chunk * BLOCK + idx)
    arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
    if arrived == tl.num_programs(1) - 1:
        offs = tl.arange(0, CHUNKS)
        ok = offs < tl.num_programs(1)
        values = tl.load(best_ptr + row * CHUNKS + offs, mask=ok, other=float("-inf"), cache_modifier=".cg")
        indices = tl.load(idx_ptr + row * CHUNKS + offs, mask=ok, other=0, cache_modifier=".cg")
        top = tl.max(values, axis=0)
        # the first chunk holding the top value holds its first index
        first = tl.min(tl.where((values == top) & ok, offs, CHUNKS), axis=0)
        tl.store(out_ptr + row, tl.sum(tl.where(offs == first, indices, 0), axis=0).to(tl.int64))
        tl.atomic_xchg(counter_ptr + row, 0)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (last dim contiguous) → [B] int64, as torch.argmax(dim=-1) for finite values."""
    rows, n = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0 or n == 0:
        return out
    chunks = triton.cdiv(n, BLOCK)
    width = max(triton.next_power_of_2(chunks), 2)
    best = torch.empty(rows, width, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, width, dtype=torch.int32, device=logits.device)
    counters = scratch(logits.device, "argmax", torch.int32, rows)
    _argmax_kernel[(rows, chunks)](logits, logits.stride(0), out, n, best, idx, counters, BLOCK=BLOCK, CHUNKS=width,
                                   num_warps=4)
    return out
