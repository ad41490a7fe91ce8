"""How many bytes a model's weights take in memory, from its config alone (nothing is loaded).

Counts the parameters of a decoder-only transformer (Llama, Qwen2, Qwen3, Mistral and their MoE
variants) from an HF config, then prices each group:

- embeddings and lm_head stay in the (16-bit) dtype (with --quantize-lm-head int8 the head is int8 + a
  float32 scale a row, and a tied embedding is that same table);
- the linear layers inside the decoder (q/k/v/o, gate/up/down) take the dtype, or with
  --torchao-config: int4wo-G (edgelm's int4 kernels, edgelm.quantization.int4_pack) = 4 bits a
  weight, inputs padded to a multiple of 128, + an fp16 scale and offset per group of G inputs per
  output (on the CPU the dense weight is kept too); int8wo / int8dq = 1 byte + a 16-bit scale per
  output; fp8wo / fp8dq-per_row = 1 byte + a float32 scale per output; fp8dq-per_tensor = 1 byte
  + one scale (torchao);
- biases and norms stay in the dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_DTYPE_BYTES = {"half": 2, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4,
                "float": 4}


def _get(cfg, name: str, default=None):
    if isinstance(cfg, dict):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default)
    return default if value is None else value


def text_config(cfg):
    """The language model's config (VLM configs nest it as text_config)."""
    inner = _get(cfg, "text_config")
    return inner if inner is not None else cfg


def dtype_bytes(dtype, cfg=None, device: str = "cuda") -> int:
    """Bytes per weight for a --dtype value or torch.dtype; 'auto' is float32 on CPU and the
    checkpoint's 16-bit dtype on a GPU (as edgelm.model_config.resolve_dtype picks)."""
    if not isinstance(dtype, str):  # torch.dtype
        return dtype.itemsize
    if dtype == "auto" and device == "cpu":
        return 4
    if dtype == "auto":
        cfg_dtype = str(_get(cfg, "torch_dtype", None) or _get(cfg, "dtype", None) or "bfloat16")
        return 4 if cfg_dtype.replace("torch.", "") == "float32" else 2
    return _DTYPE_BYTES[dtype]


@dataclass
class LinearShape:
    """One linear layer of the decoder, repeated `count` times: weight [out_features, in_features]."""

    name: str
    in_features: int
    out_features: int
    count: int
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features * self.count


@dataclass
class ParamCounts:
    linears: list[LinearShape]
    embedding: int  # numel
    lm_head: int  # numel; 0 when tied to the embedding
    bias: int
    norm: int
    other: int = 0  # MoE routers and the like, kept in the dtype

    @property
    def linear(self) -> int:
        return sum(x.numel for x in self.linears)

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.lm_head + self.bias + self.norm + self.other


def count_parameters(config) -> ParamCounts:
    cfg = text_config(config)
    hidden = int(_get(cfg, "hidden_size"))
    layers = int(_get(cfg, "num_hidden_layers"))
    vocab = int(_get(cfg, "vocab_size"))
    heads = int(_get(cfg, "num_attention_heads"))
    kv_heads = int(_get(cfg, "num_key_value_heads", heads))
    head_dim = int(_get(cfg, "head_dim", hidden // heads))
    inter = int(_get(cfg, "intermediate_size"))
    model_type = str(_get(cfg, "model_type", ""))
    # Qwen2: bias on q, k, v only; Llama/Qwen3 `attention_bias`: on q, k, v and o
    qkv_bias = model_type.startswith("qwen2") or bool(_get(cfg, "attention_bias", False))
    o_bias = not model_type.startswith("qwen2") and bool(_get(cfg, "attention_bias", False))
    mlp_bias = bool(_get(cfg, "mlp_bias", False))
    q_size, kv_size = heads * head_dim, kv_heads * head_dim

    linears = [
        LinearShape("q_proj", hidden, q_size, layers, qkv_bias),
        LinearShape("k_proj", hidden, kv_size, layers, qkv_bias),
        LinearShape("v_proj", hidden, kv_size, layers, qkv_bias),
        LinearShape("o_proj", q_size, hidden, layers, o_bias),
    ]
    experts = int(_get(cfg, "num_experts", 0) or _get(cfg, "num_local_experts", 0) or 0)
    other = 0
    if experts:
        moe_inter = int(_get(cfg, "moe_intermediate_size", inter))
        linears += [LinearShape("experts.gate_up_proj", hidden, 2 * moe_inter, layers * experts),
                    LinearShape("experts.down_proj", moe_inter, hidden, layers * experts)]
        other += layers * experts * hidden  # router
        shared = int(_get(cfg, "shared_expert_intermediate_size", 0) or 0)
        if shared:
            linears += [LinearShape("shared_expert.gate_up_proj", hidden, 2 * shared, layers),
                        LinearShape("shared_expert.down_proj", shared, hidden, layers)]
            other += layers * hidden  # shared expert gate
    else:
        linears += [LinearShape("gate_proj", hidden, inter, layers, mlp_bias),
                    LinearShape("up_proj", hidden, inter, layers, mlp_bias),
                    LinearShape("down_proj", inter, hidden, layers, mlp_bias)]

    bias = sum(x.out_features * x.count for x in linears if x.bias)
    norm = (2 * layers + 1) * hidden
    if model_type.startswith("qwen3"):  # per-head RMSNorm on q and k
        norm += 2 * layers * head_dim
    tied = bool(_get(cfg, "tie_word_embeddings", False))
    return ParamCounts(linears, embedding=vocab * hidden, lm_head=0 if tied else vocab * hidden,
                       bias=bias, norm=norm, other=other)


def quantized_linear_bytes(shape: LinearShape, torchao_config: str, weight_dtype_bytes: int = 2,
                           device: str = "cuda") -> int:
    """Bytes of one linear group's weights (biases excluded) under a --torchao-config value."""
    n, k, count = shape.out_features, shape.in_features, shape.count
    if not torchao_config:
        return shape.numel * weight_dtype_bytes
    if torchao_config.startswith("int4wo-"):
        group = int(torchao_config.split("-")[1])
        k_padded = math.ceil(k / 128) * 128
        packed = count * n * (k_padded // 2 + math.ceil(k_padded / group) * 2 * 2)  # int4 + fp16 scale, offset
        return packed + (_int4_cpu_extra(shape, weight_dtype_bytes) if device == "cpu" else 0)
    if torchao_config in ("int8wo", "int8dq"):
        return count * (n * k + n * 2)
    if torchao_config in ("fp8wo", "fp8dq-per_row"):
        return count * (n * k + n * 4)
    if torchao_config == "fp8dq-per_tensor":
        return count * (n * k + 4)
    raise ValueError(f"unknown torchao config {torchao_config!r}")


def _int4_cpu_extra(shape: LinearShape, weight_dtype_bytes: int) -> int:
    return int4_cpu_extra(shape.count * shape.out_features * (math.ceil(shape.in_features / 128) * 128 // 2),
                          shape.numel * weight_dtype_bytes)


def int4_cpu_extra(code_bytes: int, dense_bytes: int) -> int:
    """What int4 layers hold on the CPU beside their packed codes (Int4Linear.finish_loading): the codes again in
    torch's CPU kernel layout (about the same size), or a dense copy without that kernel."""
    from edgelm.quantization.int4_linear import cpu_kernel_available

    return code_bytes if cpu_kernel_available() else dense_bytes


def _prequantized_bytes(shape: LinearShape, qcfg, weight_dtype_bytes: int, device: str) -> int | None:
    """AWQ/GPTQ checkpoints: `bits` per weight + a 16-bit scale and packed zero per group (loaded into
    edgelm's int4 layout: the same within a few percent). On the CPU, plus what _int4_cpu_extra counts."""
    bits = _get(qcfg, "bits", None) or _get(qcfg, "w_bit", None)
    if not bits:
        return None
    group = _get(qcfg, "group_size", None) or _get(qcfg, "q_group_size", 128)
    group = shape.in_features if group in (-1, 0) else int(group)
    groups = math.ceil(shape.in_features / group)
    per_out = shape.in_features * bits / 8 + groups * (2 + bits / 8)
    return int(shape.count * shape.out_features * per_out) + (_int4_cpu_extra(shape, weight_dtype_bytes)
                                                              if device == "cpu" else 0)


@dataclass
class WeightBytes:
    linear: int
    embedding: int
    lm_head: int
    rest: int  # biases, norms, routers

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.lm_head + self.rest


def weight_breakdown(config, dtype="auto", torchao_config: str = "", device: str = "cuda",
                     lm_head_quant: str = "") -> WeightBytes:
    """lm_head_quant "int8" (--quantize-lm-head): the head as int8 rows + a float32 scale each (int8_head.Int8Head),
    a tied embedding reading the same table."""
    counts = count_parameters(config)
    cfg = text_config(config)
    wbytes = dtype_bytes(dtype, cfg, device)
    qcfg = _get(config, "quantization_config", None)
    linear = 0
    for shape in counts.linears:
        pre = _prequantized_bytes(shape, qcfg, wbytes, device) if qcfg is not None and not torchao_config else None
        linear += pre if pre is not None else quantized_linear_bytes(shape, torchao_config, wbytes, device)
    lm_head, embedding = counts.lm_head * wbytes, counts.embedding * wbytes
    if lm_head_quant == "int8":
        vocab = counts.embedding // int(_get(cfg, "hidden_size"))
        lm_head = counts.embedding + vocab * 4  # the head's shape is the embedding's
        if not counts.lm_head:  # tied: the embedding reads the int8 table too (int8_head.Int8Embedding)
            embedding = 0
    elif lm_head_quant not in ("", "none"):
        raise ValueError(f"unknown lm_head_quant {lm_head_quant!r}")
    return WeightBytes(linear=linear, embedding=embedding, lm_head=lm_head,
                       rest=(counts.bias + counts.norm + counts.other) * wbytes)


def estimate_weight_bytes(config, dtype="auto", torchao_config: str = "", device: str = "cuda",
                          lm_head_quant: str = "") -> int:
    """Bytes the weights will take once loaded (and quantized by `torchao_config`, e.g. 'int4wo-128')."""
    return weight_breakdown(config, dtype, torchao_config, device, lm_head_quant).total


def kv_bytes_per_token(config, kv_dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token: 2 × layers × kv_heads × head_dim × bytes."""
    cfg = text_config(config)
    heads = int(_get(cfg, "num_attention_heads"))
    kv_heads = int(_get(cfg, "num_key_value_heads", heads))
    head_dim = int(_get(cfg, "head_dim", int(_get(cfg, "hidden_size")) // heads))
    return 2 * int(_get(cfg, "num_hidden_layers")) * kv_heads * head_dim * kv_dtype_bytes


def decode_read_bytes(config, dtype="auto", torchao_config: str = "", device: str = "cuda",
                      lm_head_quant: str = "") -> int:
    """Weight bytes one decode step reads from DRAM: all of them but the input embedding table,
    of which only one row per token is read (unless it is the lm_head too, tied)."""
    b = weight_breakdown(config, dtype, torchao_config, device, lm_head_quant)
    return b.total - (b.embedding if b.lm_head else 0)
