"""The fused forms of the int4 GEMV `gemv_h2` (int4_ptx._gemv_h2_kernel's NORM and EPILOGUE) that the
batch-1 int4 decoder layer of edgelm.models.llama launches: RMSNorm on the way in; the residual add,
SiLU·mul over gate ‖ up, or the rotary + KV-pool write on the way out. Switched by triton_ops
"fused_int4" (the whole layer; off by default) and "int4_rope" (only the rotary + KV write; on)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from edgelm.layers.triton_ops import pdl, xprep
from edgelm.quantization.int4_pack import Int4Weight
from edgelm.quantization.int4_ptx import _INTERPRET, _gemv_h2_kernel, h2_launch, meta_args


def fusable(w: Int4Weight, config) -> bool:
    """Whether gemv_h2_fused runs `config` (gemv_h2's) on w: no split K, not the persistent kernel."""
    launch = h2_launch(config, w, torch.device("cpu"))
    return w.group_size >= 128 and launch.block_n % 2 == 0 and launch.split_k == 1 and not launch.persist


class RopeStore(NamedTuple):
    """gemv_h2_fused's rotary + KV-write epilogue: position [1] (int), the cos ‖ sin table
    [positions, head_dim] float32, the q / k widths, the KV pool's buffers [slots, kv_heads, head_dim]
    and the token's slot [1]."""
    positions: torch.Tensor
    cos_sin: torch.Tensor
    head_dim: int
    q_size: int
    kv_size: int
    k_buf: torch.Tensor
    v_buf: torch.Tensor
    slots: torch.Tensor


def gemv_h2_fused(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config, out: torch.Tensor | None = None,
                  norm: tuple[torch.Tensor, float] | None = None, silu_pairs: bool = False,
                  rope: RopeStore | None = None) -> torch.Tensor:
    """_gemv_h2_kernel for the fused batch-1 decoder layer (edgelm.models.llama), x [1, K]:
    norm (weight, eps): the input is RMSNorm(x); out given: out [1, N] += the result, in place, rounded
    as the add+RMSNorm kernel rounds it (the residual stream); silu_pairs: w is gate ‖ up and the
    result is silu(gate) · up [1, N / 2]; rope: w is q ‖ k ‖ v, q comes back rotated [1, q_size] and
    the rotated k and v go to the KV pool (EPILOGUE 3). config as gemv_h2's, where `fusable`."""
    n, kw = w.qweight.shape
    if x.shape[0] != 1 or x.stride(-1) != 1 or x.dtype not in (torch.float16, torch.bfloat16) or not fusable(w, config):
        raise ValueError("gemv_h2_fused: needs one contiguous fp16/bf16 row and a config without split K")
    if silu_pairs and (out is not None or n % 2):
        raise ValueError("gemv_h2_fused: silu_pairs needs gate ‖ up and no residual")
    if norm is not None and out is not None:
        raise ValueError("gemv_h2_fused: the norm reads the residual stream that `out` would update")
    if rope is not None and (out is not None or silu_pairs or rope.head_dim % 2 or n != rope.q_size + 2 * rope.kv_size
                             or rope.k_buf.dtype != x.dtype or not rope.k_buf.is_contiguous()
                             or rope.cos_sin.shape[1] != rope.head_dim or not rope.cos_sin.is_contiguous()
                             or not rope.v_buf.is_contiguous() or rope.k_buf[0].numel() != rope.kv_size):
        raise ValueError("gemv_h2_fused: rope needs q ‖ k ‖ v and contiguous [slots, kv_size] pool buffers")
    xprep.take(x)  # a producer's prepared x is not read here; never left for a later GEMV
    launch = h2_launch(config, w, x.device)
    epilogue = 1 if out is not None else 2 if silu_pairs else 3 if rope is not None else 0
    width = n // 2 if silu_pairs else rope.q_size if rope is not None else n
    y = out if out is not None else torch.empty(1, width, dtype=x.dtype, device=x.device)
    r = rope if rope is not None else RopeStore(x, x, 2, 0, 0, x, x, x)
    nw, eps = norm if norm is not None else (x, 0.0)
    s_arg, m_arg, meta = meta_args(w)
    _gemv_h2_kernel[(triton.cdiv(n, launch.block_n), 1)](
        x, w.qweight, s_arg, m_arg, bias if bias is not None else x, y, y, y, n, w.in_features, kw,
        w.scales.shape[1], launch.blocks_per_split, nw, eps, r.positions, r.cos_sin, r.k_buf, r.v_buf, r.slots,
        r.q_size, r.kv_size, y, y, GROUP=w.group_size, BLOCK_N=launch.block_n, BLOCK_B=launch.block_b, SPLIT_K=1,
        HAS_BIAS=bias is not None, BF16=x.dtype == torch.bfloat16, USE_ASM=not _INTERPRET, PDL=launch.pdl,
        PREFETCH=launch.prefetch, NORM=norm is not None, EPILOGUE=epilogue, HALF=r.head_dim // 2, META=meta,
        STAGES=launch.stages,
        num_warps=launch.num_warps, **pdl.launch_kwargs(launch.pdl))
    return y
