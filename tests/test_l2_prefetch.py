"""The L2 weight prefetch's targets (triton_ops "l2_prefetch"): o_proj's weights first, then as much of
gate_up_proj's as the byte budget leaves; the kernel side is GPU-tested (test_cuda_graph) and compiled for
SM 8.7 / 9.0 here (test_kernel_compile)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")


class _Packed:
    def __init__(self, n, k):
        self.qweight = torch.zeros(n, k // 8, dtype=torch.int32)


def _layer(o_shape=(64, 512), gu_shape=(256, 512)):
    layer = nn.Module()
    layer.self_attn, layer.mlp = nn.Module(), nn.Module()
    layer.self_attn.attn = nn.Module()
    layer.self_attn.o_proj, layer.mlp.gate_up_proj = nn.Module(), nn.Module()
    layer.self_attn.o_proj.packed = _Packed(*o_shape)
    layer.mlp.gate_up_proj.packed = _Packed(*gu_shape)
    return layer


def test_targets_fill_the_budget_in_order():
    from edgelm.layers.triton_ops.l2_prefetch import launch_args, mark_l2_prefetch

    model = nn.ModuleList([_layer(), _layer()])
    o_bytes = 64 * 64 * 4  # 16 KiB of packed words
    assert mark_l2_prefetch(model, budget=o_bytes + 1000) == 2
    targets = model[0].self_attn.attn.l2_prefetch
    assert [(t.data_ptr(), n) for t, n in targets] == [
        (model[0].self_attn.o_proj.packed.qweight.data_ptr(), o_bytes),
        (model[0].mlp.gate_up_proj.packed.qweight.data_ptr(), 1000 // 128 * 128)]  # whole 128-byte lines
    mark_l2_prefetch(model, budget=o_bytes // 2)  # less than o_proj: only its start
    assert [n for _, n in model[1].self_attn.attn.l2_prefetch] == [o_bytes // 2]
    dummy = torch.zeros(1)
    args = launch_args(model[1].self_attn.attn.l2_prefetch, dummy)
    assert args[0].dtype == torch.uint8 and args[1] == o_bytes // 2 and args[2] is dummy and args[3] == 0
    assert launch_args(None, dummy) == (dummy, 0, dummy, 0)
