"""`--torchao-config`: SGLang's values, checked before loading and applied to the loaded model.

int4wo-{32,64,128,256} use edgelm's own int4 kernels (no torchao needed). int8wo, int8dq, fp8wo and
fp8dq-per_{tensor,row} go through torchao's `quantize_`. Only the transformer's linear layers
(edgelm.layers.linear.Linear / MergedLinear) are quantized; embeddings and the lm head are not.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from edgelm.layers.linear import Linear

logger = logging.getLogger(__name__)

INT4_GROUP_SIZES = {f"int4wo-{g}": g for g in (32, 64, 128, 256)}
TORCHAO_ONLY = ("int8wo", "int8dq", "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row")
VALUES = tuple(INT4_GROUP_SIZES) + TORCHAO_ONLY


def _cuda_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def check_torchao_config(cfg: str | None, device: str) -> None:
    """Raise ValueError when `cfg` is unknown or cannot run on `device` (call before loading)."""
    if not cfg:
        return
    if cfg not in VALUES:
        raise ValueError(f"unknown --torchao-config {cfg!r}; choose one of: {', '.join(VALUES)}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--torchao-config {cfg} is not supported on device {device!r}")
    if cfg in INT4_GROUP_SIZES:
        if device == "cuda":
            if importlib.util.find_spec("triton") is None:
                raise ValueError(f"--torchao-config {cfg} on CUDA needs the triton package (pip install triton)")
            if _cuda_capability() < (8, 0):
                major, minor = _cuda_capability()
                raise ValueError(f"--torchao-config {cfg} needs a GPU of compute capability 8.0 or newer "
                                 f"(Ampere, Jetson Orin); this one is {major}.{minor}")
        return
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"--torchao-config {cfg} needs the torchao package, which is not installed "
                         f"(pip install torchao); int4wo-32/64/128/256 work without it")
    if cfg.startswith("fp8"):
        if device == "cpu" and cfg != "fp8wo":
            raise ValueError(f"--torchao-config {cfg} needs a CUDA GPU of compute capability 8.9 or newer "
                             "(dynamic fp8 activations); on the CPU use fp8wo, int8wo or int8dq")
        if device == "cuda" and _cuda_capability() < (8, 9):
            major, minor = _cuda_capability()
            raise ValueError(f"--torchao-config {cfg} needs a GPU of compute capability 8.9 or newer "
                             f"(Ada, Hopper); this one is {major}.{minor}: use int4wo-128 or int8wo")


def _is_target(module: nn.Module) -> bool:
    # Linear and its subclass MergedLinear; the lm head and embeddings are VocabEmbedding
    return isinstance(module, Linear)


def _torchao_config(cfg: str):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
    )

    return {
        "int8wo": lambda: Int8WeightOnlyConfig(),
        "int8dq": lambda: Int8DynamicActivationInt8WeightConfig(),
        "fp8wo": lambda: Float8WeightOnlyConfig(),
        "fp8dq-per_tensor": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()),
        "fp8dq-per_row": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    }[cfg]()


def quantize_int4_model(model: nn.Module, group_size: int, method: str = "search", only: str | None = None,
                        scale_down: bool = True) -> int:
    """Replace every target linear of `model` (whose name ends with `only`, when given) by an
    Int4Linear, one at a time, after down_scale has scaled the MLPs (unless `scale_down` is False or
    EDGELM_INT4_DOWN_SCALE=0); returns how many."""
    from edgelm.quantization import down_scale
    from edgelm.quantization.int4_linear import Int4Linear

    if scale_down and down_scale.enabled() and (not only or only.endswith("down_proj")):
        down_scale.scale_mlps(model, lambda w: Int4Linear.quantize(w, group_size, method), _is_target, group_size)
    names = [name for name, mod in model.named_modules() if _is_target(mod) and (not only or name.endswith(only))]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # no reference to the dense layer outlives this line: its weight is freed before the next one
        setattr(parent, child, Int4Linear.from_linear(getattr(parent, child), group_size, method))
    return len(names)


@torch.no_grad()
def apply_torchao_config(model: nn.Module, cfg: str | None, device: str) -> None:
    """Quantize `model`'s linear layers in place (call after loading)."""
    if not cfg:
        return
    check_torchao_config(cfg, device)
    if cfg in INT4_GROUP_SIZES:
        count = quantize_int4_model(model, INT4_GROUP_SIZES[cfg])
        from edgelm.quantization.int4_linear import cpu_kernel_available, mark_int4_producers

        mark_int4_producers(model)

        where = ("Triton W4A16 kernels" if device == "cuda" else "torch's CPU int4 kernel" if cpu_kernel_available()
                 else "emulated on the CPU (weights kept dense)")
        logger.info("--torchao-config %s: %d linear layers to int4 (group %d), %s", cfg, count,
                    INT4_GROUP_SIZES[cfg], where)
        return
    from torchao.quantization import quantize_

    quantize_(model, _torchao_config(cfg), filter_fn=lambda mod, _name: _is_target(mod))
    logger.info("--torchao-config %s: linear layers quantized by torchao", cfg)
