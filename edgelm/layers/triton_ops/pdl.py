"""Programmatic dependent launch (PDL) for the decode step's Triton kernels, on GPUs that have it.

A decode step at batch 1 is ~320 kernels in a row; each one's start costs a launch and a ramp while
the previous one drains. With PDL (SM 9.0 and later: Hopper, Blackwell) a kernel is launched while
its predecessor still runs: it loads what does not depend on the predecessor (weights), then waits
(`griddepcontrol.wait`) until the predecessor has finished and its writes are visible, then tells
its own successor that it may launch. Every kernel launched this way waits before it reads
anything an earlier kernel of the step wrote and before it writes anything, so the step computes
exactly what it computes without PDL; kernels launched without it (torch's) are ordered as usual.

Jetson Orin (SM 8.7) and Ampere have no PDL: there the kernels are compiled without these
instructions and launched as before. Switched by the triton_ops op "pdl".
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # newer Triton (3.6 on the H100 here, 3.9 in CI)
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait

    HAS_PDL = True
except ImportError:  # older Triton (JetPack's): never compiled in (PDL is off), only named
    HAS_PDL = False

    @triton.jit
    def _gdc_wait():
        pass

    @triton.jit
    def _gdc_launch_dependents():
        pass

from edgelm.layers import triton_ops

_capable: dict[int | None, bool] = {}


def _supported_by_triton() -> bool:
    if not HAS_PDL:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


_TRITON_OK = _supported_by_triton()


def active(device: torch.device) -> bool:
    """Whether kernels on `device` are compiled and launched with PDL: switched on, Triton knows
    it, and the GPU is SM 9.0 or later."""
    if device.type != "cuda" or not _TRITON_OK or not triton_ops.enabled("pdl"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return _capable[index]


# Small kernels (norms, rotary, attention, SiLU·mul) let their successor launch before they wait
# themselves, so that a chain of them reaches the next GEMV at once and its CTAs start loading
# weights while the chain runs (memory is otherwise idle then). A GEMV releases its successor only
# after its own wait, which bounds how far launches run ahead. Correctness does not depend on it:
# every kernel still waits before it reads or writes activations, and a kernel completes only after
# its wait returned, so "predecessor finished" still means "everything before it finished".
EARLY_RELEASE = os.environ.get("EDGELM_PDL_EARLY", "1") != "0"


def mode(device: torch.device, rows: int, small: bool = True) -> int:
    """The PDL constexpr of a kernel over `rows` rows (tokens, requests) on `device`: 0 off; 1 wait,
    then release the successor; 2 release the successor, then wait (small kernels, when
    EARLY_RELEASE); a GEMV's launch config may turn 1 into 3 (wait, release at release_late).
    Batch 1 only: on an H100 PDL made the batch-1 Llama-3.1-8B step faster (5.81 -> 5.68 ms in
    bench_one_batch) and the batch-8 step slower (6.48 -> 7.0 ms), not yet understood; so a step of
    several requests (and a prefill) launches as before."""
    if rows != 1 or not active(device):
        return 0
    return 2 if small and EARLY_RELEASE else 1


def launch_kwargs(pdl_mode: int) -> dict:
    """Extra launch options for a kernel compiled with PDL=pdl_mode (none when 0, so that a Triton
    without the option never sees it)."""
    return {"launch_pdl": True} if pdl_mode else {}


@triton.jit
def wait_and_release(PDL: tl.constexpr):
    """Wait until the previous kernel has finished (its writes visible), and let the next kernel
    launch (before the wait when PDL == 2, after it when PDL == 1; PDL == 3: later, at
    release_late). Call before the first read of anything an earlier kernel wrote and before any
    write; only loads of weights may come before it. A no-op when PDL == 0."""
    if PDL == 2:
        _gdc_launch_dependents()
        _gdc_wait()
    elif PDL == 1:
        _gdc_wait()
        _gdc_launch_dependents()
    elif PDL == 3:
        _gdc_wait()


@triton.jit
def release_late(PDL: tl.constexpr):
    """PDL == 3: let the next kernel launch now (a GEMV calls it when its loads are done, so that the
    kernels after it do not take SM slots while its own programs still wait to start). A no-op otherwise."""
    if PDL == 3:
        _gdc_launch_dependents()
