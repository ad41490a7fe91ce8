"""Pre-quantized 4-bit checkpoints (AWQ, GPTQ) loaded into edgelm's int4 layout and kernels.

A checkpoint whose config.json has a ``quantization_config`` of ``quant_method`` "awq" or "gptq" with
4 bits is detected at load (``--quantization awq|gptq`` only confirms it). Its codes, zero points and
scales are repacked into the layout of ``int4_pack`` — ``w = q·s + m`` with ``m = -z·s`` — so the
same kernels as ``--torchao-config int4wo-*`` run them, CUDA graphs included. The dense weights are
never built: the linear layers are constructed on the meta device and replaced by empty Int4Linear
layers before the first tensor is read.

The two formats, for a linear of K inputs and N outputs and groups of G inputs:

- AWQ (AutoAWQ "gemm"): ``qweight`` int32 [K, N/8] packed along the outputs, eight to a word in the
  interleaved order 0 2 4 6 1 3 5 7 (nibble i of word c holds output 8c + ORDER[i]); ``qzeros`` int32
  [K/G, N/8] packed the same way; ``scales`` fp16 [K/G, N]. ``w = (q - z)·s``.
- GPTQ (AutoGPTQ / GPTQModel): ``qweight`` int32 [K/8, N] packed along the inputs (nibble i of row r
  holds input 8r + i); ``qzeros`` int32 [K/G, N/8] packed along the outputs in plain order; ``scales``
  fp16 [K/G, N]; ``g_idx`` int32 [K], the group of each input. Format "gptq" (v1) stores z - 1,
  "gptq_v2" stores z. With act-order (``desc_act``) the groups are not contiguous in input order: the
  inputs are permuted so that they are (``input_perm``, applied to x before the kernel).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from edgelm.quantization.int4_pack import BLOCK_K, GROUP_SIZES, Int4Weight, pack_int4, padded_in_features

logger = logging.getLogger(__name__)

METHODS = ("awq", "gptq")
# SGLang/vLLM names of the same formats with other kernels: they load into edgelm's kernels too
ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_UNORDER = tuple(AWQ_ORDER.index(j) for j in range(8))  # output j of a word is in nibble AWQ_UNORDER[j]
_SHIFTS = tuple(range(0, 32, 4))


class PrequantizedError(ValueError):
    pass


@dataclass(frozen=True)
class PrequantConfig:
    method: str  # "awq" or "gptq"; "int4wo": a 16-bit checkpoint quantized as it is read (--torchao-config);
    # "gguf": a GGUF's 4-bit blocks repacked (gguf_int4)
    group_size: int  # the checkpoint's; -1: one group per output row (all K inputs)
    zero_offset: int  # added to the stored zero points: 1 for GPTQ v1, else 0
    desc_act: bool  # GPTQ act-order: inputs permuted
    skip_modules: tuple[str, ...] = ()  # AWQ modules_to_not_convert: left dense
    int4_modules: frozenset[str] | None = None  # "gguf": exactly these linear layers are int4 (gguf_int4.plan)
    # a GGUF's layers loaded from its 4-bit blocks as stored (gguf_int4.plan): "gguf"'s int4 layers, or with
    # "int4wo" at group 32 those of its layers that are 4-bit in the file (the others quantized as they are read)
    stored_int4: frozenset[str] = frozenset()

    def kernel_group(self, in_features: int) -> int:
        """Group size of edgelm's layout: the checkpoint's, or for a larger group (or per-row scales)
        128 with each scale repeated (exact: every group of 128 lies inside one checkpoint group)."""
        g = in_features if self.group_size == -1 else self.group_size
        if g in GROUP_SIZES:
            return g
        if g % BLOCK_K == 0 or self.group_size == -1:
            return BLOCK_K
        raise PrequantizedError(f"{self.method} group size {g} is not supported: edgelm's int4 kernels take "
                                f"groups of {', '.join(map(str, GROUP_SIZES))} or multiples of {BLOCK_K}")

    def skips(self, module_name: str) -> bool:
        if self.int4_modules is not None and module_name not in self.int4_modules:
            return True
        return any(s in module_name for s in self.skip_modules)


def quantize_on_load(group_size: int) -> PrequantConfig:
    """--torchao-config int4wo-G: each dense linear weight is quantized as the checkpoint stream
    delivers it (quantize_stream), so the dense model never exists in memory at once."""
    return PrequantConfig("int4wo", group_size, 0, False)


def gguf_as_stored(int4_modules: frozenset[str]) -> PrequantConfig:
    """A GGUF whose 4-bit linear weights load as stored (model_loader.gguf_int4): group 32, those layers only."""
    return PrequantConfig("gguf", 32, 0, False, int4_modules=frozenset(int4_modules),
                          stored_int4=frozenset(int4_modules))


def _get(obj, key, default=None):
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


# the files older AutoGPTQ / AutoAWQ checkpoints keep their settings in (no quant_method inside)
_LEGACY_FILES = {"quantize_config.json": "gptq", "quant_config.json": "awq"}


def legacy_quantization_config(directory: str | None) -> dict | None:
    """quantize_config.json (AutoGPTQ) or quant_config.json (AutoAWQ), with its quant_method added."""
    import json

    for name, method in _LEGACY_FILES.items():
        path = os.path.join(directory, name) if directory else None
        if path and os.path.isfile(path):
            with open(path) as f:
                return {"quant_method": method, **json.load(f)}
    return None


def prequant_config(hf_config, requested: str | None = None, directory: str | None = None) -> PrequantConfig | None:
    """The checkpoint's 4-bit format from its config.json (or, for older AutoGPTQ / AutoAWQ
    checkpoints, quantize_config.json / quant_config.json in `directory`), or None for an
    unquantized checkpoint.

    `requested` is --quantization: it must agree with the checkpoint. Formats edgelm cannot load
    (other bit widths, AWQ's gemv layout, a quantized lm head) are refused with the reason."""
    requested = ALIASES.get(requested, requested) if requested else None
    if requested is not None and requested not in METHODS:
        raise PrequantizedError(f"--quantization {requested!r} is not supported; edgelm loads "
                                f"{' and '.join(METHODS)} checkpoints (and quantizes others with --torchao-config)")
    qcfg = _get(hf_config, "quantization_config") or legacy_quantization_config(directory)
    if qcfg is None:
        if requested is not None:
            raise PrequantizedError(f"--quantization {requested}: the checkpoint's config.json has no "
                                    "quantization_config; it is not an AWQ/GPTQ checkpoint")
        return None
    method = str(_get(qcfg, "quant_method", "")).lower()
    method = ALIASES.get(method, method)
    if method not in METHODS:
        raise PrequantizedError(f"the checkpoint is quantized with {method!r}, which edgelm cannot load; "
                                f"it loads {' and '.join(METHODS)} 4-bit checkpoints")
    if requested is not None and requested != method:
        raise PrequantizedError(f"--quantization {requested} but the checkpoint is {method}")
    bits = int(_get(qcfg, "bits", None) or _get(qcfg, "w_bit", 0))
    if bits != 4:
        raise PrequantizedError(f"{method} with {bits} bits: edgelm's kernels take 4-bit checkpoints only")
    group = int(_get(qcfg, "group_size", None) or _get(qcfg, "q_group_size", 128))
    if group <= 0:
        group = -1
    if method == "awq":
        version = str(_get(qcfg, "version", "gemm")).lower()
        if version != "gemm":
            raise PrequantizedError(f"AWQ version {version!r}: edgelm loads the 'gemm' layout (AutoAWQ's default)")
        if not _get(qcfg, "zero_point", True):
            raise PrequantizedError("AWQ without zero points is not supported")
        skip = tuple(_get(qcfg, "modules_to_not_convert", None) or ())
        return PrequantConfig("awq", group, 0, False, skip)
    if _get(qcfg, "lm_head", False):
        raise PrequantizedError("this GPTQ checkpoint quantizes the lm head, which edgelm keeps in 16 bits")
    if _get(qcfg, "dynamic", None):
        raise PrequantizedError("GPTQ checkpoints with per-module 'dynamic' settings are not supported")
    if _get(qcfg, "is_marlin_format", False):
        raise PrequantizedError("this GPTQ checkpoint is saved in Marlin's packing; edgelm loads the plain GPTQ "
                                "packing (checkpoint_format gptq or gptq_v2)")
    fmt = str(_get(qcfg, "checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise PrequantizedError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
    return PrequantConfig("gptq", group, 1 if fmt == "gptq" else 0, bool(_get(qcfg, "desc_act", False)))


def check_device(pcfg: PrequantConfig, device: str) -> None:
    """Refuse, before loading, a device the int4 kernels cannot run on (CPU: dequantized once, dense)."""
    if device != "cuda":
        return
    if importlib.util.find_spec("triton") is None:
        raise PrequantizedError(f"{pcfg.method.upper()} checkpoints on CUDA need the triton package (pip install triton)")
    if torch.cuda.get_device_capability() < (8, 0):
        major, minor = torch.cuda.get_device_capability()
        raise PrequantizedError(f"{pcfg.method.upper()} checkpoints run on edgelm's int4 kernels, which need a GPU "
                                f"of compute capability 8.0 or newer (Ampere, Jetson Orin); this one is {major}.{minor}")


# ---- unpacking the checkpoint formats ----

def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] → int32 [..., W, 8]: nibble i of each word (bits 4i..4i+3)."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    return (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF


def _unpack_outputs(packed: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """[R, N/8] words packed along the outputs → [R, N] (AWQ's interleaved order or the plain one)."""
    nib = _nibbles(packed)
    if order is not None:
        nib = nib[..., list(order)]
    return nib.reshape(packed.shape[0], -1)


def unpack_awq(qweight, qzeros) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] and zero points [K/G, N] of an AWQ gemm linear."""
    return _unpack_outputs(qweight, AWQ_UNORDER).t(), _unpack_outputs(qzeros, AWQ_UNORDER)


def unpack_gptq(qweight, qzeros, zero_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] and zero points [K/G, N] of a GPTQ linear. v1 zero points are stored minus one,
    so a stored 15 means 16 (what AutoGPTQ's own kernels compute too)."""
    rows, n = qweight.shape
    codes = _nibbles(qweight.t()).reshape(n, rows * 8)  # [N, K/8, 8]: nibble i of row r is input 8r + i
    return codes, _unpack_outputs(qzeros, None) + zero_offset


def to_int4_weight(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int, kernel_group: int,
                   g_idx: torch.Tensor | None = None) -> tuple[Int4Weight, torch.Tensor | None]:
    """edgelm's packed weight for codes [N, K], zero points and scales [num_groups, N], and the input
    permutation to apply to x (None when the groups are contiguous: always, without act-order).

    w[n, k] = (codes[n, k] - zeros[g(k), n]) · scales[g(k), n] becomes q·s + m with s = scales,
    m = -zeros·s (computed in fp32, stored fp16 like every int4 layer's offsets)."""
    n, k = codes.shape
    group = k if group == -1 else group
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64).flatten()[:k]
        contiguous = torch.arange(k, device=g_idx.device) // group
        if not torch.equal(g_idx, contiguous):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], contiguous):
                raise PrequantizedError(f"g_idx does not put {group} inputs in every group: cannot repack")
            codes = codes[:, perm]
    kp = padded_in_features(k)
    num_groups = -(-kp // kernel_group)
    # checkpoint group of each kernel group; those wholly in the padding past K take the last
    src = (torch.arange(num_groups, device=codes.device) * kernel_group // group).clamp(max=scales.shape[0] - 1)
    s = scales.float()[src].t()  # [N, num_groups]
    m = -(zeros.float()[src].t() * s)
    pad_groups = torch.arange(num_groups, device=codes.device) * kernel_group >= k
    s[:, pad_groups], m[:, pad_groups] = 2.0**-24, 0.0
    q = torch.zeros(n, kp, dtype=torch.int32, device=codes.device)
    q[:, :k] = codes
    return Int4Weight(pack_int4(q), s.half(), m.half(), k, kernel_group), perm


# ---- the model side: empty int4 layers, the checkpoint stream, dummy weights ----

def _row_loader(module):
    def load(param, loaded: torch.Tensor, shard: str | None = None) -> None:
        target = param.data if shard is None else param.data.narrow(0, *module.shard_offsets[shard])
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard}: {tuple(target.shape)} in the model vs {tuple(loaded.shape)} "
                             "in the checkpoint")
        target.copy_(loaded)
    return load


def _perm_loader(module):
    def load(buf, loaded: torch.Tensor, shard: str | None = None) -> None:
        # merged layers (q/k/v, gate/up) read one x: their shards must agree on its permutation
        if module.perm_loaded and not torch.equal(buf.cpu(), loaded.cpu()):
            raise PrequantizedError(f"the act-order permutations of the shards merged into one layer differ "
                                    f"(shard {shard}); edgelm cannot merge them")
        buf.copy_(loaded)
        module.perm_loaded = True
    return load


def empty_int4_linear(linear: nn.Module, pcfg: PrequantConfig, dtype: torch.dtype, device) -> nn.Module:
    """An Int4Linear of `linear`'s shape (and shards) with uninitialized packed buffers that the
    checkpoint stream fills; `linear` was built on the meta device."""
    from edgelm.quantization.int4_linear import Int4Linear

    k, n = linear.in_features, linear.out_features
    g = pcfg.kernel_group(k)
    kp = padded_in_features(k)
    packed = Int4Weight(torch.zeros(n, kp // 8, dtype=torch.int32, device=device),
                        torch.ones(n, -(-kp // g), dtype=torch.float16, device=device),
                        torch.zeros(n, -(-kp // g), dtype=torch.float16, device=device), k, g)
    bias = None if linear.bias is None else torch.zeros(n, dtype=dtype, device=device)
    module = Int4Linear(packed, bias, dtype, dense=False)
    module.shard_offsets = getattr(linear, "shard_offsets", None)
    for tensor in (module.qweight, module.scales, module.offsets) + (() if bias is None else (module.bias,)):
        tensor.weight_loader = _row_loader(module)
    if pcfg.desc_act:
        module.input_perm = torch.arange(k, device=device)
        module.input_perm.weight_loader = _perm_loader(module)
    return module


def prepare_model(model: nn.Module, pcfg: PrequantConfig, dtype: torch.dtype, device) -> int:
    """Replace the decoder's linear layers (built on meta) by empty int4 layers; those the checkpoint
    leaves unquantized get real dense weights. Returns how many are int4."""
    from edgelm.layers.linear import Linear

    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        if pcfg.skips(name):
            module.materialize(device, dtype)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, empty_int4_linear(module, pcfg, dtype, device))
        count += 1
    return count


def _fold_down_perm(model: nn.Module) -> None:
    """down_proj reads silu(gate)·up, elementwise in its inputs: its act-order permutation P is the
    same as taking gate_up's output rows (gate and up each) in the order P. Reorder those rows once
    and down_proj needs no gather of x."""
    from edgelm.quantization.int4_linear import Int4Linear

    modules = dict(model.named_modules())
    for name, down in modules.items():
        if not (name.endswith("mlp.down_proj") and isinstance(down, Int4Linear) and down.input_perm is not None):
            continue
        gate_up = modules.get(name[: -len("down_proj")] + "gate_up_proj")
        offsets = getattr(gate_up, "shard_offsets", None) or {}
        if not isinstance(gate_up, Int4Linear) or set(offsets) != {"gate", "up"}:
            continue
        (g0, gn), (u0, un) = offsets["gate"], offsets["up"]
        perm = down.input_perm
        if gn != un or gn != perm.numel():
            continue
        rows = torch.cat([g0 + perm, u0 + perm])
        for buf in ("qweight", "scales", "offsets"):
            setattr(gate_up, buf, getattr(gate_up, buf).index_select(0, rows).contiguous())
        if gate_up.bias is not None:
            gate_up.bias.data = gate_up.bias.data.index_select(0, rows)
        down.input_perm = None


def finish_model(model: nn.Module) -> None:
    """After loading: down_proj's act-order permutation folded into gate_up's rows; an identity
    permutation dropped; CPU layers prepare their kernel layout (see Int4Linear); the norms and
    SiLU·mul feeding int4 GEMVs marked (mark_int4_producers)."""
    from edgelm.quantization.int4_linear import Int4Linear, mark_int4_producers

    _fold_down_perm(model)
    for module in model.modules():
        if isinstance(module, Int4Linear):
            perm = module.input_perm
            if perm is not None and torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
                module.input_perm = None
            module.finish_loading()
    mark_int4_producers(model)


_PIECES = ("qweight", "qzeros", "scales")  # of every quantized linear, AWQ and GPTQ alike


def convert_stream(weights: Iterable[tuple[str, torch.Tensor]], pcfg: PrequantConfig,
                   device) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with every quantized linear's pieces (qweight, qzeros, scales, g_idx)
    replaced by edgelm's (qweight, scales, offsets[, input_perm]), converted on `device`. Pieces are
    held until a linear's last one arrives (safetensors keeps a layer's tensors together)."""
    needed = _PIECES + (("g_idx",) if pcfg.desc_act else ())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, piece = name.rpartition(".")
        if piece not in ("qweight", "qzeros", "scales", "g_idx"):
            yield name, tensor
            continue
        if piece == "g_idx" and not pcfg.desc_act:
            continue  # contiguous groups: g_idx is k // group_size, nothing to read
        parts = pending.setdefault(prefix, {})
        parts[piece] = tensor.to(device)
        if all(p in parts for p in needed):
            del pending[prefix]
            yield from _convert_linear(prefix, parts, pcfg)
    if pending:
        prefix, parts = next(iter(pending.items()))
        raise PrequantizedError(f"{len(pending)} quantized linears lack pieces in the checkpoint, e.g. {prefix} "
                                f"has only {sorted(parts)} of {list(needed)}")


def _convert_linear(prefix: str, parts: dict[str, torch.Tensor], pcfg: PrequantConfig):
    for piece in ("qweight", "qzeros"):
        if parts[piece].dtype != torch.int32:
            raise PrequantizedError(f"{prefix}.{piece} is {parts[piece].dtype}: edgelm reads codes packed in int32 "
                                    "words (GPTQModel's pack_dtype int32, AutoAWQ's default)")
    if pcfg.method == "awq":
        codes, zeros = unpack_awq(parts["qweight"], parts["qzeros"])
    else:
        codes, zeros = unpack_gptq(parts["qweight"], parts["qzeros"], pcfg.zero_offset)
    n, k = codes.shape
    scales = parts["scales"]
    group = k if pcfg.group_size == -1 else pcfg.group_size
    if scales.shape != (-(-k // group), n) or zeros.shape[0] != scales.shape[0]:
        raise PrequantizedError(f"{prefix}: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} do not "
                                f"fit {n} outputs × {k} inputs in groups of {group}")
    packed, perm = to_int4_weight(codes, zeros[:, :n], scales, pcfg.group_size, pcfg.kernel_group(k),
                                  parts.get("g_idx"))
    yield from _packed_pieces(prefix, packed)
    if pcfg.desc_act:
        yield f"{prefix}.input_perm", perm if perm is not None else torch.arange(k, device=codes.device)


@torch.no_grad()
def quantize_stream(weights: Iterable[tuple[str, torch.Tensor]], model: nn.Module, pcfg: PrequantConfig,
                    dtype: torch.dtype, device) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with the weight of every linear that is an Int4Linear in `model`
    replaced by its int4 form (qweight, scales, offsets), quantized on `device` one tensor at a time:
    the numbers Int4Linear.from_linear gives (rows are quantized independently, so a q/k/v or
    gate/up shard quantized alone equals its rows of the merged layer). A layer's gate, up and down
    weights wait for each other and the post-attention norm weight, then are quantized after
    down_scale (as quantize_int4_model does after loading)."""
    from edgelm.quantization import down_scale
    from edgelm.quantization.int4_linear import Int4Linear

    modules = dict(model.named_modules())
    int4 = {name for name, module in modules.items() if isinstance(module, Int4Linear)}

    def pack(tensor: torch.Tensor) -> Int4Weight:
        return Int4Linear.quantize(tensor.to(device=device, dtype=dtype), pcfg.group_size)

    def quantize(name: str, tensor: torch.Tensor):
        return _packed_pieces(name.rpartition(".")[0], pack(tensor))

    # down_scale: a layer's gate, up and down weights (and its post-attention norm weight) are held
    # until all have arrived, then quantized together; the norm weight passes through at once
    mlps: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    route = getattr(model, "_route", lambda n: (n, None))
    for name, tensor in weights:
        piece = name.rpartition(".")[2]
        target, shard = route(name)
        module = target.rpartition(".")[0]
        part = _mlp_part(module, shard, piece, modules, pcfg.stored_int4) if down_scale.enabled() else None
        if part is not None:
            layer = module.rpartition(".mlp.")[0] if ".mlp." in module else module.rpartition(".")[0]
            held = mlps.setdefault(layer, {})
            held[part] = (name, tensor)
            if part == "norm":
                yield name, tensor
            if {"gate", "up", "down", "norm"} <= held.keys():
                yield from _scaled_mlp(mlps.pop(layer), pack, quantize, device, dtype, pcfg.group_size)
            continue
        if piece != "weight" or module not in int4:
            yield name, tensor
            continue
        yield from quantize(name, tensor)
    for held in mlps.values():  # layers whose pieces did not all come: quantized as they are
        for part, (name, tensor) in held.items():
            if part != "norm":
                yield from quantize(name, tensor)


def _mlp_part(module: str, shard: str | None, piece: str, modules: dict, stored=frozenset()) -> str | None:
    """"gate", "up", "down" or "norm" where a checkpoint tensor is one down_scale needs: the weight of
    an int4 MLP's gate/up shard or down_proj (the MLP unbiased, both linears int4, neither loaded as stored from
    a GGUF's 4-bit blocks: those are kept as they are), or the post-attention norm weight of a layer with such an
    MLP; else None."""
    from edgelm.quantization import down_scale
    from edgelm.quantization.int4_linear import Int4Linear

    if piece != "weight":
        return None
    if module.endswith(".post_attention_layernorm"):
        mlp = module.rpartition(".")[0] + ".mlp"
    elif module.endswith((".mlp.gate_up_proj", ".mlp.down_proj")):
        mlp = module.rpartition(".")[0]
    else:
        return None
    if mlp + ".gate_up_proj" in stored or mlp + ".down_proj" in stored:
        return None
    gate_up, down = modules.get(mlp + ".gate_up_proj"), modules.get(mlp + ".down_proj")
    if not (isinstance(gate_up, Int4Linear) and isinstance(down, Int4Linear) and down_scale.applies(gate_up, down)):
        return None
    if module.endswith(".post_attention_layernorm"):
        return "norm"
    if module.endswith(".down_proj"):
        return "down"
    return shard if shard in ("gate", "up") else None


def _scaled_mlp(held: dict, pack, quantize, device, dtype, group_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """One layer's gate, up and down weights (held by quantize_stream) quantized, down_scale applied."""
    from edgelm.quantization import down_scale

    (gate_name, gate), (up_name, up), (down_name, down) = held["gate"], held["up"], held["down"]
    gate, up, down = (t.to(device=device, dtype=dtype) for t in (gate, up, down))
    rms = down_scale.channel_rms(gate, up, held["norm"][1].to(device))
    s = down_scale.choose(down, rms, pack, group_size)
    if s is not None:
        up, down = down_scale.scaled_pair(up, down, s)
    yield from quantize(gate_name, gate)
    yield from quantize(up_name, up)
    yield from quantize(down_name, down)


def _packed_pieces(prefix: str, packed: Int4Weight):
    """The tensors an empty Int4Linear's loaders take, under the checkpoint linear's name."""
    yield f"{prefix}.qweight", packed.qweight
    yield f"{prefix}.scales", packed.scales
    yield f"{prefix}.offsets", packed.offsets


@torch.no_grad()
def fill_dummy(model: nn.Module, seed: int = 0) -> None:
    """Random int4 layers for --load-format dummy: uniform codes, scales of a 0.02-wide weight."""
    from edgelm.quantization.int4_linear import Int4Linear

    gen = None
    for module in model.modules():
        if isinstance(module, Int4Linear):
            if gen is None:
                gen = torch.Generator(device=module.qweight.device).manual_seed(seed)
            n, words = module.qweight.shape
            step = max(1, (1 << 24) // (words * 8))
            for start in range(0, n, step):
                rows = min(step, n - start)
                codes = torch.randint(0, 16, (rows, words * 8), generator=gen, device=module.qweight.device)
                module.qweight[start:start + rows] = pack_int4(codes)
            module.scales.fill_(0.02 / 8)
            module.offsets.fill_(-0.02)
