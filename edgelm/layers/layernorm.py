"""RMSNorm, with the residual add fused into the same call."""

from __future__ import annotations

import torch
from torch import nn

from edgelm.layers import triton_ops
from edgelm.layers.linear import default_weight_loader


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * weight.float()).to(dtype)


class RMSNorm(nn.Module):
    int4_prep = False  # its output goes straight into a batch-1 int4 GEMV (triton_ops.xprep.mark_int4_producers)

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.weight.weight_loader = default_weight_loader
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With it: (norm(x + residual), x + residual).

        CUDA tensors take one Triton kernel (add and norm in one pass) where it is switched on."""
        if x.is_cuda and triton_ops.enabled("rmsnorm" if residual is None else "add_rmsnorm"):
            from edgelm.layers.triton_ops import xprep
            from edgelm.layers.triton_ops.rmsnorm import rms_norm, supports

            if supports(x, self.weight, residual):
                return rms_norm(x, self.weight, self.eps, residual,
                                prep=xprep.wanted(self.int4_prep))
        return self.forward_native(x, residual)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm_ref(x, self.weight, self.eps)
        x = x + residual
        return rms_norm_ref(x, self.weight, self.eps), x
