"""Evaluate gemlite (Triton W4A16 kernels) against edgelm's int4 kernels and bf16 cuBLAS on the
Llama-3.1-8B linear shapes, same codes, same timing method as int4_bench.py (CUDA graph cycling
weight copies past L2). Needs a CUDA GPU and gemlite importable.

    python benchmarks/gpu/gemlite_eval.py --out $OUT/gemlite_eval_h100.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from int4_bench import SHAPES, bf16_copies, copy_bandwidth, int4_bytes, int4_copies, time_calls  # noqa: E402

from edgelm.bench_utils import write_json  # noqa: E402
from edgelm.quantization import int4_kernels as kern  # noqa: E402
from edgelm.quantization.int4_pack import dequantize_int4, unpack_int4  # noqa: E402


def gemlite_layer(w, dtype):
    """A gemlite layer holding the same codes: W ≈ q·s + m, i.e. gemlite's (q - z)·s with z = -m/s."""
    from gemlite import DType, GemLiteLinear

    n, k = w.out_features, w.in_features
    q = unpack_int4(w.qweight)[:, :k].to(torch.uint8).contiguous()
    s = w.scales.to(dtype)
    z = (-w.offsets.float() / w.scales.float()).to(dtype)
    gd = DType.BF16 if dtype == torch.bfloat16 else DType.FP16
    layer = GemLiteLinear(4, group_size=w.group_size, in_features=k, out_features=n, input_dtype=gd, output_dtype=gd)
    layer.pack(q, s.reshape(-1, 1), z.reshape(-1, 1), None)
    return layer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out")
    args = ap.parse_args()
    import gemlite

    dtype = torch.bfloat16
    bw = copy_bandwidth()
    rows = []
    for name, (n, k) in SHAPES.items():
        ours = int4_copies(n, k, args.group)  # the same codes in every copy
        w0 = ours[0]
        gl = [gemlite_layer(w, dtype) for w in ours]
        g0 = gl[0]
        wb = bf16_copies(n, k)
        ref_w = dequantize_int4(w0, torch.float32)
        for m in args.batch:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ ref_w.t()
            err_ours = float((kern.int4_linear(x, w0).float() - ref).norm() / ref.norm())
            err_gl = float((g0(x).float() - ref).norm() / ref.norm())
            t0 = time.time()
            t_bf16 = time_calls([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in wb])
            t_ours = time_calls([lambda w=w, x=x: kern.int4_linear(x, w) for w in ours])
            t_gl = time_calls([lambda g=g, x=x: g(x) for g in gl])
            nbytes = int4_bytes(w0, m)
            row = {"shape": name, "N": n, "K": k, "M": m, "bf16_us": round(t_bf16 * 1e6, 2),
                   "edgelm_us": round(t_ours * 1e6, 2), "gemlite_us": round(t_gl * 1e6, 2),
                   "edgelm_fraction_of_roofline": round(nbytes / bw / t_ours, 3),
                   "gemlite_fraction_of_roofline": round(nbytes / bw / t_gl, 3),
                   "rel_err_edgelm": round(err_ours, 5), "rel_err_gemlite": round(err_gl, 5),
                   "seconds": round(time.time() - t0, 1)}
            print(row, flush=True)
            rows.append(row)
        del ours, gl, wb
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "gemlite": getattr(gemlite, "__version__", "?"),
              "triton": __import__("triton").__version__, "torch": torch.__version__, "group_size": args.group,
              "copy_bandwidth_GBps": round(bw / 1e9, 1), "rows": rows,
              "command": "python benchmarks/gpu/gemlite_eval.py " + " ".join(sys.argv[1:])}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
