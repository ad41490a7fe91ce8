"""Weights pulled into the L2 while the batch-1 decode attention runs (triton_ops "l2_prefetch").

Between the qkv and o GEMVs of a decoder layer, the rotary, KV write and attention kernels take several
microseconds and read little from memory (K/V, a few MB at 1k context). Each program of the attention
kernel issues `prefetch.global.L2` for its share of the next weights (o_proj's, then the start of
gate_up's, up to a byte budget), so that those GEMVs find part of their bytes in the L2 instead of DRAM.

The targets are set once at load, where the switch is on (`mark_l2_prefetch`), on each layer's
RadixAttention as `l2_prefetch`: up to two (tensor, bytes) regions. The budget defaults to a third of the GPU's L2 (EDGELM_L2_PREFETCH_MB
overrides); a GPU with a small L2 (Orin: 4 MB) prefetches little, which costs a few instructions a thread.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["prefetch_region", "mark_l2_prefetch", "launch_args", "budget_bytes"]

LINE = 128  # bytes an L2 prefetch brings in


@triton.jit
def prefetch_region(base_ptr, nbytes, part, parts, BLOCK: tl.constexpr):
    """Prefetch into the L2 the lines of base_ptr's first nbytes (a byte pointer) that belong to `part` of
    `parts` equal shares (inline PTX: CUDA GPUs only, never launched under the interpreter)."""
    lines = tl.cdiv(nbytes, 128)
    per = tl.cdiv(lines, parts)
    first = part * per
    last = tl.minimum(first + per, lines)
    for l0 in range(first, last, BLOCK):
        offs = l0 + tl.arange(0, BLOCK)
        ptrs = base_ptr + tl.minimum(offs, last - 1).to(tl.int64) * 128  # past the share: its last line again
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


def budget_bytes(device: torch.device) -> int:
    """How many weight bytes a layer prefetches: EDGELM_L2_PREFETCH_MB, else a third of the L2."""
    env = os.environ.get("EDGELM_L2_PREFETCH_MB")
    if env is not None:
        return int(float(env) * 2**20)
    return torch.cuda.get_device_properties(device).L2_cache_size // 3


def _weight_regions(lin) -> list[torch.Tensor]:
    """The tensors a batch-1 GEMV of `lin` streams, largest first (int4: packed words; else the weight)."""
    packed = getattr(lin, "packed", None)
    if packed is not None:
        return [packed.qweight]
    w = getattr(lin, "weight", None)
    return [w] if isinstance(w, torch.Tensor) and w.is_cuda else []


def mark_l2_prefetch(model: torch.nn.Module, budget: int | None = None) -> int:
    """Set `l2_prefetch` on each decoder layer's attention: o_proj's weights, then as much of gate_up_proj's
    as the budget leaves, as (tensor, bytes) pairs. Returns how many layers were marked."""
    marked = 0
    for layer in model.modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        radix = getattr(attn, "attn", None)
        if radix is None or mlp is None:
            continue
        regions = _weight_regions(getattr(attn, "o_proj", None)) + _weight_regions(getattr(mlp, "gate_up_proj", None))
        if not regions:
            continue
        if budget is None:  # once, from the first layer's device
            budget = budget_bytes(regions[0].device)
        left = budget
        targets = []
        for t in regions:
            nbytes = min(t.numel() * t.element_size(), left) // LINE * LINE
            if nbytes <= 0 or not t.is_contiguous():
                break
            targets.append((t, nbytes))
            left -= nbytes
        radix.l2_prefetch = targets[:2]
        marked += bool(targets)
    return marked


def launch_args(targets, dummy: torch.Tensor) -> tuple:
    """(p0, n0, p1, n1) for the attention kernel: byte views of up to two regions; dummy and 0 where none."""
    out = []
    for t, n in list(targets or [])[:2]:
        out += [t.view(-1).view(torch.uint8), n]
    return tuple(out + [dummy, 0] * (2 - len(out) // 2))
