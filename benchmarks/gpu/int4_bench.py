"""W4A16 int4 vs bf16 linear layers on the Llama-3.1-8B shapes (needs a CUDA GPU).

Times each layer in a CUDA graph that cycles through enough copies of the weights to defeat the L2
cache (over 256 MB per graph), and reports per shape and batch M: bf16 (cuBLAS) time, int4 time,
speedup, the int4 kernel's achieved bandwidth (packed codes + scales + offsets + x + y) and its
fraction of the measured device-to-device copy bandwidth (the roofline).

    python benchmarks/gpu/int4_bench.py --out benchmarks/results/int4_h100.json
    python benchmarks/gpu/int4_bench.py --tune   # sweep launch configurations, print the best
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from edgelm.quantization import int4_kernels as kern  # noqa: E402
from edgelm.quantization.int4_pack import Int4Weight, quantize_int4  # noqa: E402

SHAPES = {  # name: (out_features N, in_features K)
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
}
L2_DEFEAT_BYTES = 256 << 20


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * (1 << 30) / sorted(times)[len(times) // 2]


def time_calls(calls: list, min_calls: int = 48, replays: int = 15) -> float:
    """Median seconds per call of `calls` (each a no-argument function) replayed in one CUDA graph."""
    for c in calls:
        c()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    reps = max(1, math.ceil(min_calls / len(calls)))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                for c in calls:
                    c()
    torch.cuda.synchronize()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (reps * len(calls)))
    return sorted(times)[len(times) // 2]


def int4_copies(n: int, k: int, group: int) -> list[Int4Weight]:
    w0 = quantize_int4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, group, "minmax")
    count = max(2, math.ceil(L2_DEFEAT_BYTES / w0.nbytes()))
    return [w0] + [Int4Weight(w0.qweight.clone(), w0.scales.clone(), w0.offsets.clone(), k, group)
                   for _ in range(count - 1)]


def bf16_copies(n: int, k: int) -> list[torch.Tensor]:
    count = max(2, math.ceil(L2_DEFEAT_BYTES / (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]


def int4_bytes(w: Int4Weight, m: int) -> int:
    return w.nbytes() + m * (w.in_features + w.out_features) * 2


def run_int4(ws, x, path: str, config=None) -> float:
    if path == "gemv":
        return time_calls([lambda w=w: kern.gemv(x, w, None, config) for w in ws])
    if path == "gemm":
        return time_calls([lambda w=w: kern.gemm(x, w, None, config) for w in ws])
    if path == "dequant":
        return time_calls([lambda w=w: torch.nn.functional.linear(x, kern.dequantize(w, x.dtype)) for w in ws])
    return time_calls([lambda w=w: kern.int4_linear(x, w) for w in ws])


def tune(group: int, out: str | None, budget_s: float) -> dict:
    t0 = time.time()
    results = {"gemv": {}, "gemm": {}}
    gemv_space = list(itertools.product((4, 8, 16), (32, 64, 128), (1, 2), (4, 8)))
    gemm_space = list(itertools.product((16, 32), (16, 32, 64), (1, 2, 4), (4,)))
    for name, (n, k) in SHAPES.items():
        ws = int4_copies(n, k, group)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for cfg in gemv_space:
            if time.time() - t0 > budget_s:
                break
            try:
                results["gemv"].setdefault(str(cfg), {})[name] = run_int4(ws, x1, "gemv", cfg) * 1e6
            except Exception as exc:  # a configuration that does not compile is skipped
                print("gemv", cfg, "failed:", type(exc).__name__, str(exc)[:100])
        for m in (1, 8, 32):
            xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for cfg in gemm_space:
                if time.time() - t0 > budget_s or (m <= 16 and cfg[0] > 16) or (m == 1 and cfg[2] > 2):
                    continue
                try:
                    results["gemm"].setdefault(f"M{m} {cfg}", {})[name] = run_int4(ws, xm, "gemm", cfg) * 1e6
                except Exception as exc:
                    print("gemm", cfg, "failed:", type(exc).__name__, str(exc)[:100])
            if m > 1:
                results["gemm"].setdefault(f"M{m} dequant+cublas", {})[name] = run_int4(ws, xm, "dequant") * 1e6
        del ws
        torch.cuda.empty_cache()
    for kind, table in results.items():
        ranked = sorted(((sum(math.log(t) for t in v.values()) / len(v), c, v) for c, v in table.items()
                         if len(v) == len(SHAPES)), key=lambda r: (r[1].split()[0] if kind == "gemm" else "", r[0]))
        print(f"--- {kind}: geometric-mean time (us) over shapes, then per shape")
        for score, cfg, v in ranked[:40]:
            print(f"{cfg:28s} {math.exp(score):8.2f}  " + "  ".join(f"{s}={t:.1f}" for s, t in v.items()))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def bench(group: int, ms: list[int], out: str | None) -> dict:
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    rows = []
    for name, (n, k) in SHAPES.items():
        ws = int4_copies(n, k, group)
        wb = bf16_copies(n, k)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = time_calls([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in wb])
            t_int4 = run_int4(ws, x, "auto")
            nbytes = int4_bytes(ws[0], m)
            ideal = nbytes / bw
            rows.append({"shape": name, "N": n, "K": k, "M": m, "bf16_us": round(t_bf16 * 1e6, 2),
                         "int4_us": round(t_int4 * 1e6, 2), "speedup": round(t_bf16 / t_int4, 2),
                         "int4_bytes": nbytes, "int4_GBps": round(nbytes / t_int4 / 1e9, 1),
                         "bf16_GBps": round((n * k + m * (n + k)) * 2 / t_bf16 / 1e9, 1),
                         "int4_roofline_us": round(ideal * 1e6, 2),
                         "int4_fraction_of_roofline": round(ideal / t_int4, 3)})
            print(f"{name:13s} M={m:3d}  bf16 {t_bf16 * 1e6:7.2f} us  int4 {t_int4 * 1e6:7.2f} us  "
                  f"x{t_bf16 / t_int4:5.2f}  {nbytes / t_int4 / 1e9:6.0f} GB/s  "
                  f"{100 * ideal / t_int4:5.1f}% of roofline")
        del ws, wb
        torch.cuda.empty_cache()
    result = {"device": props.name, "sm": f"{props.major}.{props.minor}", "torch": torch.__version__,
              "triton": __import__("triton").__version__, "group_size": group,
              "copy_bandwidth_GBps": round(bw / 1e9, 1), "gemv_config": kern.GEMV_CONFIG,
              "gemm_config": kern.GEMM_CONFIG, "timing": "median of 15 CUDA-graph replays; each replay "
              "cycles through weight copies totalling over 256 MB (no L2 reuse)",
              "command": "python benchmarks/gpu/int4_bench.py " + " ".join(sys.argv[1:]), "rows": rows}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON result here")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--ms", default="1,8,32", help="batch sizes M, comma-separated")
    parser.add_argument("--tune", action="store_true", help="sweep kernel launch configurations instead")
    parser.add_argument("--tune-budget", type=float, default=150.0, help="seconds the sweep may take")
    args = parser.parse_args()
    if args.tune:
        tune(args.group, args.out, args.tune_budget)
    else:
        bench(args.group, [int(m) for m in args.ms.split(",")], args.out)


if __name__ == "__main__":
    main()
