"""Batch-1 decode step time of kernel variants on one loaded model: each variant switches Triton
ops, PDL's early release, the M = 1 GEMV config of one weight shape, or the decode-attention config,
recaptures the CUDA graphs and times bench_one_batch's overlapped decode loop (median inter-token
latency). The baseline runs first, in the middle and last, so drift shows; then the combination of
the per-shape winners runs twice around one more baseline.

    python benchmarks/gpu/decode_variants.py --model-path llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --batch-size 1 --input-len 1024 --output-len 64 --out $OUT/decode_variants.json
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgelm import bench_one_batch  # noqa: E402
from edgelm.bench_utils import write_json  # noqa: E402
from edgelm.layers import triton_ops  # noqa: E402
from edgelm.layers.attention import triton_ops as attn_ops  # noqa: E402
from edgelm.layers.triton_ops import gemv, pdl  # noqa: E402
from edgelm.model_config import ModelConfig  # noqa: E402
from edgelm.model_executor.model_runner import ModelRunner  # noqa: E402
from edgelm.model_loader.resolve import resolve_model  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
G = gemv.GemvConfig
# round 3 (the --base of round 2's winners): neighbours of the BLOCK_N = 4 configs that won there
GEMV_CANDIDATES = {
    "qkv": [G(4, 1024, 4, 4, False), G(4, 4096, 4, 1, False), G(2, 2048, 2, 3, False), G(4, 2048, 2, 3, False)],
    "o": [G(4, 2048, 4, 3, False), G(2, 4096, 2, 1, False), G(4, 4096, 2, 1, False), G(2, 2048, 2, 3, False)],
    "gate_up": [G(4, 1024, 4, 4, False), G(4, 4096, 4, 1, False), G(2, 2048, 2, 3, False), G(4, 2048, 2, 3, False)],
    "down": [G(4, 2048, 4, 3, False), G(4, 1024, 4, 5, False), G(2, 1024, 2, 4, False), G(4, 1024, 2, 4, False)],
    "lm_head": [G(4, 2048, 4, 3, False), G(4, 1024, 4, 4, False), G(8, 2048, 8, 2, False)],
}
ATTN_CANDIDATES = [dict(block_n=128, min_split_len=128), dict(block_n=64, min_split_len=128)]
BASE = {"gemv": [(SHAPES["qkv"], G(4, 2048, 4, 3, False)), (SHAPES["o"], G(4, 4096, 4, 1, False)),
                 (SHAPES["gate_up"], G(4, 2048, 4, 3, False)), (SHAPES["down"], G(4, 1024, 4, 4, False))]}


def merged(v: dict, base: dict) -> dict:
    """v on top of base: v's GEMV configs replace base's for the same shape."""
    out = {**base, **v}
    shapes = {shape for shape, _ in v.get("gemv", ())}
    out["gemv"] = [e for e in base.get("gemv", ()) if e[0] not in shapes] + list(v.get("gemv", ()))
    return out


def label(v: dict) -> str:
    parts = [v.get("ops_label", "")] if v.get("ops_label") else []
    if v.get("early") is False:
        parts.append("PDL without early release")
    for shape, cfg in v.get("gemv", ()):
        parts.append(f"{next(k for k, s in SHAPES.items() if s == shape)} {cfg.name}")
    if v.get("attn"):
        parts.append("attention " + " ".join(f"{k}={x}" for k, x in v["attn"].items()))
    return ", ".join(parts) or "baseline"


def first_round(base_ops: str) -> list[dict]:
    out = [{}, {"early": False}, {"ops": base_ops.replace(",pdl", ""), "ops_label": "no pdl"}]
    out += [{"attn": patch} for patch in ATTN_CANDIDATES]
    for name, cands in GEMV_CANDIDATES.items():
        out += [{"gemv": [(SHAPES[name], cfg)]} for cfg in cands]
        if name == "gate_up":
            out.append({})
    return out + [{}]


def best_combo(results: list[dict], variants: list[dict]) -> dict:
    """The best attention patch, per shape the best GEMV config, and PDL without early release,
    each where it beat the median baseline by more than 5 us."""
    base = statistics.median(r["itl_us"] for r, v in zip(results, variants) if not v)
    combo = {"gemv": []}
    best = {}
    for r, v in zip(results, variants):
        if v.get("early") is False and r["itl_us"] < base - 5:
            combo["early"] = False
        if not v or r["itl_us"] > base - 5 or v.get("ops") or "early" in v:
            continue
        key = "attn" if "attn" in v else v["gemv"][0][0]
        if key not in best or r["itl_us"] < best[key][0]:
            best[key] = (r["itl_us"], v)
    for key, (_, v) in best.items():
        if key == "attn":
            combo["attn"] = v["attn"]
        else:
            combo["gemv"] += v["gemv"]
    return combo


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_path = argv[argv.index("--out") + 1]
    del argv[argv.index("--out"):argv.index("--out") + 2]
    quick = "--quick" in argv
    if quick:
        argv.remove("--quick")
    server_args, bench, _ = bench_one_batch.prepare_args(argv)
    device = server_args.resolved_device()  # a CPU run only checks the script
    config = ModelConfig.load(resolve_model(server_args.model_path), server_args.dtype, device,
                              server_args.context_length)
    runner = ModelRunner(server_args, config, device)
    bs, input_len, output_len = bench.batch_size[0], bench.input_len[0], bench.output_len[0]
    cap = torch.cuda.get_device_capability() if device == "cuda" else (0, 0)
    base_wins = dict(gemv.WINS.get(cap, {}))
    base_ops = ",".join(sorted(triton_ops.set_enabled(None)))
    triton_ops.set_enabled(base_ops)
    default_cfg = attn_ops.default_decode_config
    results: list[dict] = []

    def measure(v: dict) -> dict:
        v = v if quick else merged(v, BASE)
        triton_ops.set_enabled(v.get("ops", base_ops))
        pdl.EARLY_RELEASE = v.get("early", True)
        wins = dict(base_wins)
        for shape, cfg in v.get("gemv", ()):
            gemv.CONFIGS[cfg.name] = cfg
            wins[shape] = ((1, cfg.name),) + tuple(e for e in base_wins.get(shape, ()) if e[0] > 1)
        gemv.WINS[cap] = wins
        patch = v.get("attn")
        attn_ops.default_decode_config = (
            (lambda *a, p=patch: dataclasses.replace(default_cfg(*a), **p)) if patch else default_cfg)
        runner.set_attention_backend(runner.attention_backend_name)
        bench_one_batch.run_once(runner, bs, input_len, 8, overlap=True)
        steps = []
        for _ in range(3):
            steps += bench_one_batch.run_once(runner, bs, input_len, output_len, overlap=True)["decode_s"]
        r = {"label": label(v), "early_release": pdl.EARLY_RELEASE, "itl_us": 1e6 * statistics.median(steps),
             "splits": getattr(runner.attn_backend, "_num_kv_splits", lambda *a: None)(bs, input_len + output_len)}
        results.append(r)
        print(f"{r['label']:>60}: {r['itl_us']:.1f} us ({r['splits']} splits)", flush=True)
        return r

    if quick:  # the shipped defaults against early release off, the old attention steps, PDL off
        for v in ({}, {"early": False}, {"attn": dict(block_n=64, min_split_len=64)},
                  {"ops": base_ops.replace(",pdl", ""), "ops_label": "no pdl"}, {}):
            measure(v)
    else:
        first = first_round(base_ops)
        for v in first:
            measure(v)
        combo = best_combo(results, first)
        for v in (combo, {}, combo):
            measure(v)
    attn_ops.default_decode_config = default_cfg
    report = {"command": "python benchmarks/gpu/decode_variants.py " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch_size": bs, "input_len": input_len,
              "output_len": output_len, "base_ops": base_ops, "base": label(BASE), "results": results}
    write_json(out_path, report)
    return report


if __name__ == "__main__":
    main()
