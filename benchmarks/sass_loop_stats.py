"""Static instruction counts of the int4 kernels' main loops, for a GPU target, without a GPU.

Compiles edgelm's inline-PTX int4 kernels (tcw / tc, gemv_h2) with the ptxas Triton ships, disassembles
the cubin with its cuobjdump, and counts the SASS instructions of the longest backward-branch loop
(the K loop) by opcode. Per thread and weight: loop instructions / (weights a thread handles in one
iteration). A static measure: it says nothing of stalls, only how much issue work a weight costs —
compare it with the budget at the bandwidth limit (lanes per SM per cycle / int4 weights per SM per cycle).

    PYTHONPATH=. python benchmarks/sass_loop_stats.py --out benchmarks/results/sass_loop_stats.json
    PYTHONPATH=. python benchmarks/sass_loop_stats.py --capabilities 90 --h2-configs 8,16,1,4 16,8,1,2 \
        --out benchmarks/results/sass_gemv_h2_configs.json  # gemv_h2 launch configs, as launched
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import subprocess
import sys
import tempfile

TC_ARGS = ["x_ptr", "qw_ptr", "s_ptr", "m_ptr", "bias_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "M", "N", "K", "KW", "NG",
           "stride_xm", "stride_ym", "blocks_per_split"]
# gemv_h2's arguments: tc's without M and the strides, then its fused forms' (int4_fused; unused here)
H2_ARGS = [a for a in TC_ARGS if a not in ("M", "stride_xm", "stride_ym")] + [
    "nw_ptr", "eps", "pos_ptr", "cs_ptr", "k_buf_ptr", "v_buf_ptr", "slot_ptr", "q_size", "kv_size", "xs_ptr", "xd_ptr"]
TYPES = {"qw_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "eps": "fp32",
         "pos_ptr": "*i64", "cs_ptr": "*fp32", "slot_ptr": "*i64", "xs_ptr": "*fp32", "xd_ptr": "*fp32"}
H2_PLAIN = {"NORM": False, "EPILOGUE": 0, "HALF": 1, "PREP": 0, "META": 0, "STAGES": 1}  # gemv_h2 itself, not a fused form
_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")
_BRANCH = re.compile(r"BRA\b.*?0x([0-9a-f]+)")


def compile_sass(fn, args: list[str], bf16: bool, capability: int, constexprs: dict, num_warps: int,
                 aligned: bool = False, resources: list | None = None, types: dict | None = None) -> str:
    """The SASS of fn compiled for sm_<capability>. aligned: every pointer and integer argument marked
    divisible by 16, as Triton specializes them at launch for the Llama shapes (16-byte vector loads);
    resources: gets cuobjdump's resource usage line (registers, stack) appended."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    act = "*bf16" if bf16 else "*fp16"
    sig = {a: {**TYPES, **(types or {})}.get(a, act if a.endswith("_ptr") else "i32") for a in args}
    sig.update({k: "constexpr" for k in constexprs})
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in args} if aligned else {}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        if resources is not None:
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True)
            resources.append(next((ln for ln in usage.stdout.splitlines() if "REG:" in ln), ""))
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def longest_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest range [target, branch] of a backward branch."""
    rows = [(int(m.group(1), 16), m.group(2).split(".")[0], line) for line in sass.splitlines()
            if (m := _LINE.match(line))]
    best: list = []
    for addr, _, line in rows:
        b = _BRANCH.search(line)
        if b and int(b.group(1), 16) < addr:
            body = [r for r in rows if int(b.group(1), 16) <= r[0] <= addr]
            if len(body) > len(best):
                best = body
    return collections.Counter(op for _, op, _ in best)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--capabilities", type=int, nargs="+", default=[87, 90])
    ap.add_argument("--h2-configs", nargs="+", metavar="BN,BB,SK,NW[,PF]",
                    help="instead: gemv_h2 launch configs (int4_kernels.DISPATCH's form), compiled as launched "
                         "(aligned arguments), with their registers and stack")
    ap.add_argument("--fp16", action="store_true", help="with --h2-configs: compile for fp16 activations, not bf16")
    ap.add_argument("--prep", type=int, default=0, nargs="?", const=2,
                    help="with --h2-configs: the PREP form 1 or 2 (int4_xprep: prepared x; bare --prep: 2)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    from edgelm.quantization import int4_ptx, int4_tc

    rows = []
    if args.h2_configs:
        for cap in args.capabilities:
            for text in args.h2_configs:
                block_n, block_b, split_k, warps, *rest = (int(v) for v in text.split(","))
                const = {"GROUP": 128, "BLOCK_N": block_n, "BLOCK_B": block_b, "SPLIT_K": split_k, "HAS_BIAS": False,
                         "BF16": not args.fp16, "USE_ASM": True, "PDL": int(cap >= 90), "PREFETCH": rest[0] if rest else 0,
                         **H2_PLAIN, "PREP": args.prep, "STAGES": rest[3] if len(rest) > 3 else 1}
                usage: list[str] = []
                ops = longest_loop(compile_sass(int4_ptx._gemv_h2_kernel, H2_ARGS, not args.fp16, cap, const, warps, True, usage,
                                                {"x_ptr": "*i32"} if args.prep else None))
                per_iter = block_n * block_b * 128 // (32 * warps)
                regs = re.search(r"REG:(\d+)", usage[0])
                stack = re.search(r"STACK:(\d+)", usage[0])
                rows.append({"kernel": "gemv_h2", "config": text, "dtype": "fp16" if args.fp16 else "bf16", "prep": args.prep, "sm": cap, "loop_instructions": sum(ops.values()),
                             "weights_per_thread": per_iter,
                             "instructions_per_weight": round(sum(ops.values()) / per_iter, 2),
                             "registers": int(regs.group(1)) if regs else None,
                             "stack_bytes": int(stack.group(1)) if stack else None,
                             "top_opcodes": dict(ops.most_common(10))})
        args.capabilities = []
    for cap in args.capabilities:
        for weights, one_row in ((True, False), (True, True), (False, False)):
            block_n, warps = 128, 4
            const = {"GROUP": 128, "BLOCK_M": 16, "BLOCK_N": block_n, "SPLIT_K": 8, "HAS_BIAS": False, "BF16": True,
                     "USE_ASM": True, "EVEN_K": True, "WEIGHTS": weights, "ONE_ROW": one_row, "PDL": 0}
            ops = longest_loop(compile_sass(int4_tc._tc_kernel, TC_ARGS, True, cap, const, warps))
            per_iter = block_n * 128 // (32 * warps)  # one 128-input block of BLOCK_N rows per iteration
            rows.append({"kernel": "tcw" if weights else "tc", "one_row": one_row, "sm": cap, "block_n": block_n,
                         "num_warps": warps, "loop_instructions": sum(ops.values()), "weights_per_thread": per_iter,
                         "instructions_per_weight": round(sum(ops.values()) / per_iter, 2),
                         "top_opcodes": dict(ops.most_common(10))})
        block_n, block_b, warps = 8, 4, 4
        const = {"GROUP": 128, "BLOCK_N": block_n, "BLOCK_B": block_b, "SPLIT_K": 1, "HAS_BIAS": False, "BF16": True,
                 "USE_ASM": True, "PDL": 0, "PREFETCH": 0, **H2_PLAIN}
        ops = longest_loop(compile_sass(int4_ptx._gemv_h2_kernel, H2_ARGS, True, cap, const, warps))
        per_iter = block_n * block_b * 128 // (32 * warps)
        rows.append({"kernel": "gemv_h2", "one_row": None, "sm": cap, "block_n": block_n, "num_warps": warps,
                     "loop_instructions": sum(ops.values()), "weights_per_thread": per_iter,
                     "instructions_per_weight": round(sum(ops.values()) / per_iter, 2),
                     "top_opcodes": dict(ops.most_common(10))})
    for r in rows:
        what = r["config"] if "config" in r else f"one_row={r['one_row']}"
        extra = f", {r['registers']} registers, stack {r['stack_bytes']} B" if "registers" in r else ""
        print(f"{r['kernel']:8s} sm{r['sm']} {what}: {r['loop_instructions']} loop instructions, "
              f"{r['instructions_per_weight']} per weight and thread{extra}")
    result = {"benchmark": "static SASS of the int4 kernels' K loop (bf16, group 128), no GPU",
              "command": "PYTHONPATH=. python benchmarks/sass_loop_stats.py " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": "none (ptxas/cuobjdump from the triton wheel)", "rows": rows}
    if args.out:
        from edgelm.bench_utils import write_json

        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
