"""The int8 LM head (--quantize-lm-head int8, edgelm.quantization.int8_head) against the 16-bit head, alone.

For each head shape and row count: the 16-bit head as the server runs it (edgelm.layers.linear.linear, then
.float()) and every int8_head.CANDIDATES config, checked against float64 x · dequantized weightᵀ
(‖out − ref‖ / ‖ref‖) and timed in one CUDA graph (int4_bench.time_calls; the weights are larger than the
L2). Prints the best config per row count and writes everything, with the GB/s of each, to --out.
`--best-env` prints an EDGELM_INT8_HEAD_CONFIG value (the best M = 1 config, the best dot config for M > 1).

    python benchmarks/gpu/int8_head_bench.py --out $OUT/int8_head_h100.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from edgelm.bench_utils import result_header, write_json  # noqa: E402

SHAPES = {"llama-3.1-8b": (128256, 4096), "llama-3.2-3b": (128256, 3072), "qwen2.5-1.5b": (151936, 1536)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--shapes", default="llama-3.1-8b", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--best-env", help="write the EDGELM_INT8_HEAD_CONFIG value of the first shape here")
    args = ap.parse_args()
    from int4_bench import time_calls

    from edgelm.layers.linear import linear
    from edgelm.quantization.int8_head import CANDIDATES, int8_head_matmul, quantize_rows

    rows_out = []
    best_env = None
    for shape_name in args.shapes.split(","):
        n, k = SHAPES[shape_name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q, scale = quantize_rows(w)
        deq = (q.double() * scale.double()[:, None])
        best = {}
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ deq.t()
            dense_us = time_calls([lambda x=x, w=w: linear(x, w).float()]) * 1e6
            row = {"shape": shape_name, "N": n, "K": k, "M": m, "bf16_us": round(dense_us, 2),
                   "bf16_gbps": round(n * k * 2 / dense_us / 1e3, 1), "int8": {}}
            for cfg in CANDIDATES:
                if (cfg.use_dot and m == 1) or (not cfg.use_dot and m > 4):  # one-row forms: up to 4 rows
                    continue
                try:
                    out = int8_head_matmul(x, q, scale, cfg)  # a fresh (uninitialised) output: NaN or junk fails
                    err = float((out.double() - ref).norm() / ref.norm())
                    if not torch.isfinite(out).all():
                        err = float("inf")
                    us = time_calls([lambda x=x, q=q, s=scale, c=cfg: int8_head_matmul(x, q, s, c)]) * 1e6
                except Exception as exc:  # a config Triton cannot build here: reported, not fatal
                    row["int8"][cfg.name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                    continue
                row["int8"][cfg.name] = {"us": round(us, 2), "gbps": round((n * k + n * 4) / us / 1e3, 1),
                                         "rel_err": err}
            ok = {name: r for name, r in row["int8"].items() if "us" in r and r["rel_err"] < 2e-2}
            if ok:
                name = min(ok, key=lambda c: ok[c]["us"])
                row["best"] = name
                row["best_speedup"] = round(dense_us / ok[name]["us"], 3)
                best[m] = name
            rows_out.append(row)
            print(f"{shape_name} M={m}: bf16 {dense_us:.1f} us; best int8 {row.get('best')} "
                  f"{ok[row['best']]['us'] if ok else float('nan'):.1f} us ({row.get('best_speedup')}x)", flush=True)
        if best_env is None and 1 in best:
            multi = [best[m] for m in best if m > 1]
            best_env = best[1] + ("," + multi[-1] if multi else "")
    if args.best_env and best_env:
        with open(args.best_env, "w") as f:
            f.write(best_env)
    if args.out:
        write_json(args.out, {**result_header("int8_head", "benchmarks/gpu/int8_head_bench.py", sys.argv[1:]),
                              "results": rows_out, "best_env": best_env})


if __name__ == "__main__":
    main()
