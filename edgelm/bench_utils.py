"""The two ceilings a benchmark is judged against, measured on the machine it runs on:
memory bandwidth (what bounds decode) and the matmul rate (what bounds prefill)."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import torch


def write_json(path: str, result: dict, indent: int = 1) -> None:
    """A benchmark's result as JSON (the folder made if missing), ending in a newline."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=indent)
        f.write("\n")


def result_header(benchmark: str, script: str, argv: list[str]) -> dict:
    """The fields every GPU benchmark JSON starts with: what, the exact command, when (UTC), which device."""
    import datetime

    return {"benchmark": benchmark, "command": f"python {script} " + " ".join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def _time_ms(fn: Callable[[], object], device: str, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn`: device events on CUDA, the host clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_bandwidth(device: str, nbytes: int | None = None, iters: int | None = None) -> dict:
    """GB/s (1e9 bytes/s) of a device-to-device copy (bytes read + bytes written) and of a
    read-only reduction, over buffers far larger than the caches. `bandwidth_gbps` is the better."""
    if nbytes is None:
        nbytes = (1 << 30) if device == "cuda" else (64 << 20)
    iters = iters or (20 if device == "cuda" else 5)
    n = nbytes // 4
    src = torch.randn(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src), device, iters)
    read_ms = _time_ms(lambda: src.sum(), device, iters)
    out = {"buffer_bytes": n * 4,
           "copy_gbps": 2 * n * 4 / copy_ms / 1e6,
           "read_gbps": n * 4 / read_ms / 1e6}
    out["bandwidth_gbps"] = max(out["copy_gbps"], out["read_gbps"])
    return out


def measure_matmul_peak(device: str, dtype: torch.dtype = torch.bfloat16, size: int | None = None,
                        iters: int | None = None) -> dict:
    """TFLOP/s of one square matmul of random inputs (2·n³ flops), e.g. bf16 n = 8192 on a GPU."""
    if size is None:
        size = 8192 if device == "cuda" else 512
    iters = iters or (20 if device == "cuda" else 5)
    if device == "cpu" and dtype in (torch.float16,):
        dtype = torch.float32  # half matmuls on a CPU measure an emulation, not a peak
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    ms = _time_ms(lambda: a @ b, device, iters)
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "matmul_tflops": 2 * size**3 / ms / 1e9}


def measure_peaks(device: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    peaks = {**measure_bandwidth(device), **measure_matmul_peak(device, dtype)}
    if device == "cuda":
        torch.cuda.empty_cache()  # give the buffers back before the model loads
    return peaks
