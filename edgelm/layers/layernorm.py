"""RMSNorm, with the residual add fused into the same call."""

from __future__ import annotations

import torch
from torch import nn

from edgelm.layers import triton_ops
from edgelm.layers.linear import default_weight_loader


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    if dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu":
        # the same sums in one op (float32 on a CPU: equal results, two thirds of the time of the five ops below)
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * weight.float()).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             int4_prep: bool = False):
    """Without residual: norm(x). With it: (norm(x + residual), x + residual).

    CUDA tensors take one Triton kernel (add and norm in one pass) where it is switched on; int4_prep: the output
    goes straight into a batch-1 int4 GEMV (triton_ops.xprep)."""
    if x.is_cuda and triton_ops.enabled("rmsnorm" if residual is None else "add_rmsnorm"):
        from edgelm.layers.triton_ops import xprep
        from edgelm.layers.triton_ops.rmsnorm import rms_norm as rms_norm_kernel
        from edgelm.layers.triton_ops.rmsnorm import supports

        if supports(x, weight, residual):
            return rms_norm_kernel(x, weight, eps, residual, prep=xprep.wanted(int4_prep))
    if residual is None:
        return rms_norm_ref(x, weight, eps)
    x = x + residual
    return rms_norm_ref(x, weight, eps), x


class RMSNorm(nn.Module):
    int4_prep = False  # its output goes straight into a batch-1 int4 GEMV (triton_ops.xprep.mark_int4_producers)

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.weight.weight_loader = default_weight_loader
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With it: (norm(x + residual), x + residual) (layernorm.rms_norm)."""
        return rms_norm(x, self.weight, self.eps, residual, self.int4_prep)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm_ref(x, self.weight, self.eps)
        x = x + residual
        return rms_norm_ref(x, self.weight, self.eps), x
