"""SiLU(gate) * up over a merged gate_up projection, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgelm.layers.triton_ops import pdl, xprep
from edgelm.layers.triton_ops.pdl import wait_and_release

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, d, xp_ptr, xs_ptr, xd_ptr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr, PREP: tl.constexpr = False):
    """x [rows, 2 * d] (gate ‖ up, last dim contiguous); out [rows, d] = silu(gate) * up.

    silu(gate) is rounded to the output dtype before the product, as torch's two ops do.
    Grid: (rows, cdiv(d, BLOCK)). PREP (one row): out also in the int4 GEMV's prepared form (xprep).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    wait_and_release(PDL)
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    y = (act * up).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)
    if PREP:
        xprep.prep_row(tl.where(mask, y.to(tl.float32), 0.0), tl.program_id(1) * (BLOCK // 128), tl.cdiv(d, 128),
                       xp_ptr, xs_ptr, xd_ptr, BLOCK)


def silu_and_mul(x: torch.Tensor, prep: bool = False) -> torch.Tensor:
    """x [..., 2 * d] → [..., d]. prep (one row): also the batch-1 int4 GEMV's prepared form, offered
    (triton_ops.xprep)."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    if rows > 0:
        prep = prep and rows == 1
        bufs = xprep.buffers(x.device, d) if prep else (out, out, out)
        pdl_on = pdl.mode(x.device, rows)
        _silu_and_mul_kernel[(rows, triton.cdiv(d, BLOCK))](x2, x2.stride(0), out, out.stride(0), d, *bufs,
                                                             BLOCK=BLOCK, PDL=pdl_on, PREP=prep, num_warps=4,
                                                             **pdl.launch_kwargs(pdl_on))
        if prep:
            xprep.offer(out, bufs)
    return out.view(*x.shape[:-1], d)
