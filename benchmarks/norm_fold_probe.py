"""Probe (CPU, embedded model): does folding a power of each RMSNorm's weight into the int4 linear after it help
int4wo-128's quality? qkv_proj's columns (gate_up_proj's) multiplied by s = |γ|^α of input_layernorm
(post_attention_layernorm), γ divided by s — the same function in float — before the data-free search quantizes,
so that channels with larger activations get finer levels (AWQ's idea with the norm weight as the activation
estimate, as down_scale does for down_proj). Scored as benchmarks/quant_quality.py scores (50 prompts, top-1
agreement and mean KL against the unquantized model), down_proj's scaling on throughout.

    PYTHONPATH=. .venv/bin/python benchmarks/norm_fold_probe.py --out benchmarks/results/ablations/norm_fold_probe_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

import quant_quality as qq  # noqa: E402

from edgelm.quantization.torchao_config import quantize_int4_model  # noqa: E402

RUNS = [(0.0, ()), (0.25, ("qkv", "gate_up")), (0.5, ("qkv", "gate_up")), (1.0, ("qkv", "gate_up")),
        (0.5, ("qkv",)), (0.5, ("gate_up",))]


@torch.no_grad()
def fold(model, alpha: float, which) -> None:
    for layer in model.model.layers:
        pairs = ([(layer.input_layernorm, layer.self_attn.qkv_proj)] if "qkv" in which else []) + \
                ([(layer.post_attention_layernorm, layer.mlp.gate_up_proj)] if "gate_up" in which else [])
        for norm, lin in pairs:
            g = norm.weight.data.float()
            s = g.abs().clamp(min=1e-6) ** alpha
            s = s / s.log().mean().exp()
            lin.weight.data = (lin.weight.data.float() * s[None, :]).to(lin.weight.dtype)
            norm.weight.data = (g / s).to(norm.weight.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    runner, cfg = qq.build_runner()
    tok = qq.tokenizer_for(cfg)
    token_lists = [tok(p)["input_ids"] for p in qq.PROMPTS]
    ref = qq.all_logits(runner, token_lists)
    original = runner.model
    rows = []
    for alpha, which in RUNS:
        runner.model = copy.deepcopy(original)
        if which:
            fold(runner.model, alpha, which)
        quantize_int4_model(runner.model, 128, "search")
        rows.append({"alpha": alpha, "folded_into": list(which), **qq.compare(ref, qq.all_logits(runner, token_lists))})
        print(rows[-1], flush=True)
    if args.out:
        from edgelm.bench_utils import write_json

        write_json(args.out, {"benchmark": "norm_fold_probe", "device": "cpu", "model": cfg.source.display_name,
                              "command": "PYTHONPATH=. python benchmarks/norm_fold_probe.py " + " ".join(sys.argv[1:]),
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                              "results": rows})


if __name__ == "__main__":
    main()
