"""A GGUF's 4-bit linear weights loaded as they are stored, into edgelm's int4 layout and kernels.

llama.cpp's 4-bit block formats are all of the form ``w = q·s + m`` over groups of 32 inputs, q in 0..15 —
the form of edgelm's int4 layout (int4_pack) with group 32. So their codes are repacked, not requantized,
and the weights the kernels see are the file's:

- Q4_0 (18 bytes a block of 32): fp16 ``d``, 16 bytes of codes; ``w = (q - 8)·d``: s = d, m = -8·d (exact).
- Q4_1 (20 bytes): fp16 ``d`` and ``m``, 16 bytes of codes; ``w = q·d + m`` (exact).
- Q4_K (144 bytes a super-block of 256): fp16 ``d`` and ``dmin``, 12 bytes holding eight 6-bit scales and
  eight 6-bit mins, 128 bytes of codes; sub-block j: ``w = q·(d·sc_j) - dmin·mn_j``: s and m are those
  products, rounded to fp16 (edgelm keeps 16-bit scales; relative error ≤ 2⁻¹¹ of a scale).

In both 32-block formats byte i of a block holds input i in its low nibble and input i + 16 in its high one;
in Q4_K byte l of each 32-byte chunk c holds input 64c + l (low) and 64c + 32 + l (high).

A linear layer of the model runs on the int4 kernels when every tensor it is built from is one of these
(q, k, v all 4-bit for qkv_proj; gate and up for gate_up_proj); otherwise (a Q6_K v or down, as in
llama.cpp's Q4_K_M mixes, or Q8_0, F16 ...) it is dequantized to --dtype as before. The embedding and the
LM head are always dequantized. `--dequantize-gguf` turns the whole path off.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch

from edgelm.quantization.int4_pack import Int4Weight, pack_int4, padded_in_features

logger = logging.getLogger(__name__)

GROUP = 32
# the checkpoint linears merged into one model linear (edgelm.models.llama), by the HF name's last part
_MERGED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
           "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_LINEAR = re.compile(r"(model\.layers\.\d+\.(?:self_attn|mlp))\.(\w+_proj)\.weight")


def int4_types() -> dict:
    """The gguf package's type ids of the formats loaded as int4, with their (inputs, bytes) a block."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    return {t: GGML_QUANT_SIZES[t] for t in (T.Q4_0, T.Q4_1, T.Q4_K)}


def model_linear(hf_name: str) -> str | None:
    """The model's linear layer that a checkpoint weight goes into (q/k/v → qkv_proj, gate/up → gate_up_proj),
    or None for a tensor that is not a decoder linear's weight (norms, embedding, LM head, biases)."""
    m = _LINEAR.fullmatch(hf_name)
    if not m:
        return None
    return f"{m.group(1)}.{_MERGED.get(m.group(2), m.group(2))}"


@dataclass(frozen=True)
class GGUFInt4Plan:
    """Which of the model's linear layers load as int4 from a GGUF, and what that saves."""
    int4_modules: frozenset[str]
    dense_modules: frozenset[str]  # linear layers with a tensor in another format: dequantized
    dense_types: tuple[str, ...]  # the formats that kept them dense
    int4_weights: int  # weights (elements) of the int4 layers
    dense_weights: int = 0  # weights (elements) of the dense ones

    def loaded_bytes(self, dense_bytes_per_weight: int) -> tuple[int, int]:
        """(bytes of the int4 layers as loaded, bytes they would take dense): the codes and an fp16 scale and
        offset a group of 32 (padding to 128 inputs aside)."""
        return int4_bytes(self.int4_weights), self.int4_weights * dense_bytes_per_weight

    def requantize_saving(self, dense_bytes_per_weight: int) -> int:
        """Bytes --torchao-config int4wo-32 saves by quantizing the dense layers too (group 32, as the others)."""
        return self.dense_weights * dense_bytes_per_weight - int4_bytes(self.dense_weights)


def int4_bytes(weights: int) -> int:
    """Bytes of that many weights in int4 at group 32: the codes and an fp16 scale and offset a group."""
    return weights // 2 + weights // GROUP * 4


def plan(path: str) -> GGUFInt4Plan:
    """Read the GGUF's tensor list (not its data) and decide, per model linear, int4 or dense."""
    from edgelm.model_loader.gguf_loader import hf_name, open_gguf

    types = int4_types()
    parts: dict[str, list] = {}
    sizes: dict[str, int] = {}
    for tensor in open_gguf(path).tensors:
        try:
            module = model_linear(hf_name(tensor.name))
        except KeyError:
            continue
        if module is None:
            continue
        parts.setdefault(module, []).append(tensor.tensor_type)
        sizes[module] = sizes.get(module, 0) + int(tensor.n_elements)
    int4 = {m for m, ts in parts.items() if all(t in types for t in ts)}
    dense = set(parts) - int4
    dense_types = sorted({t.name for m in dense for t in parts[m] if t not in types})
    return GGUFInt4Plan(frozenset(int4), frozenset(dense), tuple(dense_types), sum(sizes[m] for m in int4),
                        sum(sizes[m] for m in dense))


def unpack(raw: np.ndarray, qtype, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 4-bit tensor's bytes [rows, row bytes] → codes uint8 [rows, k], scales and offsets float32
    [rows, k / 32] with w = codes·s + m (group g of 32 inputs: s[:, g], m[:, g])."""
    from gguf import GGMLQuantizationType as T

    types = int4_types()
    block, nbytes = types[qtype]
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, k // block, nbytes)
    if qtype in (T.Q4_0, T.Q4_1):
        d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if qtype == T.Q4_0:
            m, qs = -8.0 * d, b[..., 2:18]
        else:
            m, qs = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32), b[..., 4:20]
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # [rows, blocks, 32]: inputs 0-15, then 16-31
        return codes.reshape(rows, k), d, m
    # Q4_K: super-blocks of 256, eight sub-blocks of 32
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc_bytes = b[..., 4:16].astype(np.uint16)
    qs = b[..., 16:144].reshape(rows, k // block, 4, 32)
    lo, hi = sc_bytes[..., 0:4], sc_bytes[..., 4:8]
    tail = sc_bytes[..., 8:12]
    sc = np.concatenate([lo & 63, (tail & 0xF) | ((lo >> 6) << 4)], axis=-1)  # sub-blocks 0-3, 4-7
    mn = np.concatenate([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], axis=-1)
    s = d[..., None] * sc.astype(np.float32)  # [rows, supers, 8]
    m = -(dmin[..., None] * mn.astype(np.float32))
    # chunk c: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1
    codes = np.stack([qs & 0xF, qs >> 4], axis=3)  # [rows, supers, 4, 2, 32]
    return codes.reshape(rows, k), s.reshape(rows, -1), m.reshape(rows, -1)


def to_int4_weight(codes: np.ndarray, s: np.ndarray, m: np.ndarray, device) -> Int4Weight:
    """edgelm's packed int4 weight (group 32) of unpack's output."""
    n, k = codes.shape
    kp = padded_in_features(k)
    q = torch.zeros(n, kp, dtype=torch.int32, device=device)
    q[:, :k] = torch.from_numpy(codes.astype(np.int32)).to(device)
    groups = kp // GROUP
    scales = torch.full((n, groups), 2.0**-24, dtype=torch.float32)  # the padding's groups: never read
    offsets = torch.zeros(n, groups, dtype=torch.float32)
    scales[:, : k // GROUP] = torch.from_numpy(s)
    offsets[:, : k // GROUP] = torch.from_numpy(m)
    return Int4Weight(pack_int4(q), scales.half().to(device), offsets.half().to(device), k, GROUP)


def log_plan(p: GGUFInt4Plan, dtype: torch.dtype, requantize_hint: bool = True) -> None:
    """The split at start-up; requantize_hint: say what --torchao-config int4wo-32 would save on the dense layers
    (a Q4_K_M file's Q6_K ones), where no --torchao-config was given."""
    itemsize = torch.finfo(dtype).bits // 8
    loaded, dense = p.loaded_bytes(itemsize)
    logger.info("GGUF: %d linear layers load as int4 as stored (Q4_0/Q4_1/Q4_K, group 32): %.0f MB instead of "
                "%.0f MB dequantized", len(p.int4_modules), loaded / 1e6, dense / 1e6)
    if p.dense_modules:
        logger.info("GGUF: %d linear layers dequantized to %s (a part stored as %s), e.g. %s",
                    len(p.dense_modules), str(dtype).replace("torch.", ""), ", ".join(p.dense_types),
                    sorted(p.dense_modules)[0])
        if requantize_hint:
            saved = p.requantize_saving(itemsize)
            logger.info("GGUF: --torchao-config int4wo-32 would load those as int4 too (re-quantized from %s, "
                        "a small quality cost): %.0f MB less", ", ".join(p.dense_types), saved / 1e6)
