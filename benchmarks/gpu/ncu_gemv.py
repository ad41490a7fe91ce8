"""One batch-1 GEMV of a Llama-3.1-8B shape, launched a few times, for Nsight Compute to read its counters
(why a kernel is slower than its bytes: DRAM throughput, issue activity, warp stall reasons).

    ncu --clock-control none --set full -k regex:'gemv_h2|skinny' --launch-skip 4 --launch-count 1 \
        python3 benchmarks/gpu/ncu_gemv.py --shape gate_up_proj --dtype int4
    bash benchmarks/gpu/ncu_run.sh  # every shape, int4 and bf16, reports into $OUT

The int4 kernel is the one batch 1 dispatches (int4_kernels.choose_kernel); bf16 is layers.linear (the
Triton skinny GEMM where it is the measured winner). Timings under ncu are not the kernels' real ones.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from int4_bench import SHAPES  # noqa: E402

from edgelm.layers.linear import linear  # noqa: E402
from edgelm.quantization import int4_kernels as kern  # noqa: E402
from edgelm.quantization.int4_pack import quantize_int4  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--dtype", choices=("int4", "bf16"), default="int4")
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--config", help="int4: a gemv_h2 config instead of the dispatched one, e.g. 16,8,1,4,4")
    ap.add_argument("--meta", action="store_true", help="int4: scales and offsets paired (int4_meta_pairs)")
    args = ap.parse_args()
    n, k = SHAPES[args.shape]
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    if args.dtype == "int4":
        q = quantize_int4(w, 128, "minmax", meta_precision=torch.bfloat16)
        kernel, config = ("gemv_h2", tuple(int(v) for v in args.config.split(","))) if args.config else \
            kern.choose_kernel(1, q)
        if args.meta:
            from edgelm.layers import triton_ops
            from edgelm.quantization.int4_pack import meta_pairs

            q.meta = meta_pairs(q.scales, q.offsets)
            triton_ops.set_enabled(",".join(sorted(triton_ops.DEFAULT_ON | {"int4_meta_pairs"})))
        print(f"{args.shape}: {kernel} {config} meta={args.meta}")
        for _ in range(args.calls):
            kern.KERNELS[kernel](x, q, None, config)
    else:
        for _ in range(args.calls):
            linear(x, w)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
