"""What limits the batch-1 int4 GEMV (int4_ptx's gemv_h2) on this GPU: its arithmetic or its loads.

Times gemv_h2 alone (int4_bench's CUDA graph over weight copies that defeat the L2) on the Llama-3.1-8B
shapes with the shipped batch-1 configs, three times, each in a fresh process with its own Triton cache:
- "full": the kernel as shipped;
- "half_alu": the per-word PTX does two of its four nibble-pair steps (half the dequantize-and-multiply
  instructions; wrong results, the same loads);
- "no_alu": the per-word PTX is two instructions that still consume the word and one x pair.
If "half_alu" is much faster than "full", the kernel is short of instruction issue; if "no_alu" is no
faster than "full", its loads are what it waits for. Results are timings only (the outputs are garbage).
- "prep": the GEMV on prepared x (triton_ops "int4_xprep"), each call its x_prep kernel then the GEMV;
- "prep_gemv": the same GEMV with x prepared once, outside the timed calls (what it costs without the prep);
  "prep@1" / "prep_gemv@1": the same with the pairs loaded in the words' shape (int4_ptx.PREP_FORM 1);
- "pf@N": the shipped config with PREFETCH mode N (int4_ptx: 3 / 4 load x a tile ahead as well);
- "<variant>+meta" (e.g. full+meta, pf@3+meta): with each group's scale and offset read as one int32
  (Int4Weight.meta, triton_ops "int4_meta_pairs");
- "l2hot": the shipped kernel on one weight copy every call (in the L2 where it fits: qkv, o): what a GEMV
  whose weights were prefetched into the L2 beforehand could take.

    python benchmarks/gpu/h2_limits.py --out $OUT/h2_limits_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from edgelm.bench_utils import result_header, write_json  # noqa: E402

VARIANTS = ("full", "half_alu", "no_alu", "prep", "prep_gemv", "l2hot")


def _ptx(variant: str) -> str | None:
    """The replacement for int4_ptx._DOT_PAIRS_BF16 (None: keep it)."""
    from edgelm.quantization import int4_ptx

    if variant in ("full", "l2hot") or variant.startswith(("prep", "pf@")):
        return None
    if variant == "no_alu":
        return "\n".join(["{", ".reg .b32 t;", "xor.b32 t, $1, $2;", "and.b32 $0, t, 0x3F803F80;", "}"])
    full = int4_ptx._dot_pairs_asm(False).splitlines()
    # keep the set-up, the j = 0 and j = 1 steps (3 and 4 lines), the conversion and the final add
    body_start = next(i for i, ln in enumerate(full) if ln.startswith("lop3"))
    j2 = next(i for i, ln in enumerate(full) if ln.startswith("shr.u32 t, $1, 8;"))
    tail = next(i for i, ln in enumerate(full) if ln.startswith("shl.b32"))
    return "\n".join(full[:body_start] + full[body_start:j2] + full[tail:])


def child(variant: str) -> list[dict]:
    import torch
    import triton.language as tl

    variant, *extra = variant.split("+")  # "+meta": with the scales / offsets paired (int4_meta_pairs)

    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization import int4_ptx

    text = _ptx(variant)
    if text is not None:
        int4_ptx._DOT_PAIRS_BF16 = tl.constexpr(text)
    from edgelm.layers import triton_ops

    added = ({"int4_xprep"} if variant.startswith("prep") else set()) | ({"int4_meta_pairs"} if "meta" in extra else set())
    triton_ops.set_enabled(",".join(sorted(triton_ops.DEFAULT_ON | added)))
    from edgelm.layers.triton_ops import xprep
    from edgelm.quantization.int4_pack import meta_pairs

    real_prep = xprep.x_prep
    sys.path.insert(0, os.path.dirname(__file__))
    from int4_bench import SHAPES, int4_bytes, int4_copies, time_calls

    rows = []
    for name, (n, k) in SHAPES.items():
        ws = int4_copies(n, k, 128)
        if variant == "l2hot":
            ws = [ws[0]] * len(ws)
        if "meta" in extra:
            for w in ws:
                w.meta = meta_pairs(w.scales, w.offsets)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        kernel, config = kern.choose_kernel(1, ws[0])
        if kernel != "gemv_h2":  # (cuda_w4 on some shapes since round 15): gemv_h2 with its config there
            kernel, config = kern.m1_unswept(n, k)
        if variant.startswith("pf@"):  # the shipped config with its PREFETCH mode (config[4]) replaced
            config = tuple(list(config) + [0] * (5 - len(config)))
            config = config[:4] + (int(variant[3:]),) + config[5:]
        if variant.startswith("prep_gemv"):  # x prepared once; every timed call reads the same buffers
            prepared = tuple(t.clone() for t in real_prep(x))
            xprep.x_prep = lambda _x, p=prepared: p
        fn = kern.KERNELS[kernel]
        t = time_calls([lambda w=w, fn=fn, x=x, c=config: fn(x, w, None, c) for w in ws])
        rows.append({"variant": "+".join([variant] + extra), "shape": name, "N": n, "K": k, "kernel": kernel, "config": list(config),
                     "us": round(t * 1e6, 2), "GBps": round(int4_bytes(ws[0], 1) / t / 1e9, 1)})
        del ws
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--child")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated, of " + ", ".join(VARIANTS) + ", pf@N")
    args = ap.parse_args()
    if args.child:
        print("ROWS " + json.dumps(child(args.child)), flush=True)
        return
    rows = []
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            if "@" in variant:  # prep@1, prep_gemv@2: the PREP form's x-pair loads (int4_ptx.PREP_FORM)
                env["EDGELM_INT4_PREP_FORM"] = variant.split("@")[1]
            proc = subprocess.run([sys.executable, __file__, "--child", variant], capture_output=True, text=True,
                                  env=env, timeout=300)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")), None)
        if line is None:
            print(proc.stderr[-3000:])
            continue
        rows += json.loads(line[5:])
    for r in rows:
        print(f"{r['variant']:>11} {r['shape']:>13} {r['kernel']} {r['config']}: {r['us']:7.2f} us {r['GBps']:7.1f} GB/s")
    result = {**result_header("gemv_h2 alone with its arithmetic cut (timings only)", "benchmarks/gpu/h2_limits.py",
                              sys.argv[1:]), "rows": rows}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
