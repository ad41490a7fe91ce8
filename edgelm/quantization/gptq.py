"""GPTQ for edgelm's int4 layout: groupwise int4 codes chosen column by column, each column's rounding
error pushed onto the columns not yet quantized through the inverse Hessian of the layer's inputs
(H = Σ x xᵀ over calibration tokens). Needs calibration activations; `collect_hessians` gathers them
with forward hooks while the caller runs the model on calibration text.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgelm.quantization.int4_pack import (
    GROUP_SIZES,
    Int4Weight,
    _search_chunk,
    pack_int4,
    padded_in_features,
)


class HessianCollector:
    """Forward hooks that sum x xᵀ (float64) over every token each target linear sees."""

    def __init__(self, model: nn.Module, is_target: Callable[[nn.Module], bool]):
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = [mod.register_forward_hook(self._hook(name))
                         for name, mod in model.named_modules() if is_target(mod)]

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            h = self.hessians.get(name)
            self.hessians[name] = x.T @ x if h is None else h + x.T @ x
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _group_params(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) [N, 1] for the columns w [N, g], rounded to fp16 as stored."""
    valid = torch.ones(1, 1, w.shape[1], dtype=torch.bool, device=w.device)
    s, m = _search_chunk(w.unsqueeze(1), valid, method, shrink_steps=8, refit_iters=4)
    s, m = s.view(-1, 1).half().float(), m.view(-1, 1).half().float()
    return torch.where(s > 0, s, torch.full_like(s, 2.0**-24)), m


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, method: str = "search",
                  damp: float = 0.01, block: int = 128, act_order: bool = False) -> Int4Weight:
    """Quantize weight [N, K] to edgelm's int4 layout, minimising ‖(W - Ŵ) X‖ for the inputs X whose
    Gram matrix is `hessian` [K, K].

    act_order: visit the columns by decreasing H diagonal (the inputs with most energy first); the
    groups' scale and offset are then fixed up front from the original weight ("static groups"), so
    the packed layout and the kernels stay the same.
    """
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    n, k = weight.shape
    w = weight.detach().float().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    num_groups = -(-padded_in_features(k) // group_size)
    scales = torch.zeros(n, num_groups, device=w.device)
    offsets = torch.zeros(n, num_groups, device=w.device)
    if act_order:
        for g in range(-(-k // group_size)):
            s, m = _group_params(w[:, g * group_size : (g + 1) * group_size], method)
            scales[:, g], offsets[:, g] = s[:, 0], m[:, 0]
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k, device=w.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.zeros(n, padded_in_features(k), dtype=torch.int32, device=w.device)
    s = m = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # the column's index in the weight (and the packed layout)
            if act_order:
                s, m = scales[:, col // group_size, None], offsets[:, col // group_size, None]
            elif col % group_size == 0:
                g = col // group_size
                # the group's columns as they stand now: those of this block already carry the updates
                cols = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group_size]
                s, m = _group_params(cols, method)
                scales[:, g], offsets[:, g] = s[:, 0], m[:, 0]
            q = torch.clamp(torch.round((w1[:, i : i + 1] - m) / s), 0, 15)
            codes[:, col] = q[:, 0].to(torch.int32)
            err = (w1[:, i] - (q * s + m)[:, 0]) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Int4Weight(pack_int4(codes), scales.half(), offsets.half(), k, group_size)
