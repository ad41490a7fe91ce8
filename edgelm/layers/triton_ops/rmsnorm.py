"""RMSNorm and residual-add + RMSNorm in one pass over each row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgelm.layers.triton_ops import pdl, xprep
from edgelm.layers.triton_ops.pdl import wait_and_release

MAX_COLS = 32768  # one program holds a whole row in registers; wider rows stay on the torch path


@triton.jit
def _rms_norm_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, out_ptr, out_stride, res_out_ptr,
                     res_out_stride, n_cols, eps, xp_ptr, xs_ptr, xd_ptr, HAS_RESIDUAL: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr, PREP: tl.constexpr = False):
    """One program per row. x, residual, out, res_out [rows, n_cols] (last dim contiguous); w [n_cols].

    With a residual: s = x + residual, rounded to the model dtype and stored in res_out; then
    out = s * rsqrt(mean(s²) + eps) * w, computed in float32. Without one, s = x.
    PREP (one row): out is also written in the int4 GEMV's prepared form (triton_ops.xprep).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if PDL:  # the norm's weight loads while the previous kernel finishes
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        wait_and_release(PDL)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    if not PDL:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = ((xf * rstd) * w).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)
    if PREP:
        xprep.prep_row(y.to(tl.float32), 0, tl.cdiv(n_cols, 128), xp_ptr, xs_ptr, xd_ptr, BLOCK)


def supports(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    n = x.shape[-1]
    return (n <= MAX_COLS and weight.shape == (n,) and weight.is_contiguous()
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)))


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, prep: bool = False):
    """x [..., n]; weight [n]. Without residual: norm(x). With it: (norm(x + residual), x + residual).

    Same results as `layernorm.rms_norm_ref` (the sum in the model dtype, the norm in float32);
    new output tensors, the inputs are left as they were. prep (one row, n >= 128): also writes the
    norm in the batch-1 int4 GEMV's prepared form and offers it (triton_ops.xprep).
    """
    shape, n = x.shape, x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = _rows(residual)
        res_out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    else:
        r2 = res_out = out  # unused
    if rows > 0:
        block = triton.next_power_of_2(n)
        prep = prep and rows == 1 and block >= 128
        bufs = xprep.buffers(x.device, n) if prep else (out, out, out)
        pdl_on = pdl.mode(x.device, rows)
        _rms_norm_kernel[(rows,)](
            x2, x2.stride(0), r2, r2.stride(0), weight, out, out.stride(0), res_out, res_out.stride(0),
            n, eps, *bufs, HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl_on, PREP=prep,
            num_warps=min(max(block // 512, 1), 16), **pdl.launch_kwargs(pdl_on))
        if prep:
            xprep.offer(out, bufs)
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)
