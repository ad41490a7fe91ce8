"""int4 weight-only against the same model unquantized, in one run on one GPU (issue 4's measure):
benchmarks/scheduler_loop.py once per --torchao-config value (a subprocess each, so each gets the
whole GPU), then per batch size, overlap scheduling on, the int4 / bf16 tokens/s ratio and each run's
fraction of its own roofline (the bytes a step reads: packed weights, scales, the 16-bit lm-head, KV).

    python benchmarks/int4_speedup.py --model-path llama-3.1-8b --tokenizer-path .whl/smollm2-135m-config \
        --batch-sizes 1 8 32 --out benchmarks/results/int4_speedup_llama-3.1-8b_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from edgelm.bench_utils import write_json  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default="llama-3.1-8b")
    ap.add_argument("--tokenizer-path", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--configs", nargs="+", default=["none", "int4wo-128"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in args.configs:
            out = os.path.join(tmp, f"{cfg}.json")
            cmd = [sys.executable, os.path.join(here, "scheduler_loop.py"), "--model-path", args.model_path,
                   "--load-format", "dummy", "--dtype", args.dtype, "--input-len", str(args.input_len),
                   "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds), "--out", out,
                   "--batch-sizes", *map(str, args.batch_sizes)]
            if args.tokenizer_path:
                cmd += ["--tokenizer-path", args.tokenizer_path]
            if cfg != "none":
                cmd += ["--torchao-config", cfg]
            subprocess.run(cmd, check=True)
            with open(out) as f:
                runs[cfg] = json.load(f)
    base = args.configs[0]
    table = []
    for cfg in args.configs:
        for s in runs[cfg]["summary"]:
            if not s["overlap"]:
                continue
            ref = next(r for r in runs[base]["summary"] if r["overlap"] and r["batch"] == s["batch"])
            table.append({"config": cfg, "batch": s["batch"], "tok_s": round(s["tok_s"], 1),
                          "step_ms": round(s["step_ms"], 3), "bytes_per_step": s["bytes_per_step"],
                          "roofline_ratio": round(s.get("roofline_ratio", 0.0), 3),
                          f"speedup_vs_{base}": round(s["tok_s"] / ref["tok_s"], 3)})
    report = {"benchmark": "int4 weight-only vs unquantized through the scheduler loop, overlap on, same run",
              "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": runs[base]["device"], "model": args.model_path, "input_len": args.input_len,
              "new_tokens": args.new_tokens, "table": table, "runs": runs}
    write_json(args.out, report)
    for row in table:
        print(row)
    return report


if __name__ == "__main__":
    main()
