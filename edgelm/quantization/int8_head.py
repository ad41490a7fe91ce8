"""`--quantize-lm-head int8`: the LM head as int8 weights with one float32 scale per vocabulary row.

Why: at batch 1 the head is the largest single read of a decode step once the decoder is int4 —
Llama-3.1-8B's 128256 × 4096 head is 1.05 GB in bf16 against ~3.7 GB for all 32 int4 layers, Llama-3.2-3B's
0.79 GB against ~1.5 GB, and a small model with a large vocabulary reads about as much head as int4 layers.
llama.cpp keeps its heads at 6 bits in its 4-bit files; MLC quantizes them with the rest. One byte a
weight with a per-row absmax scale halves the read and changes next-token choices rarely (measured on the
embedded model: `benchmarks/quant_quality.py --runs none+int8head`, results/quant_quality_int8_head.json).

The kernel is edgelm's own (Triton, SM 8.0+, CUDA graphs, PDL) because the halving only shows if the int8 bytes
stream as fast as the bf16 head's do (~3.1 TB/s on the H100): a first form that converted each byte with a
conversion instruction and reduced over K every step reached 1.7 TB/s (results/ablations/int8_head/first_kernel/).
At one row of x (decode at batch 1, FORM "magic") each int32 word of four codes becomes four floats by one PRMT
and one FADD a byte (the code's byte under a float32 exponent), products go into a [BLOCK_N, BLOCK_W] float32
accumulator reduced once at the end: 3.0 TB/s there. Several rows take a tensor-core tile (int8 → the
activation dtype, exact: |q| ≤ 127). The scale multiplies the float32 accumulator, and the logits come out in
float32 (the sampler's dtype: no separate cast). On the CPU torch's `_weight_int8pack_mm` does it (bf16 inputs).
torch's and torchao's own int8 weight-only GPU paths were not compared.

An untied model drops its 16-bit head and keeps its input embedding; a tied one (the embedded SmolLM2,
Llama-3.2-1B, Qwen2.5-1.5B) reads its input embedding's rows from the same int8 table and drops the 16-bit one:
half the table's memory (0.47 GB fewer for Qwen2.5-1.5B), at the cost of int8 rounding in the embeddings too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from edgelm.layers.triton_ops import pdl
from edgelm.layers.triton_ops.pdl import wait_and_release

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
VALUES = ("none", "int8")


FORMS = ("reduce", "acc", "magic", "dot")


@dataclass(frozen=True)
class HeadConfig:
    """form: "reduce" (multiply, reduce over the tile's K each step), "acc" (multiply into a [BLOCK_N, BLOCK_K]
    float32 accumulator, reduced once at the end), "magic" (acc, with each byte made a float by bit operations
    instead of a conversion instruction: see _magic_byte), "dot" (tensor cores, M padded to 16)."""
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    form: str = "reduce"

    @property
    def use_dot(self) -> bool:
        return self.form == "dot"

    @property
    def name(self) -> str:
        return f"{self.form}_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"

    @classmethod
    def parse(cls, name: str) -> HeadConfig:
        """'reduce_n8_k2048_w4_s3' → HeadConfig(8, 2048, 4, 3, "reduce")."""
        form, n, k, w, s = name.split("_")
        if form not in FORMS:
            raise ValueError(f"int8 head config {name!r}: form must be one of {FORMS}")
        return cls(int(n[1:]), int(k[1:]), int(w[1:]), int(s[1:]), form)


# Candidates that benchmarks/gpu/int8_head_bench.py times against the 16-bit head.
CANDIDATES = tuple(HeadConfig.parse(n) for n in (
    "reduce_n8_k1024_w4_s4", "reduce_n4_k2048_w4_s3",
    "acc_n8_k512_w4_s3", "acc_n4_k1024_w4_s3", "acc_n16_k256_w4_s3",
    "magic_n8_k512_w4_s3", "magic_n4_k1024_w4_s3", "magic_n16_k256_w4_s3", "magic_n8_k1024_w8_s3",
    "magic_n4_k2048_w8_s2", "magic_n2_k2048_w4_s3",
    "dot_n32_k256_w4_s4", "dot_n64_k256_w4_s3", "dot_n64_k128_w4_s4", "dot_n128_k128_w8_s3",
))


def head_config(m: int, device: torch.device) -> HeadConfig:
    """The launch config for m rows of x: EDGELM_INT8_HEAD_CONFIG=<name>[,<name for m > 1>] overrides
    (experiments); else the defaults below (H100, benchmarks/gpu/int8_head_bench.py)."""
    override = os.environ.get("EDGELM_INT8_HEAD_CONFIG")
    if override:
        names = override.split(",")
        return HeadConfig.parse(names[0] if m == 1 or len(names) == 1 else names[1])
    if device.type != "cuda":  # the interpreter (tests): small tiles
        return HeadConfig(16, 64, 1, 1, "dot" if m > 1 else "magic")
    # H100 (results/int8_head_bench_h100.json, _small_h100.json): M = 1 magic_n16_k256_w4_s3 175.8 / 133.9 / 81.7 µs on
    # Llama-3.1-8B's / Llama-3.2-3B's / Qwen2.5-1.5B's head (2.9-3.0 TB/s) against the bf16 head's 338 / 286 / 171, the
    # best or within 0.3 µs of it on each (magic_n4_k1024_w4_s3: 175.5 / 134.0 / 106.1); the elementwise
    # accumulator is what matters (acc forms 83-189 µs, reduce 186-310); M = 8 / 32 dot_n64_k128_w4_s4 241 / 321 µs
    # against 353 / 398 on the 8B head (2.2 / 1.6 TB/s: the int8 → bf16 conversions bound it)
    if m == 1:
        return HeadConfig(16, 256, 4, 3, "magic")
    return HeadConfig(64, 128, 4, 4, "dot")


# a byte u (0..255) at bits 0-7 of 0x4B000000 | u is the float32 2^23 + u: subtracting 2^23 + 128 gives u - 128
MAGIC = tl.constexpr(0x4B000000)
MAGIC_BIAS = tl.constexpr(8388608.0 + 128.0)
# PRMT selectors: byte BYTE of the word, two bytes of the magic's zeros, then its 0x4B
_PRMT0 = tl.constexpr("prmt.b32 $0, $1, $2, 0x7440;")
_PRMT1 = tl.constexpr("prmt.b32 $0, $1, $2, 0x7441;")
_PRMT2 = tl.constexpr("prmt.b32 $0, $1, $2, 0x7442;")
_PRMT3 = tl.constexpr("prmt.b32 $0, $1, $2, 0x7443;")


@triton.jit
def _prmt(u, magic, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,r,r", [u, magic], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _magic_byte(u, BYTE: tl.constexpr, USE_ASM: tl.constexpr):
    """Byte BYTE of each int32 word u (the int8 codes XOR 0x80: q + 128) as the float32 2^23 + q + 128: one PRMT
    on the GPU, a shift and a mask in the interpreter."""
    if USE_ASM:
        magic = tl.full(u.shape, MAGIC, tl.int32)
        if BYTE == 0:
            bits = _prmt(u, magic, _PRMT0)
        elif BYTE == 1:
            bits = _prmt(u, magic, _PRMT1)
        elif BYTE == 2:
            bits = _prmt(u, magic, _PRMT2)
        else:
            bits = _prmt(u, magic, _PRMT3)
    else:
        bits = ((u >> (8 * BYTE)) & 0xFF) | MAGIC
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _int8_head_kernel(x_ptr, x_stride, q_ptr, q_stride, scale_ptr, out_ptr, out_stride, M, N, K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      FORM: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr):
    """out [M, N] float32 = (x [M, K] · q [N, K]ᵀ) · scale [N]. Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)).
    FORM 0 reduce, 1 acc, 3 dot (HeadConfig). PDL (triton_ops.pdl): the first weight tile loads while the kernel
    before finishes."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    q_ptrs = q_ptr + offs_n.to(tl.int64)[:, None] * q_stride + offs_k[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * x_stride + offs_k[None, :]
    if FORM == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_next = tl.load(q_ptrs, mask=n_mask[:, None] & (offs_k < K)[None, :], other=0)
    wait_and_release(PDL)
    for k0 in range(0, K, BLOCK_K):
        w = w_next
        if k0 + BLOCK_K < K:  # the next tile's load issued before this one's arithmetic
            if EVEN_K:
                w_next = tl.load(q_ptrs + (k0 + BLOCK_K), mask=n_mask[:, None], other=0)
            else:
                w_next = tl.load(q_ptrs + (k0 + BLOCK_K), mask=n_mask[:, None] & (k0 + BLOCK_K + offs_k < K)[None, :],
                                 other=0)
        k_mask = k0 + offs_k < K
        if FORM == 1:  # one row of x
            x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        else:
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if FORM == 3:
                if INTERPRET or x.dtype == tl.float32:  # the interpreter gets 16-bit dots wrong; float32: no tf32
                    acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    if FORM == 1:
        tl.store(out_ptr + offs_n, tl.sum(acc, axis=1) * scale, mask=n_mask)
    else:
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_stride + offs_n[None, :]
        tl.store(out_ptrs, acc * scale[None, :], mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int8_head_magic_kernel(x_ptr, q_ptr, q_stride, scale_ptr, out_ptr, N, W,
                            BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, USE_ASM: tl.constexpr,
                            PDL: tl.constexpr):
    """One row: out [N] float32 = (x [4W] · q [N, 4W]ᵀ) · scale [N], q read as int32 words [N, W] (q_stride in
    words). Each word's four bytes become floats by _magic_byte (XOR 0x80 once a word, one PRMT and one FADD a
    byte, exact) instead of four conversion instructions; products go into a [BLOCK_N, BLOCK_W] accumulator,
    reduced once at the end. Grid (cdiv(N, BLOCK_N),)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    n_mask = offs_n < N
    q_ptrs = q_ptr + offs_n.to(tl.int64)[:, None] * q_stride + offs_w[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    w_next = tl.load(q_ptrs, mask=n_mask[:, None] & (offs_w < W)[None, :], other=0)
    wait_and_release(PDL)
    for w0 in range(0, W, BLOCK_W):
        w = w_next
        if w0 + BLOCK_W < W:
            w_next = tl.load(q_ptrs + (w0 + BLOCK_W), mask=n_mask[:, None] & (w0 + BLOCK_W + offs_w < W)[None, :],
                             other=0)
        w_mask = w0 + offs_w < W
        u = w ^ -2139062144  # 0x80808080: each signed code q becomes the byte q + 128
        xb = x_ptr + 4 * (w0 + offs_w)
        acc += (_magic_byte(u, 0, USE_ASM) - MAGIC_BIAS) * tl.load(xb, mask=w_mask, other=0.0).to(tl.float32)[None, :]
        acc += (_magic_byte(u, 1, USE_ASM) - MAGIC_BIAS) * tl.load(xb + 1, mask=w_mask, other=0.0).to(tl.float32)[None, :]
        acc += (_magic_byte(u, 2, USE_ASM) - MAGIC_BIAS) * tl.load(xb + 2, mask=w_mask, other=0.0).to(tl.float32)[None, :]
        acc += (_magic_byte(u, 3, USE_ASM) - MAGIC_BIAS) * tl.load(xb + 3, mask=w_mask, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=1) * scale, mask=n_mask)


def int8_head_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     config: HeadConfig | None = None) -> torch.Tensor:
    """float32 [M, N] logits of x [M, K] (bf16 / fp16 / fp32) against qweight [N, K] int8 with scale [N] float32."""
    m, k = x.shape
    n = qweight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    config = config or head_config(m, x.device)
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    pdl_on = pdl.mode(x.device, m, small=False)
    form = config.form
    if form in ("acc", "magic") and m > 1:
        form = "reduce"  # one row of x only
    if form == "magic" and (k % 4 or qweight.stride(0) % 4 or qweight.storage_offset() % 4):
        form = "acc"  # not readable as whole int32 words
    if form == "magic":
        words = qweight.view(torch.int32)
        _int8_head_magic_kernel[(triton.cdiv(n, config.block_n),)](
            x, words, words.stride(0), scale, out, n, k // 4, BLOCK_N=config.block_n,
            BLOCK_W=max(config.block_k // 4, 1), USE_ASM=x.is_cuda and not _INTERPRET, PDL=pdl_on,
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch_kwargs(pdl_on))
        return out
    if form == "dot":
        block_m = min(max(triton.next_power_of_2(m), 16), 64)
    else:
        block_m = max(triton.next_power_of_2(min(m, 4)), 1)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, block_m))
    _int8_head_kernel[grid](x, x.stride(0), qweight, qweight.stride(0), scale, out, out.stride(0), m, n, k,
                            BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                            EVEN_K=k % config.block_k == 0, FORM=FORMS.index(form), INTERPRET=_INTERPRET,
                            PDL=pdl_on, num_warps=config.num_warps, num_stages=config.num_stages,
                            **pdl.launch_kwargs(pdl_on))
    return out


def quantize_rows(weight: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q [N, K] int8, scale [N] float32) with weight ≈ q · scale[:, None];
    scale = max |row| / 127 (an all-zero row gets scale 1). Done `chunk` rows at a time (no float32
    copy of a whole 128k-row table)."""
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, chunk):
        w = weight[start:start + chunk].float()
        s = w.abs().amax(dim=1) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start:start + chunk] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[start:start + chunk] = s
    return q, scale


class Int8Head(nn.Module):
    """The LM head as int8 rows and float32 scales: hidden [M, K] → float32 logits [M, N]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.vocab_size, self.hidden_size = q.shape
        self._cpu_scale: dict[torch.dtype, torch.Tensor] = {}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.is_cuda:
            return int8_head_matmul(hidden.reshape(-1, self.hidden_size), self.qweight, self.scale).view(
                *hidden.shape[:-1], self.vocab_size)
        return self._cpu(hidden)

    def _cpu(self, hidden: torch.Tensor) -> torch.Tensor:
        if os.environ.get("EDGELM_INT4_CPU") == "emulate":  # quality probes: the GPU kernel's numbers, in float32
            return torch.nn.functional.linear(hidden.float(), self.dequantized())
        # torch's CPU int8 kernel is fast with 16-bit inputs (0.9 ms for SmolLM2's 49152 × 576 head on 2
        # cores against 2.0 ms for the float32 dense head and 9 ms with float32 inputs)
        dtype = hidden.dtype if hidden.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if dtype not in self._cpu_scale:
            self._cpu_scale[dtype] = self.scale.to(dtype)
        x = hidden.reshape(-1, self.hidden_size).to(dtype)
        out = torch._weight_int8pack_mm(x, self.qweight, self._cpu_scale[dtype])
        return out.float().view(*hidden.shape[:-1], self.vocab_size)

    def embed(self, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows of the dequantized table (a tied model's input embedding read from the same int8 table)."""
        rows = torch.nn.functional.embedding(input_ids, self.qweight).to(torch.float32)
        return (rows * torch.nn.functional.embedding(input_ids, self.scale[:, None])).to(dtype)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the kernel multiplies by (tests, quality probes)."""
        return self.qweight.float() * self.scale[:, None]


def check_lm_head_quant(value: str | None, device: str) -> None:
    """Raise ValueError for a value edgelm does not know or cannot run on `device` (before loading)."""
    if not value or value == "none":
        return
    if value not in VALUES:
        raise ValueError(f"unknown --quantize-lm-head {value!r}; choose one of: {', '.join(VALUES)}")
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 0):
            raise ValueError(f"--quantize-lm-head int8 needs a GPU of compute capability 8.0 or newer; this one is "
                             f"{major}.{minor}")
    elif not hasattr(torch, "_weight_int8pack_mm"):
        raise ValueError("--quantize-lm-head int8 on the CPU needs torch's _weight_int8pack_mm (torch >= 2.4)")


class Int8Embedding(nn.Module):
    """A tied model's input embedding read from its Int8Head's table (the 16-bit table is freed)."""

    def __init__(self, head: Int8Head, dtype: torch.dtype):
        super().__init__()
        self.head = [head]  # not a submodule: the model holds the head once, as head_quant
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head[0].embed(input_ids, self.dtype)


def quantize_lm_head(model: nn.Module, value: str | None) -> Int8Head | None:
    """Replace the model's LM head by an Int8Head (model.head_quant). An untied 16-bit head is freed; a tied one is
    the input embedding too, which then reads its rows from the int8 table (Int8Embedding): the 16-bit table is
    freed either way."""
    if not value or value == "none":
        return None
    weight = model.lm_head_weight
    head = Int8Head(weight)
    model.head_quant = head
    if getattr(model, "lm_head", None) is not None:  # untied: nothing else reads the 16-bit head
        model.lm_head = None
    else:
        model.model.embed_tokens = Int8Embedding(head, weight.dtype)
    return head
