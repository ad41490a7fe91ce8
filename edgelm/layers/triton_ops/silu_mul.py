"""SiLU(gate) * up over a merged gate_up projection, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgelm.layers.triton_ops import pdl
from edgelm.layers.triton_ops.pdl import wait_and_release

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, d, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """x [rows, 2 * d] (gate ‖ up, last dim contiguous); out [rows, d] = silu(gate) * up.

    silu(gate) is rounded to the output dtype before the product, as torch's two ops do.
    Grid: (rows, cdiv(d, BLOCK)).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    wait_and_release(PDL)
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] → [..., d]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    if rows > 0:
        pdl_on = pdl.mode(x.device, rows)
        _silu_and_mul_kernel[(rows, triton.cdiv(d, BLOCK))](x2, x2.stride(0), out, out.stride(0), d,
                                                             BLOCK=BLOCK, PDL=pdl_on, num_warps=4,
                                                             **pdl.launch_kwargs(pdl_on))
    return out.view(*x.shape[:-1], d)
