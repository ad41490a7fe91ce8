"""x prepared for the batch-1 int4 GEMV (triton_ops "int4_xprep"; quantization.int4_ptx's PREP gemv_h2).

Per 128-input block b of x [1, K]: xp [b, 64] int32, the fp16 pairs (x[128b + p], x[128b + 64 + p])·up
(·1/16 where (p // 16) is odd), up the power of two that brings the block's largest |x| into [2^14, 2^15)
(exact for bf16 and fp16 x down to 2^-29 of it); xs [b] = Σ x (float32); xd [b] = 2^24 / up, which
turns the GEMV's subnormal-code products back into Σ q·x.

Written by `x_prep`'s own kernel, or by the kernel that makes x when it is told that an int4 GEMV
comes next (`RMSNorm` / `SiluAndMul` with `int4_prep` set by int4_linear.mark_int4_producers): that kernel
`offer`s its output and the GEMV `take`s it, so the prep costs no launch of its own. The buffers are
scratch shared by every batch-1 int4 GEMV on a device: each GEMV reads them before the next writer
may write (one stream; with PDL each kernel waits for the one before it to finish).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgelm.layers import triton_ops
from edgelm.layers.triton_ops import pdl
from edgelm.layers.triton_ops.pdl import wait_and_release
from edgelm.layers.triton_ops.scratch import scratch

PAD_BLOCKS = 32  # xp holds this many blocks past the last: the GEMV reads them unmasked (finite, × zero words)


@triton.jit
def prep_store(lo, hi, b, nb, xp_ptr, xs_ptr, xd_ptr):
    """Store the prepared form of blocks b ([BLOCKS]; those < nb) from lo, hi [BLOCKS, 64] (float32: x's
    two halves of each block, as x's dtype holds them)."""
    p = tl.arange(0, 64)
    amax = tl.max(tl.maximum(tl.abs(lo), tl.abs(hi)), axis=1)
    e = tl.minimum(tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15), 244)  # biased exponent
    up = (((268 - e) << 23).to(tl.float32, bitcast=True))[:, None] * tl.where((p // 16) % 2 == 1, 0.0625, 1.0)[None, :]
    lo16 = (lo * up).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi16 = (hi * up).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
    b_ok = b < nb
    tl.store(xp_ptr + (b * 64)[:, None] + p[None, :], lo16 | hi16, mask=b_ok[:, None])
    tl.store(xs_ptr + b, tl.sum(lo + hi, axis=1), mask=b_ok)
    tl.store(xd_ptr + b, ((e + 10) << 23).to(tl.float32, bitcast=True), mask=b_ok)


@triton.jit
def prep_row(y, b0, nb, xp_ptr, xs_ptr, xd_ptr, BLOCK: tl.constexpr):
    """prep_store of a row chunk y [BLOCK] (float32, BLOCK a multiple of 128) starting at block b0."""
    lo, hi = tl.split(tl.permute(tl.reshape(y, (BLOCK // 128, 2, 64)), (0, 2, 1)))
    prep_store(lo, hi, b0 + tl.arange(0, BLOCK // 128), nb, xp_ptr, xs_ptr, xd_ptr)


@triton.jit
def _x_prep_kernel(x_ptr, xp_ptr, xs_ptr, xd_ptr, K, NB, BLOCKS: tl.constexpr, PDL: tl.constexpr):
    """x [K] (fp16/bf16) → xp, xs, xd of its blocks pid·BLOCKS ... (module docstring)."""
    b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    k = b[:, None] * 128 + tl.arange(0, 64)[None, :]
    wait_and_release(PDL)
    lo = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    hi = tl.load(x_ptr + k + 64, mask=k + 64 < K, other=0.0).to(tl.float32)
    prep_store(lo, hi, b, NB, xp_ptr, xs_ptr, xd_ptr)


def wanted(site) -> bool:
    """Whether a producer marked for `site` (int4_linear.mark_int4_producers: "qkv", "gate_up", "down"; False
    when unmarked) writes its output prepared: every site under "int4_xprep", qkv alone under "int4_xprep_qkv"."""
    return bool(site) and (triton_ops.enabled("int4_xprep")
                           or (site == "qkv" and triton_ops.enabled("int4_xprep_qkv")))


def for_gemv(x: torch.Tensor):
    """The prepared form gemv_h2 runs on, or None for x as it is: under "int4_xprep" x's producer's offer,
    else x_prep's; under "int4_xprep_qkv" the offer alone (only the input norm makes one)."""
    if triton_ops.enabled("int4_xprep"):
        return take(x) or x_prep(x)
    return take(x) if triton_ops.enabled("int4_xprep_qkv") else None


def buffers(device: torch.device, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared (xp, xs, xd) for rows of k inputs on `device`."""
    nb = -(-k // 128)
    xp = scratch(device, "int4_xp", torch.int32, (nb + PAD_BLOCKS) * 64)
    xsd = scratch(device, "int4_xsd", torch.float32, 2 * nb)
    return xp, xsd[:nb], xsd[nb:2 * nb]


def x_prep(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [1, K] prepared by its own kernel: (xp, xs, xd)."""
    k = x.shape[1]
    xp, xs, xd = buffers(x.device, k)
    pdl_on = pdl.mode(x.device, 1)
    _x_prep_kernel[(triton.cdiv(xs.numel(), 8),)](x, xp, xs, xd, k, xs.numel(), BLOCKS=8, PDL=pdl_on, num_warps=4,
                                                 **pdl.launch_kwargs(pdl_on))
    return xp, xs, xd


_offered: list = [None]  # (data_ptr, numel, version, buffers) of the one tensor whose prepared form is ready


def offer(y: torch.Tensor, bufs) -> None:
    """y's prepared form is in bufs (written by the kernel that wrote y)."""
    _offered[0] = (y.data_ptr(), y.numel(), y._version, bufs)


def take(x: torch.Tensor):
    """The prepared form of x if its producer offered it (and x is unchanged since), else None. Clears the
    offer either way: it is meant for the GEMV right after the producer."""
    entry, _offered[0] = _offered[0], None
    if entry is not None and entry[:3] == (x.data_ptr(), x.numel(), x._version):
        return entry[3]
    return None
