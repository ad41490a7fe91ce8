"""GGUF files: llama.cpp's tensor names mapped to ours, dequantized at load by the `gguf` package (a 4-bit
linear weight repacked into edgelm's int4 layout instead, where gguf_int4.plan says so).

The config and tokenizer come from transformers' GGUF reader; the tensors are read here so that
loading does not go through transformers' model code.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import numpy as np
import torch

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(f"GGUF tensor {gguf_name!r} is not one edgelm knows")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to HF's (two halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=1)
def open_gguf(path: str):
    """The file's gguf.GGUFReader, kept for the next caller: parsing a file's metadata (its tokenizer's arrays) takes
    seconds, and gguf_int4.plan reads the tensor list just before the weights are read. iterate_gguf_weights drops
    it when done (the reader maps the whole file)."""
    from gguf import GGUFReader

    return GGUFReader(path)


def iterate_gguf_weights(path: str, num_heads: int, num_kv_heads: int, int4_modules=frozenset(),
                         device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """The file's tensors under HF names, dequantized to float32; a linear weight of a model layer in
    `int4_modules` (gguf_int4.plan) instead as that layer's int4 pieces (qweight, scales, offsets) on `device`,
    repacked from its 4-bit blocks."""
    from gguf.quants import dequantize

    from edgelm.model_loader import gguf_int4

    reader = open_gguf(path)
    open_gguf.cache_clear()
    arch = reader.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
        # llama.cpp permutes q/k only for the llama architecture
        heads = None
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = num_heads if "q_proj" in name else num_kv_heads
        if int4_modules and gguf_int4.model_linear(name) in int4_modules:
            codes, s, m = gguf_int4.unpack(tensor.data, tensor.tensor_type, shape[1])
            if heads is not None:  # rows reordered: each row's codes, scales and offsets go with it
                codes, s, m = (_unpermute(a, heads) for a in (codes, s, m))
            packed = gguf_int4.to_int4_weight(codes, s, m, device)
            prefix = name.rpartition(".")[0]
            yield f"{prefix}.qweight", packed.qweight
            yield f"{prefix}.scales", packed.scales
            yield f"{prefix}.offsets", packed.offsets
            continue
        data = dequantize(tensor.data, tensor.tensor_type)
        data = np.ascontiguousarray(data.reshape(shape), dtype=np.float32)
        if heads is not None:
            data = _unpermute(data, heads)
        if not data.flags.writeable:  # an unquantized tensor is a view of the read-only file map
            data = data.copy()
        yield name, torch.from_numpy(data)
