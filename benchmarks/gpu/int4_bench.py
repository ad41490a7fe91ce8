"""W4A16 int4 vs bf16 linear layers on the Llama-3.1-8B shapes (needs a CUDA GPU).

Times each layer in a CUDA graph that cycles through enough copies of the weights to defeat the L2
cache (over 256 MB per graph), and reports per shape and batch M: bf16 (cuBLAS) time, int4 time,
speedup, the int4 kernel's achieved bandwidth (packed codes + scales + offsets + x + y) and its
fraction of the measured device-to-device copy bandwidth (the roofline).

    python benchmarks/gpu/int4_bench.py --out benchmarks/results/int4_h100.json
    python benchmarks/gpu/int4_bench.py --tune --tune-out sweep.json --out result.json  # sweep, then the same
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

from edgelm.bench_utils import write_json  # noqa: E402
from edgelm.quantization import int4_kernels as kern  # noqa: E402
from edgelm.quantization.int4_pack import Int4Weight, dequantize_int4, quantize_int4  # noqa: E402

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
    w0 = quantize_int4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, group, "minmax",
                       meta_precision=torch.bfloat16)
    count = max(2, math.ceil(L2_DEFEAT_BYTES / w0.nbytes()))
    return [w0] + [Int4Weight(w0.qweight.clone(), w0.scales.clone(), w0.offsets.clone(), k, group)
                   for _ in range(count - 1)]


def bf16_copies(n: int, k: int) -> list[torch.Tensor]:
    count = max(2, math.ceil(L2_DEFEAT_BYTES / (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]


def int4_bytes(w: Int4Weight, m: int) -> int:
    return w.nbytes() + m * (w.in_features + w.out_features) * 2


def run_path(ws, x, kernel: str, config) -> float:
    """Seconds per call of one kernel and launch config (or 'dequant': dequantize, then cuBLAS)."""
    fn = kern.KERNELS[kernel]
    return time_calls([lambda w=w: fn(x, w, None, config) for w in ws])


def candidates(m: int) -> list[tuple[str, tuple]]:
    """(kernel, config) pairs swept for batch m: at m = 1 the x-stationary GEMV (gemv_xs) and the best
    of the others; above, the tensor-core kernels fed by inline PTX ("tcw":
    weights dequantized in registers; "tc": 16-bit codes, the best four of the H200 sweep in
    benchmarks/results/int4_tune_h200.json), then the kernels kept after the H100 sweep of
    benchmarks/results/int4_tune_h100.json."""
    if m == 1:  # the x-stationary GEMV (REP, num_warps, programs per SM, rows per warp, tiles ahead), then the best
        # M = 1 configs of the other kernels in the H200 sweeps of 2026-12-06 (int4_tune_h200.json)
        xs = [("gemv_xs", c) for c in ((4, 4, 2, 1, 2), (2, 4, 4, 1, 2), (2, 4, 3, 1, 2), (2, 8, 2, 1, 2),
                                       (1, 4, 6, 1, 2), (1, 4, 8, 1, 2), (4, 8, 1, 1, 2), (2, 4, 3, 2, 2),
                                       (4, 4, 2, 1, 1))]
        return xs + [("gemv_h2", c) for c in ((8, 8, 1, 4), (4, 8, 1, 4), (16, 8, 1, 8))] + \
            [("tcw", c) for c in ((128, 8, 4, 1), (128, 8, 8, 1), (128, 8, 4), (128, 8, 8), (128, 4, 4))]
    tc = [("tcw", (bn, sk, nw)) for bn, sk, nw in itertools.product((64, 128), (1, 2, 4, 8), (4, 8))]
    tc += [("tc", c) for c in ((128, 4, 8), (64, 4, 4), (64, 8, 4), (128, 2, 8))]
    # deeper software pipelines for the H200's best tcw configs
    tc += [("tcw", (bn, sk, nw, 0, st)) for (bn, sk, nw), st in itertools.product(((128, 8, 4), (128, 4, 4)), (4, 5))]
    bms = (16,) if m <= 16 else (16, 32)
    return tc + [("dequant", None)] + [("gemm", (bm, bn, sk, 4)) for bm, bn, sk in
                                       itertools.product(bms, (32, 64), (2, 4))]


def correct(ws, x, ref, kernel, config) -> bool:
    y = kern.KERNELS[kernel](x, ws[0], None, config)
    return bool(torch.isfinite(y).all()) and float((y.float() - ref).norm() / ref.norm()) < 1e-2


def tune(group: int, ms: list[int], out: str | None, budget_s: float) -> dict:
    """Sweep kernels and launch configs per batch size; set kern.DISPATCH to the fastest (geometric
    mean over the shapes) and return the table. Each batch size gets a share of the time budget;
    a config is timed on every shape or not at all."""
    t0 = time.time()
    weights = {name: int4_copies(n, k, group) for name, (n, k) in SHAPES.items()}
    table: dict[str, dict[str, float | str]] = {}
    shares = {1: 0.5, 8: 0.2}
    deadline = t0
    for m in ms:
        deadline += budget_s * shares.get(m, 0.3)
        xs = {name: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
        refs = {name: torch.nn.functional.linear(xs[name].float(), dequantize_int4(weights[name][0], torch.float32))
                for name in SHAPES}
        for kernel, config in candidates(m):
            if time.time() > deadline:
                print(f"M={m}: time budget reached, sweep cut short")
                break
            key = f"M{m} {kernel} {config}"
            row = table.setdefault(key, {})
            for name in SHAPES:
                try:
                    if not correct(weights[name], xs[name], refs[name], kernel, config):
                        row[name] = "wrong"
                        break
                    row[name] = round(run_path(weights[name], xs[name], kernel, config) * 1e6, 2)
                except Exception as exc:  # a configuration that does not compile is skipped
                    row[name] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                    break
        del refs
    del weights
    torch.cuda.empty_cache()
    best: dict[int, tuple[float, str, tuple]] = {}
    for m in ms:
        scored = []
        for kernel, config in candidates(m):
            v = table.get(f"M{m} {kernel} {config}", {})
            if len(v) == len(SHAPES) and all(isinstance(t, float) for t in v.values()):
                scored.append((math.exp(sum(math.log(t) for t in v.values()) / len(v)), kernel, config))
        scored.sort(key=lambda r: r[0])
        print(f"--- M={m}: geometric mean over shapes (us), then per shape")
        for score, kernel, config in scored[:12]:
            v = table[f"M{m} {kernel} {config}"]
            print(f"{kernel:9s} {str(config):22s} {score:7.2f}  " + "  ".join(f"{s}={t}" for s, t in v.items()))
        bad = [k for k, v in table.items() if k.startswith(f"M{m} ") and any(isinstance(t, str) for t in v.values())]
        if bad:
            print(f"M={m}: {len(bad)} configs wrong or failed, e.g. {bad[0]}: {table[bad[0]]}")
        if scored:
            best[m] = scored[0]
    buckets = {1: 1, 8: 16, 32: kern.MAX_M_DOT}
    for m, (_, kernel, config) in best.items():
        if m in buckets:
            kern.DISPATCH[buckets[m]] = (kernel, config)
    # per shape: the fastest config where it beats the bucket's choice by more than 2 %
    kern.SHAPE_DISPATCH.clear()
    for name, (n, k) in SHAPES.items():
        for m, bucket in buckets.items():
            if m not in best:
                continue
            chosen = table.get(f"M{m} {best[m][1]} {best[m][2]}", {}).get(name)
            timed = [(v[name], key) for key, v in table.items()
                     if key.startswith(f"M{m} ") and isinstance(v.get(name), float)]
            if timed and isinstance(chosen, float):
                t_best, key = min(timed)
                if t_best < 0.98 * chosen:
                    kernel, config = next((kc, c) for kc, c in candidates(m) if f"M{m} {kc} {c}" == key)
                    kern.SHAPE_DISPATCH.setdefault((n, k), {})[bucket] = (kernel, config)
    print("DISPATCH =", kern.DISPATCH)
    print("SHAPE_DISPATCH =", kern.SHAPE_DISPATCH)
    if out:
        with open(out, "w") as f:
            json.dump({"group_size": group, **kern.dispatch_json(),
                       "seconds": round(time.time() - t0, 1), "table_us": table}, f, indent=1)
    return table


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
            t_int4 = time_calls([lambda w=w, x=x: kern.int4_linear(x, w) for w in ws])
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
    w = torch.randn(*SHAPES["gate_up_proj"], device="cuda", dtype=torch.bfloat16) * 0.02
    quantize_int4(w[:256], group, "search")
    torch.cuda.synchronize()
    t0 = time.time()
    quantize_int4(w, group, "search")
    torch.cuda.synchronize()
    search_s = time.time() - t0
    del w
    result = {"device": props.name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quantize_search_seconds_gate_up": round(search_s, 3), "sm": f"{props.major}.{props.minor}", "torch": torch.__version__,
              "triton": __import__("triton").__version__, "group_size": group,
              "copy_bandwidth_GBps": round(bw / 1e9, 1),
              "dispatch": {str(k): v for k, v in kern.DISPATCH.items()}, "timing": "median of 15 CUDA-graph replays; each replay "
              "cycles through weight copies totalling over 256 MB (no L2 reuse)",
              "command": "python benchmarks/gpu/int4_bench.py " + " ".join(sys.argv[1:]), "rows": rows}
    if out:
        write_json(out, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON result here")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--ms", default="1,8,32", help="batch sizes M, comma-separated")
    parser.add_argument("--tune", action="store_true",
                        help="first sweep kernels and launch configs and dispatch to the fastest")
    parser.add_argument("--tune-out", help="write the sweep's JSON here")
    parser.add_argument("--tune-budget", type=float, default=150.0, help="seconds the sweep may take")
    args = parser.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    if args.tune:
        tune(args.group, ms, args.tune_out, args.tune_budget)
    bench(args.group, ms, args.out)


if __name__ == "__main__":
    main()
