"""Groupwise int4 weights: quantization, edgelm's packed layout, and a plain-torch dequantizer.

Scheme: asymmetric, one fp16 scale ``s`` and one fp16 offset ``m`` per group of ``group_size``
inputs, ``w ≈ q·s + m`` with ``q`` in 0..15 (the form of llama.cpp's Q4_1). The float offset lets
the range search below fit both ends of a skewed group, which a symmetric code cannot; it costs
the same in the kernel (one FMA per group, done after the group's dot product). Scales stay fp16
even for bf16 models: 3 more mantissa bits at no cost, and weights are far from fp16's limits.

Packed layout (what the Triton kernels read), for weight ``[N, K]``:
  ``qweight``  int32 ``[N, Kp // 8]`` with ``Kp = ceil(K / 128) · 128``; the inputs are cut into blocks
               of 128 and word ``16·b + i`` holds in its nibble ``j`` (bits 4j..4j+3) the weight of input
               ``k = 128·b + 16·j + i``. So nibble ``j`` of 16 consecutive words covers 16 consecutive
               inputs: a kernel unpacks with one shift per nibble and reads ``x`` contiguously.
  ``scales``, ``offsets``  fp16 ``[N, ceil(Kp / group_size)]``.
Inputs past K (padding) have q = 0 and are never read by the kernels (x is masked to 0 there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_K = 128  # inputs per packing block
WORDS_PER_BLOCK = BLOCK_K // 8
GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class Int4Weight:
    qweight: torch.Tensor  # int32 [N, Kp // 8]
    scales: torch.Tensor  # fp16 [N, num_groups]
    offsets: torch.Tensor  # fp16 [N, num_groups]
    in_features: int  # K (unpadded)
    group_size: int
    # int32 [N, num_groups]: scale bits | offset bits << 16 (meta_pairs), what the batch-1 gemv_h2 reads instead
    # of scales and offsets where triton_ops "int4_meta_pairs" is on (one load, no 16-bit packing); else None
    meta: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.offsets))


def meta_pairs(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """int32 [N, groups]: each group's 16-bit scale in the low half and offset in the high half (Int4Weight.meta)."""
    lo = scales.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return lo | (offsets.contiguous().view(torch.int16).to(torch.int32) << 16)


def padded_in_features(in_features: int) -> int:
    return -(-in_features // BLOCK_K) * BLOCK_K


def _groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, num_groups, group_size] views of the padded weight, and a mask of the real inputs."""
    n, k = weight.shape
    kp = padded_in_features(k)
    num_groups = -(-kp // group_size)
    width = num_groups * group_size
    w = torch.zeros(n, width, dtype=torch.float32, device=weight.device)
    w[:, :k] = weight.float()
    valid = torch.zeros(width, dtype=torch.bool, device=weight.device)
    valid[:k] = True
    return w.view(n, num_groups, group_size), valid.view(1, num_groups, group_size)


def _assign(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return ((w - m) / s).round_().clamp_(0, 15)


def _candidate_error(w, s, m, valid) -> torch.Tensor:
    """Per-group squared reconstruction error of (s, m), each input weighted by `valid` (a mask, or importances);
    in place on one temporary (CPU start-up time)."""
    t = _assign(w, s, m).mul_(s).add_(m).sub_(w).square_()
    if valid is not None:
        t.mul_(valid)
    return t.sum(-1, keepdim=True)


def _refit(w, q, valid, s, m):
    """Least-squares (s, m) for fixed codes q, per group, each input weighted by `valid` (a mask, or
    importances); groups with one distinct code keep (s, m)."""
    if valid is None:
        cnt = torch.full_like(s, w.shape[-1])
        qv, wv = q, w
    else:
        cnt = valid.sum(-1, keepdim=True).clamp(min=1e-30)
        qv, wv = q * valid, w * valid
    mean_q, mean_w = qv.sum(-1, keepdim=True) / cnt, wv.sum(-1, keepdim=True) / cnt
    var_q = (qv * q).sum(-1, keepdim=True) / cnt - mean_q**2
    cov = (qv * w).sum(-1, keepdim=True) / cnt - mean_q * mean_w
    ok = var_q > 1e-6
    s_new = torch.where(ok, cov / var_q.clamp(min=1e-6), s)
    ok = ok & (s_new > 0)
    s_new = torch.where(ok, s_new, s)
    m_new = torch.where(ok, mean_w - s_new * mean_q, m)
    return s_new, m_new


def _search_chunk(w, valid, method: str, shrink_steps: int, refit_iters: int, importance=None):
    big = torch.finfo(torch.float32).max
    any_valid = valid.any(-1, keepdim=True)  # groups wholly in the padding get s = 1e-8, m = 0
    lo = torch.where(any_valid, torch.where(valid, w, big).amin(-1, keepdim=True), 0.0)
    hi = torch.where(any_valid, torch.where(valid, w, -big).amax(-1, keepdim=True), 0.0)
    span = (hi - lo).clamp(min=1e-8)
    s, m = span / 15, lo
    if method == "minmax":
        return s, m
    if importance is not None:  # the errors weighted input by input (zero on the padding)
        valid = importance * valid
    else:
        valid = None if bool(valid.all()) else valid
    best_err = _candidate_error(w, s, m, valid)
    # shrink the range towards either end (clipping outliers); keep each group's best
    for i in range(1, shrink_steps + 1):
        for a, b in ((i, 0), (0, i), (i, i)):
            f_lo, f_hi = a / (4 * shrink_steps), b / (4 * shrink_steps)
            cs, cm = span * (1 - f_lo - f_hi) / 15, lo + span * f_lo
            err = _candidate_error(w, cs, cm, valid)
            better = err < best_err
            s, m, best_err = torch.where(better, cs, s), torch.where(better, cm, m), torch.minimum(err, best_err)
    # alternate: codes for (s, m), then the least-squares (s, m) for those codes (never increases the error)
    for _ in range(refit_iters):
        q = _assign(w, s, m)
        cs, cm = _refit(w, q, valid, s, m)
        err = _candidate_error(w, cs, cm, valid)
        better = err < best_err
        s, m, best_err = torch.where(better, cs, s), torch.where(better, cm, m), torch.minimum(err, best_err)
    return s, m


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int = 128, method: str = "search",
                  shrink_steps: int = 8, refit_iters: int = 4, rows_per_chunk: int = 4096,
                  meta_precision: torch.dtype = torch.float16, importance: torch.Tensor | None = None) -> Int4Weight:
    """Quantize a [N, K] weight groupwise to int4 and pack it.

    method "minmax": each group's min and max map to codes 0 and 15.
    method "search": also tries ranges clipped at either end, then alternates code assignment and a
    least-squares refit of (scale, offset); per group the candidate with the smallest squared
    reconstruction error wins. Data-free; runs where the weight is (chunks of rows bound memory).
    meta_precision torch.bfloat16: scales and offsets are rounded to bf16 values (still stored as
    fp16, which holds them exactly) so that a bf16 kernel's q·s + m uses them as stored.
    importance [K] (method "search"): each input's weight in the squared error (e.g. its expected x²), so that a
    group's range fits the inputs that carry most of the product; None weighs them alike.
    """
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    if method not in ("minmax", "search"):
        raise ValueError(f"unknown int4 quantization method {method!r}")
    n, k = weight.shape
    imp = None
    if importance is not None:
        imp = _groups(importance.to(weight.device, torch.float32).reshape(1, k), group_size)[0].clamp_(min=0)
    scales, offsets, codes = [], [], []
    for start in range(0, n, rows_per_chunk):
        w, valid = _groups(weight[start : start + rows_per_chunk], group_size)
        s, m = _search_chunk(w, valid, method, shrink_steps, refit_iters, imp)
        # codes are chosen against the scale and offset as stored (fp16)
        if meta_precision == torch.bfloat16:
            s, m = s.to(torch.bfloat16).float(), m.to(torch.bfloat16).float()
        s, m = s.half().float(), m.half().float()
        s = torch.where(s > 0, s, torch.full_like(s, 2.0**-24))
        q = _assign(w, s, m) * valid
        scales.append(s.squeeze(-1).half())
        offsets.append(m.squeeze(-1).half())
        codes.append(q.reshape(q.shape[0], -1)[:, : padded_in_features(k)].to(torch.int32))
    return Int4Weight(pack_int4(torch.cat(codes)), torch.cat(scales), torch.cat(offsets), k, group_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int codes [N, Kp] (0..15, Kp a multiple of 128) → int32 [N, Kp // 8] in the layout above."""
    n, kp = codes.shape
    c = codes.to(torch.int32).view(n, kp // BLOCK_K, 8, WORDS_PER_BLOCK)  # [N, block, nibble j, word i]
    packed = torch.zeros(n, kp // BLOCK_K, WORDS_PER_BLOCK, dtype=torch.int32, device=codes.device)
    for j in range(8):
        packed |= c[:, :, j, :] << (4 * j)  # nibble 7 sets the sign bit: fine, the kernels mask
    return packed.view(n, kp // 8)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, Kp // 8] → int32 codes [N, Kp]."""
    n, words = qweight.shape
    w = qweight.view(n, words // WORDS_PER_BLOCK, 1, WORDS_PER_BLOCK)
    shifts = (4 * torch.arange(8, device=qweight.device, dtype=torch.int32)).view(1, 1, 8, 1)
    return ((w >> shifts) & 0xF).reshape(n, words * 8)


def dequantize_int4(weight: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight the packed codes stand for, computed in fp32, returned in ``dtype``."""
    codes = unpack_int4(weight.qweight).float()
    n, kp = codes.shape
    g = weight.group_size
    num_groups = weight.scales.shape[1]
    if num_groups * g > kp:
        codes = torch.nn.functional.pad(codes, (0, num_groups * g - kp))
    codes = codes.view(n, num_groups, g)
    w = codes * weight.scales.float().unsqueeze(-1) + weight.offsets.float().unsqueeze(-1)
    return w.view(n, -1)[:, : weight.in_features].to(dtype)
