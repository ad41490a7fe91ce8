"""Build a model and fill its weights: sharded safetensors, a GGUF file, or random (dummy)."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from edgelm.layers.linear import linear_weights_on_meta
from edgelm.model_config import ModelConfig
from edgelm.models.registry import resolve_model_class

logger = logging.getLogger(__name__)


def iterate_safetensors(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}; edgelm does not read .bin checkpoints")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _fill_dummy(model: nn.Module, seed: int = 0) -> None:
    """Random weights where they live: drawn in row blocks of float32 on the weights' device, so an
    8B model fills in about a second on a GPU and needs little extra memory."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.data.fill_(1.0 if "norm" in name else 0.0)
            continue
        dev = param.device
        if dev not in gens:
            gens[dev] = torch.Generator(device=dev).manual_seed(seed)
        rows = param.shape[0]
        step = max(1, (1 << 24) // max(1, param[0].numel()))
        for start in range(0, rows, step):
            block = torch.randn(param[start : start + step].shape, generator=gens[dev], device=dev) * 0.02
            param.data[start : start + step].copy_(block)


def load_model(config: ModelConfig, device: str, load_format: str = "auto", prequant=None) -> nn.Module:
    """`prequant` (edgelm.quantization.prequantized.PrequantConfig): the linear layers are built empty
    in edgelm's int4 layout and filled from the checkpoint: repacked from an AWQ/GPTQ checkpoint, or
    (method "int4wo", --torchao-config int4wo-G) quantized one tensor at a time as they are read, or a GGUF's 4-bit
    blocks repacked (method "gguf", model_loader.gguf_int4)."""
    cls = resolve_model_class(config.hf_config.architectures)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.dtype)
    try:
        with torch.device(device), (linear_weights_on_meta() if prequant else contextlib.nullcontext()):
            model = cls(config.hf_config)
        if prequant:
            from edgelm.quantization import prequantized

            count = prequantized.prepare_model(model, prequant, config.dtype, device)
            if prequant.method == "int4wo":
                logger.info("--torchao-config int4wo-%d: %d linear layers quantized to int4 as they load",
                            prequant.group_size, count)
            elif prequant.method != "gguf":  # (gguf_int4.log_plan told the GGUF's split before loading)
                logger.info("%s checkpoint (group %d): %d linear layers load as int4", prequant.method.upper(),
                            prequant.group_size, count)
    finally:
        torch.set_default_dtype(old_dtype)
    if load_format == "dummy":
        _fill_dummy(model)
        if prequant:
            prequantized.fill_dummy(model)
    elif config.source.gguf_file:
        from edgelm.model_loader.gguf_loader import iterate_gguf_weights

        weights = iterate_gguf_weights(config.source.gguf_path, config.num_heads, config.num_kv_heads,
                                       prequant.stored_int4 if prequant else frozenset(), device)
        if prequant and prequant.method == "int4wo":  # the dequantized tensors quantized again
            weights = prequantized.quantize_stream(weights, model, prequant, config.dtype, device)
        model.load_weights(weights)
    else:
        if load_format == "gguf":
            raise ValueError("--load-format gguf needs a .gguf --model-path")
        weights = iterate_safetensors(config.source.directory)
        if prequant and prequant.method == "int4wo":
            weights = prequantized.quantize_stream(weights, model, prequant, config.dtype, device)
        elif prequant:
            weights = prequantized.convert_stream(weights, prequant, device)
        model.load_weights(weights)
    if prequant:
        prequantized.finish_model(model)
    return model.eval()
