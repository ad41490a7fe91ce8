from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgelm.layers import triton_ops


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate ‖ up) → silu(gate) * up, [..., d]."""

    int4_prep = False  # its output goes straight into a batch-1 int4 GEMV (triton_ops.xprep.mark_int4_producers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton_ops.enabled("silu_and_mul"):
            from edgelm.layers.triton_ops import xprep
            from edgelm.layers.triton_ops.silu_mul import silu_and_mul

            return silu_and_mul(x, prep=xprep.wanted(self.int4_prep))
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
