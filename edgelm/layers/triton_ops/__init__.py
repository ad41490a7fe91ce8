"""Triton kernels for the small ops of a decode step (CUDA only; the torch code is the reference).

Which ops take the Triton path is decided once, from measurements on the device
(benchmarks/results/decode_ops_h100.json) and the environment:

    EDGELM_TRITON_OPS=0                    every op on the torch path
    EDGELM_TRITON_OPS=1 (or unset)         the ops in DEFAULT_ON
    EDGELM_TRITON_OPS=rmsnorm,rotary,...   exactly the ops named (names: see ALL_OPS)

The kernels are imported lazily: a machine without Triton (a Jetson without a wheel, a CPU box)
never imports it and keeps the torch path.
"""

from __future__ import annotations

import importlib.util
import os

ALL_OPS = ("rmsnorm", "add_rmsnorm", "silu_and_mul", "rotary", "gemv", "argmax", "fused_decode", "rope_kv",
           "attn_merge", "pdl", "fused_int4", "int4_rope", "int4_xprep", "int4_xprep_qkv", "l2_prefetch",
           "int4_meta_pairs", "int4_rope_cuda")
# every op measured faster than its torch path on an H100 (benchmarks/results/decode_ops_h100.json);
# "gemv" applies only to the GPUs and shapes listed in triton_ops.gemv.WINS; "fused_decode" runs a
# decoder layer's norms, SiLU·mul and residual adds inside its GEMVs where all four GEMVs of the
# layer take the Triton path (edgelm.models.llama); "rope_kv" fuses the rotary (when "rotary" is on)
# with the Triton attention backend's KV write; "attn_merge" merges that backend's decode splits
# inside its attention launch instead of a second kernel; "pdl" launches the decode step's Triton
# kernels with programmatic dependent launch on SM 9.0+ (triton_ops.pdl; nothing changes elsewhere);
# "fused_int4": the batch-1 decoder layer of int4 weights with its norms, SiLU·mul and residual adds
# inside its four gemv_h2 launches (int4_fused.gemv_h2_fused), where all four run gemv_h2 without split K;
# "int4_rope": only the rotary + KV write moved into an int4 qkv_proj's gemv_h2 (batch 1, Triton attention);
# "int4_xprep": x reaches each batch-1 gemv_h2 as scaled fp16 pairs, block sums and scales (triton_ops.xprep;
# written by the RMSNorm / SiLU·mul kernel that makes x, else by a small kernel), so that the GEMV's dot
# costs ~2.1 SASS instructions a weight instead of ~3.6-3.9; "int4_xprep_qkv": only qkv_proj's GEMV on x
# prepared (by the input norm; the one shape where the prepared GEMV measured faster than the plain one);
# "l2_prefetch": the batch-1 Triton decode attention prefetches o_proj's and the start of gate_up_proj's
# weights into the L2 (triton_ops.l2_prefetch); "int4_meta_pairs": each batch-1 gemv_h2 reads a group's scale and
# offset as one int32 (Int4Weight.meta, built at load by int4_linear.set_meta_pairs; a second copy of them)
# "fused_decode" is off: on the H100 its prologues made the GEMVs slower than the kernels they
# replace saved (graph step 6042 vs 5918 us, Llama-3.1-8B shape bs1, benchmarks/gpu/dev_check.sh).
# "attn_merge" is off: on an H200 the attention launch with the merge inside took 11.2 us a layer
# against 5.0 + 2.9 us for the two launches (benchmarks/results/decode_profile_*_h200.json); on the H100, with its
# heads merged in one load, 2406-2410 us an int4 step against 2380 (results/ablations/cuda_w4_round25/).
# "fused_int4" is off: on the H100 the step took 2.63-2.66 ms with it against 2.58 without
# (benchmarks/results/int4_variants_bs1_fused_h100.json). "int4_rope" is on: in two H100 calls each of its four
# runs beat every baseline of the A/B (2524-2547 us against 2550-2561; results/ablations/xprep/). Off, measured
# slower or even on the H100 (2026-12-07, the same files): "int4_xprep" (form 1: 2.82 ms against 2.55; form 2:
# 2.61-2.62 against 2.56), "int4_xprep_qkv" (2.556 / 2.556 against 2.550-2.557), "l2_prefetch" (2.58-2.59 against 2.56),
# "int4_meta_pairs" (2.564 / 2.568 against 2.494; results/ablations/meta_pairs/).
# "int4_rope_cuda" (int4_rope's epilogue in a qkv_proj that runs cuda_w4, int4_cuda.gemv_w4_rope) is off: on the
# H100 the step without it took 2480 / 2469 us against 2502 with it (ablations/cuda_w4_round19/).
DEFAULT_ON = frozenset(ALL_OPS) - {"fused_decode", "attn_merge", "fused_int4", "int4_xprep", "int4_xprep_qkv",
                                   "l2_prefetch", "int4_meta_pairs", "int4_rope_cuda"}

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _parse(value: str | None) -> frozenset[str]:
    if value is None or value.strip() in ("", "1", "true", "on"):
        return DEFAULT_ON
    if value.strip() in ("0", "false", "off", "none"):
        return frozenset()
    ops = frozenset(v.strip() for v in value.split(",") if v.strip())
    unknown = ops - set(ALL_OPS)
    if unknown:
        raise ValueError(f"EDGELM_TRITON_OPS: unknown op(s) {sorted(unknown)}; known: {ALL_OPS}")
    return ops


_enabled: frozenset[str] = _parse(os.environ.get("EDGELM_TRITON_OPS")) if HAS_TRITON else frozenset()


def enabled(op: str) -> bool:
    """Whether `op` takes the Triton path for CUDA tensors."""
    return op in _enabled


def set_enabled(ops: str | None) -> frozenset[str]:
    """Re-read the switch (tests, benchmarks); `ops` as EDGELM_TRITON_OPS takes it. Returns the old set."""
    global _enabled
    old = _enabled
    _enabled = _parse(ops) if HAS_TRITON else frozenset()
    return old
