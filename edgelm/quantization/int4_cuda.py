"""`cuda_w4`: a hand-written CUDA batch-1 int4 GEMV (bf16 or fp16 activations, groups of 128), compiled at run time.

Why CUDA here, beside the Triton `gemv_h2`: the two share the packed layout (int4_pack) and the per-word
arithmetic (int4_ptx._dot_pairs_asm: each nibble pair made BASE + q by one lop3, BASE taken off by one FMA, the x
pair multiplied in by another, a word's eight products summed in a 16-bit pair, then float32; fp16 with its
one-shift word), but
not the memory structure, which Triton does not let us write: here a program first copies the whole of x into
shared memory (padded so that the lanes' reads do not collide in banks) with each 128-input block's sum, then a
warp takes R rows, its lanes four words (16 bytes) of one block each, eight blocks a step, with the weights,
scales and offsets of the next S steps in flight in registers; the first S steps are loaded before the PDL wait
(they do not depend on the kernel before). Timed alone on the H100 (benchmarks/gpu/cuda_gemv_probe.py,
results/cuda_gemv_probe_h100.json, both without PDL) it took 7.2 / 5.5 / 24.9 µs on Llama-3.1-8B's qkv / o /
gate_up against gemv_h2's 8.9 / 7.3 / 27.5, and 16.4 against 15.7 on down_proj (whose K of 14336 makes each
program copy 28 KB of x).

Compiled with NVRTC through torch (torch.cuda._utils._nvrtc_compile: PTX for the GPU at hand), loaded and
launched through the CUDA driver API with ctypes (cuLaunchKernelEx, the programmatic-serialization attribute
where PDL is on), on torch's current stream, so CUDA graphs capture it. Where any of that is missing (an older
torch, fp32 activations, another group size, K not a multiple of 128 or too long for the static shared memory),
`gemv_w4` runs gemv_h2 instead: a dispatch entry naming `cuda_w4` is never an error.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import NamedTuple

import torch

from edgelm.layers.triton_ops.scratch import scratch
from edgelm.platform import sm_count
from edgelm.quantization.int4_cuda_source import MAX_K, persistent, source, splits
from edgelm.quantization.int4_pack import Int4Weight

logger = logging.getLogger(__name__)


class NormIn(NamedTuple):
    """A linear's input still to be normalised (batch 1): the RMSNorm's weight and eps, the residual stream to add
    first (None: none) and the tensor the sum goes to (the next residual stream)."""
    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None
    res_out: torch.Tensor | None


def takes_norm(config: tuple | None) -> bool:
    """Whether a linear dispatched to cuda_w4 with this config is handed its input before the RMSNorm (config[6]):
    it makes the norm (and the residual add) while it stages x, so that no RMSNorm kernel runs before it."""
    return config is not None and len(config) > 6 and bool(config[6])


def _norm_code(x: torch.Tensor, k: int, norm: NormIn | None) -> int | None:
    """0 (no norm), 1 (norm), 2 (residual add and norm) where the kernel takes it, None where it does not."""
    if norm is None:
        return 0
    w, r, o = norm.weight, norm.residual, norm.res_out
    if not (w.dtype == x.dtype and w.is_contiguous() and w.numel() == k and w.data_ptr() % 16 == 0):
        return None
    if r is None:
        return 1
    ok = all(t is not None and t.dtype == x.dtype and t.is_contiguous() and t.numel() == k and t.data_ptr() % 16 == 0
             for t in (r, o))
    return 2 if ok else None


def norm_runs(x: torch.Tensor, w: Int4Weight, norm: NormIn) -> bool:
    """Whether cuda_w4 itself can make this norm for this input (else gemv_w4 would do it apart)."""
    return supported(x, w) and _norm_code(x, w.in_features, norm) is not None


def apply_norm(x: torch.Tensor, norm: NormIn) -> torch.Tensor:
    """What the kernel's NORM staging computes, done apart (layernorm.rms_norm), res_out written."""
    from edgelm.layers.layernorm import rms_norm

    if norm.residual is None:
        return rms_norm(x, norm.weight, norm.eps)
    out, s = rms_norm(x, norm.weight, norm.eps, norm.residual)
    norm.res_out.copy_(s)
    return out


def takes_silu(config: tuple | None) -> bool:
    """Whether a down_proj dispatched to cuda_w4 with this config is handed gate ‖ up itself (config[5]), making
    silu(gate) · up while it stages x, so that no SiLU·mul kernel runs before it (LlamaMLP)."""
    return config is not None and len(config) > 5 and bool(config[5])


def takes_glu(config: tuple | None) -> bool:
    """Whether a gate_up_proj (gate ‖ up) dispatched to cuda_w4 with this config writes silu(gate) · up itself
    (config[7]; R even, no split K): each warp takes gate rows with their up rows, so that no SiLU·mul kernel
    runs after it (LlamaMLP, Int4Linear.forward_glu)."""
    return config is not None and len(config) > 7 and bool(config[7])


def _glu_fits(w: Int4Weight, config: tuple) -> bool:
    """A GLU launch needs row pairs (R even, N even) and no split K."""
    return config[0] % 2 == 0 and splits(w.in_features, config) == 1 and w.out_features % 2 == 0


def glu_runs(x: torch.Tensor, w: Int4Weight, config: tuple) -> bool:
    """Whether cuda_w4 can make the SiLU·mul of this gate ‖ up call in its epilogue (else gemv_w4 runs it apart)."""
    return takes_glu(config) and _glu_fits(w, config) and supported(x, w)


def supported(x: torch.Tensor, w: Int4Weight) -> bool:
    """Whether cuda_w4 runs this call (else gemv_w4 runs gemv_h2)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] == 1 and w.group_size == 128
            and x.data_ptr() % 16 == 0  # x is read 16 bytes at a time (a slice of another tensor may not be)
            and w.in_features % 128 == 0 and w.in_features <= MAX_K and w.scales.dtype in (torch.float16, torch.bfloat16)
            and w.qweight.is_contiguous() and w.scales.is_contiguous() and w.offsets.is_contiguous()
            and _toolchain() and torch.cuda.get_device_capability(x.device) >= (8, 0))


@functools.cache
def _toolchain() -> bool:
    """NVRTC through torch (2.8 and later) and the CUDA driver's cuLaunchKernelEx."""
    try:
        from torch.cuda._utils import _nvrtc_compile  # noqa: F401

        _driver().cuLaunchKernelEx  # noqa: B018
    except (ImportError, OSError, AttributeError):
        return False
    return True


def persistent_grid(rows: int, per: int, nw: int, persist: int, sms: int) -> int:
    """Programs of the persistent form: as few as finish the row groups (`per` rows a warp) in as many rounds as
    `persist` programs an SM would, so that every warp takes the same number of groups (but the last few)."""
    groups = -(-rows // per)
    rounds = -(-groups // (persist * sms * nw))
    return -(-groups // (rounds * nw))


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"cuda_w4: {what} failed with CUDA driver error {result}")


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_MODULES: list[ctypes.c_void_p] = []
_BROKEN: set[tuple] = set()  # kernels (_function's keys) that did not compile or load here


@functools.cache
def _function(device_index: int, key: tuple) -> ctypes.c_void_p:
    """The compiled kernel of source(*key) on that device (compiled once a process: a few hundred milliseconds;
    later calls cost one lookup of the small key, not the source's formatting)."""
    src = source(*key)
    from torch.cuda._utils import _nvrtc_compile

    major, minor = torch.cuda.get_device_capability(device_index)
    with torch.cuda.device(device_index):
        ptx, name = _nvrtc_compile(src, "gemv_w4", f"{major}{minor}")
        module, func = ctypes.c_void_p(), ctypes.c_void_p()
        _check(_driver().cuModuleLoadData(ctypes.byref(module), ptx if isinstance(ptx, bytes) else ptx.encode()),
               "cuModuleLoadData")
        _check(_driver().cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "cuModuleGetFunction")
    _MODULES.append(module)  # never unloaded
    return func


def gemv_w4(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config=None, silu: bool = False,
            norm: NormIn | None = None, glu: bool = False) -> torch.Tensor:
    """x [1, K] → y [1, N] with the CUDA kernel; config (R rows a warp, S steps ahead, warps a program[, LATE 1:
    with PDL, the next kernel launched after this program's K loop instead of right after its wait[, KS: K split
    over that many programs a row, the last to finish adding the partial sums[, SILU: see takes_silu[, NORM:
    takes_norm[, GLU: takes_glu[, PERSIST: programs an SM of the persistent form, int4_cuda_source.persistent]]]]]]).
    silu: x is gate ‖ up [1, 2K] and y = (silu(gate) · up) Wᵀ (+ bias). Calls it cannot take go to gemv_h2 with the
    config batch 1 would otherwise run (int4_kernels.m1_unswept), after torch's SiLU·mul where silu (before it where
    glu).
    norm: x is the layer's input before its RMSNorm (NormIn; not with silu or split K). glu: W is gate ‖ up and
    y = silu(gate) · up [1, N / 2] (config R even, no split K; not with silu)."""
    config = tuple(config or (2, 2, 8))
    k = w.in_features
    launch = None
    code = 0 if norm is None else _norm_code(x, k, norm) if not silu and splits(k, config) == 1 else None
    glu_ok = not glu or (not silu and _glu_fits(w, config))
    if x.shape[1] == (2 * k if silu else k) and code is not None and glu_ok:
        launch = _kernel(x, w, bias, config, silu=silu, norm=code, glu=glu)
    if launch is None:
        if norm is not None:
            x = apply_norm(x, norm)
        from edgelm.quantization.int4_kernels import m1_unswept
        from edgelm.quantization.int4_ptx import gemv_h2

        if silu:  # silu(gate) rounded to x's type before the product, as the SiLU·mul kernel does
            x = torch.nn.functional.silu(x[:, :k]) * x[:, k:]
        kernel, fallback = m1_unswept(w.out_features, w.in_features)  # (a loaded dispatch may name another kernel)
        y = gemv_h2(x, w, bias, fallback if kernel == "gemv_h2" else None)
        if glu:
            half = w.out_features // 2
            y = torch.nn.functional.silu(y[:, :half]) * y[:, half:]
        return y
    y = torch.empty(1, w.out_features // 2 if glu else w.out_features, dtype=x.dtype, device=x.device)
    _launch(launch, x, w, bias, y, config, norm=norm, glu=glu)
    return y


def gemv_w4_rope(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config, rope,
                 norm: NormIn | None = None) -> torch.Tensor | None:
    """qkv_proj with the rotary and the KV write at its end (int4_fused.RopeStore rope: position, cos ‖ sin table,
    head_dim, q / kv widths, pool buffers, slot): q rotated [1, q_size], k and v written to the pool; or None where
    this kernel cannot take it (config with R ≠ 2 or split K, a layout or dtype it does not handle; the caller then
    runs the projection and the rotary apart). norm: as gemv_w4's."""
    config = tuple(config)
    n, k = w.out_features, w.in_features
    if (config[0] != 2 or splits(k, config) != 1 or x.shape[1] != k or rope.head_dim % 2
            or n != rope.q_size + 2 * rope.kv_size or rope.k_buf.dtype != x.dtype or rope.v_buf.dtype != x.dtype
            or not (rope.k_buf.is_contiguous() and rope.v_buf.is_contiguous())
            or rope.k_buf[0].numel() != rope.kv_size or rope.cos_sin.dtype != torch.float32
            or not rope.cos_sin.is_contiguous() or rope.cos_sin.shape[1] != rope.head_dim
            or rope.positions.dtype != torch.int64 or rope.slots.dtype != torch.int64):
        return None
    code = _norm_code(x, k, norm)
    launch = None if code is None else _kernel(x, w, bias, config, rope=(rope.head_dim, rope.q_size, rope.kv_size),
                                               norm=code)
    if launch is None:
        return None
    y = torch.empty(1, rope.q_size, dtype=x.dtype, device=x.device)
    _launch(launch, x, w, bias, y, config, rope, norm)
    return y


def _kernel(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, config: tuple, silu: bool = False,
            rope: tuple | None = None, norm: int = 0, glu: bool = False) -> tuple[ctypes.c_void_p, bool, int] | None:
    """The compiled kernel for this call, whether it launches with PDL and its persistent programs an SM (0: one tile
    a program), or None where cuda_w4 cannot run it (compile failures logged once)."""
    from edgelm.layers.triton_ops import pdl

    if not (supported(x, w) and (bias is None or bias.dtype == x.dtype)):
        return None
    pdl_on = pdl.mode(x.device, 1, small=False) != 0
    persist = persistent(w.in_features, config) if rope is None else 0  # (the rotary epilogue: one tile a program)
    key = (w.in_features, config[:5], w.scales.dtype == torch.float16, bias is not None, pdl_on,
           x.dtype == torch.float16, silu, rope, norm, glu, persist > 0)
    if key in _BROKEN:
        return None
    try:
        return (_function(x.device.index if x.device.index is not None else torch.cuda.current_device(), key), pdl_on,
                persist)
    except Exception as e:  # NVRTC or the driver refused it: gemv_h2 runs this config from now on
        _BROKEN.add(key)
        logger.warning("cuda_w4 %s unavailable (%s: %s); running gemv_h2 instead", config, type(e).__name__, e)
        return None


def _launch(launch: tuple[ctypes.c_void_p, bool, int], x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None,
            y: torch.Tensor, config: tuple, rope=None, norm: NormIn | None = None, glu: bool = False) -> None:
    """One launch of _kernel's (function, PDL, persistent) on torch's current stream."""
    func, pdl_on, persist = launch
    r, _, nw = config[:3]
    n, k = w.out_features, w.in_features
    rows, per = (n // 2, r // 2) if glu else (n, r)  # glu: a warp's R rows are R / 2 gate / up pairs
    tiles, ks = (rows + nw * per - 1) // (nw * per), splits(k, config)
    grid = persistent_grid(rows, per, nw, persist, sm_count(x.device)) if persist else tiles
    # split K's float32 partials and row-tile counters (left at zero by the kernel), shared with the other int4 kernels
    part = scratch(x.device, "int4", torch.float32, ks * n) if ks > 1 else y
    cnt = scratch(x.device, "int4", torch.int32, tiles) if ks > 1 else y
    tensors = [x, w.qweight, w.scales, w.offsets, bias if bias is not None else x, y]
    rest = ([rope.positions, rope.cos_sin, rope.k_buf, rope.v_buf, rope.slots] if rope is not None else [y] * 5)
    if norm is not None:
        res = norm.residual if norm.residual is not None else y
        rest += [norm.weight, res, norm.res_out if norm.residual is not None else y]
    else:
        rest += [y] * 3
    args = ([ctypes.c_void_p(t.data_ptr()) for t in tensors] + [ctypes.c_int(n)]
            + [ctypes.c_void_p(t.data_ptr()) for t in [part, cnt] + rest]
            + [ctypes.c_float(norm.eps if norm is not None else 0.0)])
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(p), ctypes.c_void_p) for p in args])
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    cfg = _LaunchConfig(grid_x=grid, grid_y=ks, grid_z=1, block_x=nw * 32, block_y=1, block_z=1,
                        shared_bytes=0, stream=torch.cuda.current_stream(x.device).cuda_stream,
                        attrs=ctypes.pointer(attr) if pdl_on else None, num_attrs=1 if pdl_on else 0)
    _check(_driver().cuLaunchKernelEx(ctypes.byref(cfg), func, params, None), "cuLaunchKernelEx")
