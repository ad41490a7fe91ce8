"""int4 prefill (M > 64 rows): today's path (dequantize the whole weight to bf16, then cuBLAS) against
the Triton kernel that dequantizes in registers and feeds the tensor cores (int4_kernels "gemm",
`_gemm_kernel`) at large M, and bf16 cuBLAS; Llama-3.1-8B layer shapes, group 128, bf16 activations.
Timing as int4_bench.py (CUDA graph over weight copies that defeat the L2).

    python benchmarks/gpu/int4_prefill_probe.py --out $OUT/int4_prefill_probe_h100.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from int4_bench import SHAPES, bf16_copies, int4_copies, time_calls  # noqa: E402

from edgelm.bench_utils import result_header, write_json  # noqa: E402
from edgelm.quantization import int4_kernels as kern  # noqa: E402

GEMM_CONFIGS = [(64, 64, 1, 4), (64, 128, 1, 4), (128, 64, 1, 8), (128, 128, 1, 8)]  # (BLOCK_M, BLOCK_N, SPLIT_K, warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--ms", default="512,2048")
    args = ap.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        ws = int4_copies(n, k, 128)
        wb = bf16_copies(n, k)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "N": n, "K": k, "M": m,
                   "bf16_us": time_calls([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in wb], 8, 7) * 1e6,
                   "dequant_us": time_calls([lambda w=w, x=x: kern.dequant_matmul(x, w, None) for w in ws], 8, 7) * 1e6}
            for cfg in GEMM_CONFIGS:
                try:
                    t = time_calls([lambda w=w, x=x, c=cfg: kern.gemm(x, w, None, c) for w in ws], 8, 7) * 1e6
                except Exception as exc:  # a config that does not compile or fit (shared memory)
                    t = None
                    print(f"{name} M={m} gemm {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                row[f"gemm_{'_'.join(map(str, cfg))}_us"] = t
            rows.append({k2: (round(v, 1) if isinstance(v, float) else v) for k2, v in row.items()})
            print(rows[-1], flush=True)
        del ws, wb
        torch.cuda.empty_cache()
    result = {**result_header("int4 prefill GEMM paths vs bf16 cuBLAS", "benchmarks/gpu/int4_prefill_probe.py",
                              sys.argv[1:]), "rows": rows}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
