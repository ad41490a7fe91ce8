"""Probe: is the hand-written CUDA batch-1 int4 GEMV (edgelm.quantization.int4_cuda, `cuda_w4`) faster than gemv_h2
alone on this GPU, and in which config (R rows a warp, S steps ahead, warps a program)?

Each config is checked against dequantize-then-matmul, then timed as int4_bench times kernels (one CUDA graph
over weight copies that defeat the L2) beside gemv_h2 with the config it runs on that shape otherwise, both with
PDL on and off (off: each launch waits for the one before; on: as in a decode step on SM 9.0+). Alone is not the
step: int4_variants.py times configs inside the whole decode step.

results/cuda_gemv_probe_h100.json was made (PDL off only) by this script's first form, commit 6b0057b, which held its
own copy of the kernel (bf16 activations only, no bias, no late release) — the same arithmetic and structure.

    python benchmarks/gpu/cuda_gemv_probe.py --out $OUT/cuda_gemv_probe_h100.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from edgelm.bench_utils import result_header, write_json  # noqa: E402

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}
CONFIGS = [(r, s, nw) for r in (1, 2, 4) for s in (2, 4) for nw in (4, 8)] + [(2, 4, 4, 1), (1, 2, 8, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--configs", help="r,s,nw[,late];... (default: all of CONFIGS)")
    args = ap.parse_args()
    from int4_bench import int4_bytes, int4_copies, time_calls

    from edgelm.layers import triton_ops
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization.int4_cuda import gemv_w4, supported, takes_glu
    from edgelm.quantization.int4_kernels import dequantize

    configs = CONFIGS if not args.configs else [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    rows = []
    plain_ops = ",".join(sorted(triton_ops._enabled))
    no_pdl = ",".join(o for o in triton_ops._enabled if o != "pdl")
    for name, (n, k) in SHAPES.items():
        ws = int4_copies(n, k, 128)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        if not supported(x, ws[0]):
            raise SystemExit("cuda_gemv_probe: cuda_w4 cannot run here (torch without NVRTC, or a GPU before SM 8.0)")
        ref = (x.float() @ dequantize(ws[0], torch.float32).t()).flatten()
        nbytes = int4_bytes(ws[0], 1)
        kernel, h2_config = kern.choose_kernel(1, ws[0])
        if kernel != "gemv_h2":  # the shapes that ship cuda_w4: gemv_h2 with the config it runs there otherwise
            h2_config = kern.m1_unswept(n, k)[1]
        # a GLU config (gate_up_proj only) writes silu(gate) · up: against the reference's
        glu_ref = torch.nn.functional.silu(ref[:n // 2]) * ref[n // 2:]

        def glu(x, w, bias, config):
            return gemv_w4(x, w, bias, config, glu=True)

        cands = [("gemv_h2", h2_config, kern.gemv_h2)] + [
            ("cuda_w4", c, glu if takes_glu(c) else gemv_w4) for c in configs if not takes_glu(c) or name == "gate_up_proj"]
        for kernel, config, fn in cands:
            want = glu_ref if fn is glu else ref
            for pdl_on in (True, False):
                row = {"shape": name, "N": n, "K": k, "kernel": f"{kernel} {list(config)}", "pdl": pdl_on}
                triton_ops.set_enabled(plain_ops if pdl_on else no_pdl)
                try:
                    err = ((fn(x, ws[0], None, config).float().flatten() - want).norm() / want.norm()).item()
                    row["rel_err"] = round(err, 5)
                    t = time_calls([lambda w=w, c=config, x=x, fn=fn: fn(x, w, None, c) for w in ws])
                    row.update(us=round(t * 1e6, 2), GBps=round(nbytes / t / 1e9, 1))
                finally:
                    triton_ops.set_enabled(plain_ops)
                rows.append(row)
                print(row, flush=True)
                if args.out:  # so far (a call cut short keeps what it measured)
                    write_json(args.out, {**result_header("cuda_gemv_probe", "benchmarks/gpu/cuda_gemv_probe.py",
                                                          sys.argv[1:]), "partial": True, "rows": rows})
        del ws
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, {**result_header("cuda_gemv_probe", "benchmarks/gpu/cuda_gemv_probe.py", sys.argv[1:]),
                              "rows": rows})


if __name__ == "__main__":
    main()
