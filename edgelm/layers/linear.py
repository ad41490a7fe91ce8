"""Linear layers that know how to load their own weights.

They subclass `nn.Linear` so weight-only quantizers (torchao's `quantize_`, edgelm's int4
kernels) recognise and replace them after loading, like any other linear layer.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from edgelm.layers import triton_ops

_PLAIN = (torch.Tensor, nn.Parameter)
_HALF = (torch.bfloat16, torch.float16)
_WEIGHTS_ON_META = contextvars.ContextVar("edgelm_linear_weights_on_meta", default=False)


@contextlib.contextmanager
def linear_weights_on_meta():
    """Linear layers built inside put their weight and bias on the meta device (no memory): the
    caller replaces them before loading (pre-quantized checkpoints) or calls `materialize`."""
    token = _WEIGHTS_ON_META.set(True)
    try:
        yield
    finally:
        _WEIGHTS_ON_META.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ b). cuBLAS (F.linear), except at decode batch sizes (<= 8 rows) on the GPUs and
    shapes where edgelm's Triton skinny GEMM measured faster (`triton_ops.gemv.WINS`). Quantized
    weights (tensor subclasses) always go through F.linear."""
    if (x.is_cuda and x.numel() <= 8 * x.shape[-1] and type(weight) in _PLAIN and weight.dtype in _HALF
            and x.dtype == weight.dtype and triton_ops.enabled("gemv")):
        from edgelm.layers.triton_ops.gemv import pick_config, skinny_gemm

        config = pick_config(x, weight)
        if config is not None:
            return skinny_gemm(x, weight, bias, config)
    return F.linear(x, weight, bias)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Linear):
    """y = x Wᵀ (+ b); weight [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None):
        if _WEIGHTS_ON_META.get():
            device = "meta"
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self._set_loaders()

    def _set_loaders(self) -> None:
        self.weight.weight_loader = default_weight_loader
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def materialize(self, device, dtype: torch.dtype) -> None:
        """Real (uninitialized) weight and bias for a layer built under `linear_weights_on_meta`."""
        self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=dtype, device=device), requires_grad=False)
        if self.bias is not None:
            self.bias = nn.Parameter(torch.empty(self.bias.shape, dtype=dtype, device=device), requires_grad=False)
        self._set_loaders()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several linears of the same input stacked along the output: q/k/v → qkv, gate/up → gate_up.

    One GEMM instead of several: at batch 1 each launch re-reads the activations and pays
    its own overhead, and the weights are read exactly once either way.
    """

    def __init__(self, in_features: int, output_sizes: dict[str, int], bias: bool = False, dtype=None,
                 device=None):
        super().__init__(in_features, sum(output_sizes.values()), bias=bias, dtype=dtype, device=device)
        self.output_sizes = dict(output_sizes)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in output_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def _set_loaders(self) -> None:
        self.weight.weight_loader = self._load_shard
        if self.bias is not None:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        offset, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard_id}: parameter {tuple(target.shape)} vs checkpoint "
                             f"{tuple(loaded.shape)}")
        target.copy_(loaded)
