"""Decode-step small ops and skinny linears at Llama-3.1-8B shapes: torch vs edgelm's Triton kernels.

    python benchmarks/gpu/decode_ops_bench.py --out benchmarks/results/decode_ops_h100.json

Method (see the device's METHOD.md): each variant is warmed up, then `inner` calls are captured in one
CUDA graph and the graph is replayed `trials` times, each timed with CUDA events; the figure is the
median replay time / inner, so launch gaps are those of a captured decode step. Small-op inputs stay
in L2, as a decode step's activations do. Linear weights are rotated among enough copies to exceed
L2 (50 MB on an H100), so every call streams its weight from HBM; bandwidth = weight bytes / time.
Every variant's output is checked against the torch path before it is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgelm.layers.activation import SiluAndMul  # noqa: E402
from edgelm.layers.layernorm import RMSNorm  # noqa: E402
from edgelm.layers.rotary import RotaryEmbedding  # noqa: E402
from edgelm.layers.triton_ops.gemv import CONFIGS, skinny_gemm  # noqa: E402
from edgelm.layers.triton_ops.rmsnorm import rms_norm  # noqa: E402
from edgelm.layers.triton_ops.rotary import rotary_embedding_  # noqa: E402
from edgelm.layers.triton_ops.silu_mul import silu_and_mul  # noqa: E402

HIDDEN, INTERMEDIATE, HEAD_DIM, Q_HEADS, KV_HEADS, VOCAB = 4096, 14336, 128, 32, 8, 128256
DEVICE = "cuda"
LINEAR_SHAPES = {  # name → (out_features N, in_features K)
    "qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336), "lm_head": (VOCAB, 4096),
}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def time_graph(fn, inner: int, trials: int) -> float:
    """Median microseconds per call of fn, from CUDA-graph replays of `inner` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fn(i)
    for _ in range(2):
        graph.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / inner)
    del graph
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def bench_ops(batches, inner, trials) -> list[dict]:
    dt, dev = torch.bfloat16, DEVICE
    norm = RMSNorm(HIDDEN, eps=1e-5, dtype=dt, device=dev)
    norm.weight.data.normal_(1.0, 0.1)
    rope = RotaryEmbedding(HEAD_DIM, 131072, 500000.0, LLAMA31_ROPE, device=dev)
    rows = []
    for batch in batches:
        rows += _bench_ops_at(batch, norm, rope, inner, trials)
    return rows


def _bench_ops_at(batch: int, norm: RMSNorm, rope: RotaryEmbedding, inner: int, trials: int) -> list[dict]:
    dt, dev = torch.bfloat16, DEVICE
    act = SiluAndMul()
    q_size, kv_size = Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    x = torch.randn(batch, HIDDEN, dtype=dt, device=dev)
    res = torch.randn(batch, HIDDEN, dtype=dt, device=dev)
    gate_up = torch.randn(batch, 2 * INTERMEDIATE, dtype=dt, device=dev)
    qkv = torch.randn(batch, q_size + 2 * kv_size, dtype=dt, device=dev)
    positions = torch.randint(0, 8192, (batch,), device=dev)

    def split(t):
        q, k, _ = t.split([q_size, kv_size, kv_size], dim=-1)
        return q, k

    ref_q, ref_k = rope.forward_native(positions, *split(qkv))
    qkv_check = qkv.clone()
    rotary_embedding_(positions, *split(qkv_check), rope.cos_sin_cache, HEAD_DIM)
    fused_out, fused_res = rms_norm(x, norm.weight, norm.eps, res)
    checks = {
        "add_rmsnorm": max(rel_err(fused_out, norm.forward_native(x, res)[0]),
                           float(not torch.equal(fused_res, x + res))),
        "rmsnorm": rel_err(rms_norm(x, norm.weight, norm.eps), norm.forward_native(x)),
        "silu_and_mul": rel_err(silu_and_mul(gate_up), act.forward_native(gate_up)),
        "rotary": max(rel_err(split(qkv_check)[0], ref_q), rel_err(split(qkv_check)[1], ref_k)),
    }
    variants = {
        "add_rmsnorm": (lambda i: norm.forward_native(x, res),
                        lambda i: rms_norm(x, norm.weight, norm.eps, res)),
        "rmsnorm": (lambda i: norm.forward_native(x), lambda i: rms_norm(x, norm.weight, norm.eps)),
        "silu_and_mul": (lambda i: act.forward_native(gate_up), lambda i: silu_and_mul(gate_up)),
        "rotary": (lambda i: rope.forward_native(positions, *split(qkv)),
                   lambda i: rotary_embedding_(positions, *split(qkv), rope.cos_sin_cache, HEAD_DIM)),
    }
    rows = []
    for op, (native, fused) in variants.items():
        t_native = time_graph(native, inner, trials)
        t_fused = time_graph(fused, inner, trials)
        t_native2 = time_graph(native, inner, trials)  # run-to-run spread
        rows.append({"op": op, "batch": batch, "native_us": round(t_native, 3),
                     "native_us_repeat": round(t_native2, 3), "triton_us": round(t_fused, 3),
                     "speedup": round(min(t_native, t_native2) / t_fused, 3), "rel_err_vs_native": checks[op]})
        print(f"{op:14s} bs={batch:3d} native {t_native:8.2f} us ({t_native2:.2f})  triton {t_fused:8.2f} us"
              f"  x{rows[-1]['speedup']:.2f}  err {checks[op]:.1e}", flush=True)
    return rows


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written): the memory ceiling."""
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    us = time_graph(lambda i: b.copy_(a), 4, 10)
    return 2 * a.numel() * 2 / (us * 1e-6) / 1e9


def bench_linears(ms, trials, l2_bytes: int, rows: list[dict], save) -> list[dict]:
    for name, (n, k) in LINEAR_SHAPES.items():
        rows += _bench_linear_shape(name, n, k, ms, trials, l2_bytes)
        torch.cuda.empty_cache()
        save()  # a run cut short keeps what it measured
    return rows


def _bench_linear_shape(name: str, n: int, k: int, ms, trials: int, l2_bytes: int) -> list[dict]:
    dt, dev = torch.bfloat16, DEVICE
    weight_bytes = n * k * 2
    copies = max(1, math.ceil(4 * l2_bytes / weight_bytes))
    weights = [torch.randn(n, k, dtype=dt, device=dev) / k**0.5 for _ in range(copies)]
    inner = copies * max(1, 8 // copies)
    rows = []
    for m in ms:
        x = torch.randn(m, k, dtype=dt, device=dev)
        ref = x.float() @ weights[0].float().T
        impls = {"cublas": lambda i, x=x: F.linear(x, weights[i % copies])}
        for cname, config in CONFIGS.items():
            if not config.use_dot and m > 2:
                continue
            impls[cname] = lambda i, x=x, c=config: skinny_gemm(x, weights[i % copies], None, c)
        row = {"name": name, "N": n, "K": k, "M": m, "weight_copies": copies, "us": {}, "GBps": {},
               "rel_err": {}}
        for iname, fn in impls.items():
            row["rel_err"][iname] = rel_err(fn(0), ref)
            if row["rel_err"][iname] > 1e-2:
                print(f"  {name} M={m} {iname}: wrong result (rel err {row['rel_err'][iname]:.2e})")
                continue
            us = time_graph(fn, inner, trials)
            row["us"][iname] = round(us, 3)
            row["GBps"][iname] = round(weight_bytes / (us * 1e-6) / 1e9, 1)
        row["cublas_us_repeat"] = round(time_graph(impls["cublas"], inner, trials), 3)
        custom = {c: t for c, t in row["us"].items() if c != "cublas"}
        best = min(custom, key=custom.get) if custom else None
        row["best_custom"] = best
        row["best_custom_speedup"] = (round(min(row["us"]["cublas"], row["cublas_us_repeat"]) / custom[best], 3)
                                      if best else None)
        rows.append(row)
        print(f"{name:13s} M={m} cublas {row['us']['cublas']:8.2f} us ({row['GBps']['cublas']:6.0f} GB/s, "
              f"repeat {row['cublas_us_repeat']:.2f})  best {best} {custom.get(best, float('nan')):8.2f} us "
              f"x{row['best_custom_speedup']}", flush=True)
    return rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--linear-m", default="1,2,4,8")
    parser.add_argument("--inner", type=int, default=50, help="small-op calls per captured graph")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--skip-linear", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    import triton

    t0 = time.time()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": props.name, "sm": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "method": __doc__.split("Method")[1].strip(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(result, indent=1) + "\n")

    result["copy_GBps"] = round(copy_bandwidth(), 1)
    print(f"{props.name}: device-to-device copy {result['copy_GBps']:.0f} GB/s", flush=True)
    result["ops"] = bench_ops([int(b) for b in args.batches.split(",")], args.inner, args.trials)
    save()
    if not args.skip_linear:
        result["linear"] = []
        bench_linears([int(m) for m in args.linear_m.split(",")], args.trials, props.L2_cache_size,
                      result["linear"], save)
    save()
    print(f"wrote {out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
