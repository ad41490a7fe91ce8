"""Int4Linear: a linear layer with groupwise int4 weights (edgelm's own kernels on CUDA, torch's int4
kernel on the CPU)."""

from __future__ import annotations

import os

import torch
from torch import nn

from edgelm.quantization.int4_pack import Int4Weight, dequantize_int4, meta_pairs, quantize_int4, unpack_int4

# Above this many rows the CPU kernel loses to dequantizing the weight for the call and a float32
# matmul (2 cores of a Xeon, 3072 x 576: 745 vs 6184 us at 16 rows, 5781 vs 7325 at 128, 10428 vs
# 10949 at 256; 576 x 1536: 2017 vs 2145 at 128, 4065 vs 3138 at 256).
CPU_KERNEL_MAX_ROWS = 128


def cpu_kernel_available() -> bool:
    """torch's CPU int4 matmul (aten._weight_int4pack_mm_for_cpu, in recent torch), unless
    EDGELM_INT4_CPU=emulate asks for the dense emulation of the GPU kernels' numbers (what the
    quality benchmark measures)."""
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and os.environ.get("EDGELM_INT4_CPU", "kernel") != "emulate")


def _cpu_pack(packed: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 layout: uint8 codes [N, Kg / 2] and bf16 (scale, zero) [groups, N, 2] with
    w = (q - 8)·scale + zero, so zero = m + 8·s. Inputs are padded to Kg, K rounded up to the group (not to 128
    as in edgelm's layout: where the group divides K, as 32 does 576, x needs no padding a call)."""
    codes = unpack_int4(packed.qweight)
    n, kp = codes.shape
    groups = -(-packed.in_features // packed.group_size)
    kg = groups * packed.group_size
    codes = nn.functional.pad(codes, (0, kg - kp)) if kg > kp else codes[:, :kg]
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    s, m = packed.scales[:, :groups].float(), packed.offsets[:, :groups].float()
    scale_zero = torch.stack([s, m + 8 * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return weight, scale_zero


class Int4Linear(nn.Module):
    """y = x · dequant(W)ᵀ (+ b), W stored as packed int4 codes with fp16 per-group scale/offset.

    On CUDA the Triton kernels of int4_kernels run on the packed codes. On the CPU, torch's int4
    kernel runs batches up to 128 rows (activations and scales rounded to bf16: ~0.3 % relative error
    against the float32 emulation) and larger ones dequantize for the call; without that kernel (or
    with EDGELM_INT4_CPU=emulate) the weight is dequantized once and kept dense: the same numbers
    as the GPU kernels compute, without the memory saving.

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
        self.register_buffer("cpu_weight", None, persistent=False)
        self.register_buffer("cpu_scale_zero", None, persistent=False)
        self.register_buffer("meta", None, persistent=False)  # Int4Weight.meta (set_meta_pairs)
        if dense:
            self.finish_loading()

    def finish_loading(self) -> None:
        # EDGELM_INT4_CPU=triton (tests, under TRITON_INTERPRET): CPU tensors go through the Triton
        # kernels' dispatch as on a GPU
        if self.qweight.device.type == "cuda" or os.environ.get("EDGELM_INT4_CPU") == "triton":
            return
        if cpu_kernel_available():
            try:
                self.cpu_weight, self.cpu_scale_zero = _cpu_pack(self.packed)
                self._cpu_forward(torch.zeros(1, self.in_features, dtype=self.weight_dtype))  # this CPU runs it
                return
            except (RuntimeError, NotImplementedError):  # a CPU or torch build without the kernel's support
                self.cpu_weight = self.cpu_scale_zero = None
        self.dense_weight = dequantize_int4(self.packed, self.weight_dtype)

    @property
    def packed(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.offsets, self.in_features, self.group_size, self.meta)

    @staticmethod
    @torch.no_grad()
    def quantize(weight: torch.Tensor, group_size: int, method: str = "search",
                 importance: torch.Tensor | None = None) -> Int4Weight:
        """`weight` (in the model's dtype) packed for this layer's kernels (importance: quantize_int4's)."""
        # a bf16 model's kernels apply the scales in bf16: choose the codes against those values
        meta = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float16
        return quantize_int4(weight, group_size, method, meta_precision=meta, importance=importance)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, method: str = "search") -> Int4Linear:
        weight = linear.weight.data
        return cls(cls.quantize(weight, group_size, method), linear.bias, weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        if self.dense_weight is not None:
            return nn.functional.linear(x, self.dense_weight.to(x.dtype), self.bias)
        if self.cpu_weight is not None:
            return self._cpu_forward(x)
        from edgelm.quantization.int4_kernels import int4_linear

        return int4_linear(x, self.packed, self.bias)

    def cuda_w4_config(self, x: torch.Tensor) -> tuple | None:
        """The cuda_w4 config batch 1 dispatches this layer to, for x [1, K] on its CUDA device; None where another
        kernel (or the CPU / dense / permuted path) runs it."""
        if not (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and self.qweight.device == x.device
                and self.input_perm is None and self.dense_weight is None and self.cpu_weight is None):
            return None
        from edgelm.quantization.int4_kernels import choose_kernel

        choice = choose_kernel(1, self.packed)
        return choice[1] if choice is not None and choice[0] == "cuda_w4" else None

    def forward_silu(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """This layer on silu(gate) · up, given gate ‖ up [1, 2K] itself, where its batch-1 kernel makes the SiLU·mul
        while it stages x (cuda_w4 with SILU in its config: int4_cuda.takes_silu); else None (the caller runs
        SiLU·mul, then the layer)."""
        from edgelm.quantization import int4_cuda

        config = self.cuda_w4_config(gate_up)
        if not (int4_cuda.takes_silu(config) and int4_cuda.supported(gate_up, self.packed)):
            return None
        return int4_cuda.gemv_w4(gate_up, self.packed, self.bias, config, silu=True)

    def forward_glu(self, x: torch.Tensor, norm_in=None) -> torch.Tensor | None:
        """silu(gate) · up [1, N / 2] of this gate ‖ up layer on x [1, K], where its batch-1 kernel makes the SiLU·mul
        in its epilogue (cuda_w4 with GLU in its config: int4_cuda.takes_glu; norm_in as forward_norm's); else None
        (the caller runs the layer, then SiLU·mul)."""
        from edgelm.quantization import int4_cuda

        config = self.cuda_w4_config(x)
        if config is None or not int4_cuda.glu_runs(x, self.packed, config):
            return None
        return int4_cuda.gemv_w4(x, self.packed, self.bias, config, norm=norm_in, glu=True)

    def forward_norm(self, x: torch.Tensor, norm_in) -> torch.Tensor:
        """This layer on RMSNorm(x + residual) (int4_cuda.NormIn; its res_out gets x + residual), the norm made by
        the batch-1 cuda_w4 kernel while it stages x where it can, else apart."""
        from edgelm.quantization import int4_cuda

        config = self.cuda_w4_config(x)
        if config is not None:
            return int4_cuda.gemv_w4(x, self.packed, self.bias, config, norm=norm_in)
        return self(int4_cuda.apply_norm(x, norm_in))

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] > CPU_KERNEL_MAX_ROWS:
            y = nn.functional.linear(x2, dequantize_int4(self.packed, x.dtype))
        else:
            kg = self.cpu_weight.shape[1] * 2
            xb = x2.to(torch.bfloat16)
            if kg > xb.shape[1]:
                xb = nn.functional.pad(xb, (0, kg - xb.shape[1]))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), self.cpu_weight, self.group_size,
                                                            self.cpu_scale_zero).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def set_meta_pairs(model: torch.nn.Module) -> int:
    """Where triton_ops "int4_meta_pairs" is on, give each CUDA Int4Linear its Int4Weight.meta (the scales and
    offsets paired in one int32 a group, for gemv_h2); where it is off, drop them. Returns how many have one."""
    from edgelm.layers import triton_ops

    on = triton_ops.enabled("int4_meta_pairs")
    count = 0
    for module in model.modules():
        if isinstance(module, Int4Linear) and module.qweight.device.type == "cuda":
            module.meta = meta_pairs(module.scales, module.offsets) if on else None
            count += module.meta is not None
    return count


def mark_int4_producers(model: torch.nn.Module) -> int:
    """Set `int4_prep` on the norms and SiLU·mul whose output goes straight into an int4 linear that runs
    the batch-1 GEMV on x as it is (Llama-family decoder layers: input_layernorm → qkv_proj,
    post_attention_layernorm → gate_up_proj, act_fn → down_proj), with the site's name (xprep.wanted).
    Returns how many were marked."""
    def direct(lin) -> bool:
        return (isinstance(lin, Int4Linear) and lin.input_perm is None and lin.packed.group_size >= 128
                and lin.dense_weight is None and lin.cpu_weight is None)

    marked = 0
    for layer in model.modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        pairs = [("qkv", getattr(layer, "input_layernorm", None), getattr(attn, "qkv_proj", None)),
                 ("gate_up", getattr(layer, "post_attention_layernorm", None), getattr(mlp, "gate_up_proj", None)),
                 ("down", getattr(mlp, "act_fn", None), getattr(mlp, "down_proj", None))]
        for site, producer, lin in pairs:
            if producer is not None and direct(lin):
                producer.int4_prep = site
                marked += 1
    return marked
