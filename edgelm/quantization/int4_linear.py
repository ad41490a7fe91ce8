"""Int4Linear: a linear layer with groupwise int4 weights (edgelm's own kernels on CUDA)."""

from __future__ import annotations

import torch
from torch import nn

from edgelm.quantization.int4_pack import Int4Weight, dequantize_int4, quantize_int4


class Int4Linear(nn.Module):
    """y = x · dequant(W)ᵀ (+ b), W stored as packed int4 codes with fp16 per-group scale/offset.

    On CUDA the Triton kernels of int4_kernels run on the packed codes. Elsewhere (CPU) the weight is
    dequantized once at conversion and kept dense: the same numbers as the kernels compute, without
    the memory saving.

    input_perm (pre-quantized GPTQ with act-order, edgelm.quantization.prequantized): x's inputs are
    taken in this order, the one the packed groups follow.
    """

    def __init__(self, packed: Int4Weight, bias: torch.Tensor | None, dtype: torch.dtype, dense: bool = True):
        """dense=False: the packed buffers are to be filled (a checkpoint's loader); call finish_loading."""
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.group_size = packed.group_size
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("offsets", packed.offsets)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.weight_dtype = dtype
        self.register_buffer("input_perm", None)
        self.perm_loaded = False
        self.register_buffer("dense_weight", None, persistent=False)
        if dense:
            self.finish_loading()

    def finish_loading(self) -> None:
        if self.qweight.device.type != "cuda":
            self.dense_weight = dequantize_int4(self.packed, self.weight_dtype)

    @property
    def packed(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.offsets, self.in_features, self.group_size)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int, method: str = "search") -> Int4Linear:
        weight = linear.weight.data
        # a bf16 model's kernels apply the scales in bf16: choose the codes against those values
        meta = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float16
        packed = quantize_int4(weight, group_size, method, meta_precision=meta)
        return cls(packed, linear.bias, weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        if self.dense_weight is not None:
            return nn.functional.linear(x, self.dense_weight.to(x.dtype), self.bias)
        from edgelm.quantization.int4_kernels import int4_linear

        return int4_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
