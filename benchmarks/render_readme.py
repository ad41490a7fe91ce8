"""Write the README's performance section from benchmarks/results/*.json (never by hand).

    python benchmarks/render_readme.py            # rewrites the block between the perf-table markers
"""

from __future__ import annotations

import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"


def _load(pattern: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, pattern))):
        with open(path) as f:
            out.append((os.path.basename(path), json.load(f)))
    return out


def _source(name: str, d: dict) -> str:
    return f"<sub>`{name}` · {d.get('device', '?')} · {str(d.get('date', '?'))[:10]} · `{d.get('command', '?')}`</sub>"


def gpu_latency() -> list[str]:
    lines = []
    for name, d in _load("bench_one_batch_*.json"):
        peaks = d.get("peaks") or {}
        quant = (d.get("torchao_config") or d.get("dtype")) + (f", {d['quantize_lm_head']} LM head"
                                                               if d.get("quantize_lm_head") else "")
        lines += [f"**{d['model']} ({quant}, {d.get('attention_backend')} attention, random weights)** — "
                  f"bandwidth measured in the same run: {peaks.get('bandwidth_gbps', 0):.0f} GB/s, "
                  f"bf16 matmul peak {peaks.get('matmul_tflops', 0):.0f} TFLOP/s"
                  + (f"; {d['note']}" if d.get("note") else ""), "",
                  "| batch | input | decode tok/s | ITL median (ms) | roofline ratio | prefill tok/s | "
                  "prefill / matmul peak | CUDA graphs |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in d["results"]:
            lines.append(f"| {r['batch_size']} | {r['input_len']} | {r['decode_tok_s']:.1f} | "
                         f"{r['decode_median_latency_s'] * 1e3:.2f} | {r.get('decode_roofline_ratio', 0):.2f} | "
                         f"{r['prefill_tok_s']:.0f} | {r.get('prefill_matmul_fraction', 0):.2f} | "
                         f"{'yes' if r.get('cuda_graph') else 'no'} |")
        lines += ["", _source(name, d), ""]
    return lines


def decode_ablations() -> list[str]:
    """Batch-1 bench_one_batch runs of one device call that switched one thing each (results/ablations)."""
    runs = [(n, d) for n, d in _load(os.path.join("ablations", "bench_one_batch_*.json")) if d.get("note")]
    if not runs:
        return []
    lines = [f"**Batch-1 decode, one thing switched per run** ({runs[0][1]['model']} bf16, input "
             f"{runs[0][1]['results'][0]['input_len']}; {runs[0][1].get('code', '')})", "",
             "| run | ITL median (ms) | decode tok/s | roofline ratio |", "| --- | ---: | ---: | ---: |"]
    for _, d in runs:
        r = d["results"][0]
        lines.append(f"| {d['note']} | {r['decode_median_latency_s'] * 1e3:.2f} | {r['decode_tok_s']:.1f} | "
                     f"{r.get('decode_roofline_ratio', 0):.3f} |")
    dates = sorted({str(d.get("date", "?"))[:10] for _, d in runs})
    return lines + ["", f"<sub>`results/ablations/bench_one_batch_*.json` · {runs[0][1].get('device', '?')} · "
                        f"{', '.join(dates)}</sub>", ""]


def step_ab() -> list[str]:
    """Batch-1 A/B runs of one device call: the attention's K/V prefetch (results/ablations/prefetch_kv) and
    the fused int4 decoder layer (results/int4_variants_bs1_fused_*.json)."""
    lines: list[str] = []
    runs = _load(os.path.join("ablations", "prefetch_kv", "prefetch_kv_*.json"))
    if runs:
        d0 = runs[0][1]
        lines += [f"**Decode attention's K/V prefetch, off and on twice in one device call** ({d0['model']}, batch 1, "
                  f"input {d0['results'][0]['input_len']}; DecodeConfig.prefetch_kv: each split's first K/V block "
                  "loaded before the PDL wait; `benchmarks/gpu/prefetch_kv_run.sh`; the first int4wo-128 'on' run's "
                  "JSON did not come back from the device: its line is in `results/logs/prefetch_kv_run_h100_2026-12-06.txt`)",
                  "", "| weights | run | ITL median (ms) | decode tok/s |", "| --- | --- | ---: | ---: |"]
        order = {"off": 0, "on": 1, "off2": 2, "on2": 3}
        keyed = []
        for name, d in runs:
            quant, run = name[len("prefetch_kv_"):].rsplit("_", 1)[0].rsplit("_", 1)
            keyed.append(((quant != "bf16", order.get(run, 9)), quant, run, d))
        for _, quant, run, d in sorted(keyed, key=lambda t: t[0]):
            r = d["results"][0]
            lines.append(f"| {quant} | {run} | {r['decode_median_latency_s'] * 1e3:.2f} | {r['decode_tok_s']:.1f} |")
        lines += ["", f"<sub>`results/ablations/prefetch_kv/` · {d0.get('device', '?')} · {str(d0.get('date', '?'))[:10]} · "
                      f"`{d0.get('command', '?')}` (EDGELM_DECODE_CONFIG=prefetch_kv=0/1)</sub>", ""]
    for name, d in _load("int4_variants_bs1_fused_*.json"):
        lines += [f"**The fused int4 decoder layer against the layer-by-layer step** ({d.get('device', '?')}, "
                  f"Llama-3.1-8B shape, int4wo-128, batch 1, input {d.get('input_len')}; median inter-token "
                  "latency of one loaded model, graphs recaptured per run" + (f"; {d['note']}" if d.get("note") else "")
                  + ")", "",
                  "| run | ITL median (µs) |", "| --- | ---: |"]
        lines += [f"| {r['label']} | {r['itl_us']:.1f} |" for r in d["results"]]
        lines += ["", _source(name, d), ""]
    return lines


def scheduler_loop() -> list[str]:
    lines = []
    for name, d in _load("scheduler_loop_*.json"):
        peaks = d.get("peaks") or {}
        quant = f", {d['torchao_config']}" if d.get("torchao_config") else ""
        lines += [f"**Decode through the server's scheduler loop, overlap scheduling off / on** — {d['model']}{quant} "
                  f"(random weights), input {d['input_len']}, {d['new_tokens']} new tokens, greedy; bandwidth "
                  f"measured in the same run: {peaks.get('bandwidth_gbps', 0):.0f} GB/s", "",
                  "| batch | overlap | ms/step | tok/s | roofline ratio |", "| ---: | --- | ---: | ---: | ---: |"]
        for r in d["summary"]:
            lines.append(f"| {r['batch']} | {'on' if r['overlap'] else 'off'} | {r['step_ms']:.3f} | "
                         f"{r['tok_s']:.1f} | {r.get('roofline_ratio', 0):.3f} |")
        lines += ["", _source(name, d), ""]
    return lines


def attention_backends() -> list[str]:
    """Attention backends side by side: each file is one bench_one_batch process that ran every case
    with each backend in turn (--attention-backends) over the same weights and KV pool."""
    found = _load("attention_backends_*.json")
    if not found:
        return []
    names = list(found[0][1].get("attention_backends") or [])
    if len(names) < 2:
        return []
    first, last = names[0], names[-1]
    d0 = found[0][1]
    lines = [f"**{d0['model']} ({d0['dtype']}, random weights): attention backends side by side** — one process per "
             "file, the same weights and KV pool for every backend, CUDA graphs recaptured for each", "",
             "| batch | input | " + " | ".join(f"{n} decode tok/s" for n in names) + f" | {last} / {first} | "
             + " | ".join(f"{n} prefill tok/s" for n in names) + f" | {last} / {first} |",
             "| ---: | ---: | " + " | ".join("---:" for _ in range(2 * len(names) + 2)) + " |"]
    for _, d in found:
        by_case: dict[tuple, dict] = {}
        for r in d["results"]:
            by_case.setdefault((r["batch_size"], r["input_len"]), {})[r["attention_backend"]] = r
        for (bs, input_len), rows in by_case.items():
            if not all(n in rows for n in names):
                continue
            dec = [rows[n]["decode_tok_s"] for n in names]
            pre = [rows[n]["prefill_tok_s"] for n in names]
            lines.append(f"| {bs} | {input_len} | " + " | ".join(f"{x:.1f}" for x in dec) + f" | {dec[-1] / dec[0]:.2f}× | "
                         + " | ".join(f"{x:.0f}" for x in pre) + f" | {pre[-1] / pre[0]:.2f}× |")
    lines.append("")
    lines += [_source(name, d) + "<br>" for name, d in found]
    return lines + [""]


def flashinfer_overhead() -> list[str]:
    lines = []
    for name, d in _load("flashinfer_overhead_*.json"):
        shape = d["shape"]
        lines += [f"**Decode attention, where a step's time goes** ({shape['heads']}/{shape['kv_heads']} heads, head_dim "
                  f"{shape['head_dim']}, context {shape['context']}): host time of the hook that runs before every "
                  "CUDA-graph replay (the GPU waits for it), and one layer's K/V write + attention inside a graph", "",
                  "| backend | batch | replay hook, host (µs) | per layer (µs) | KV read (GB/s) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for key, r in d["results"].items():
            backend, bs = key.rsplit("_bs", 1)
            lines.append(f"| {backend} | {bs} | {r['replay_hook_us']:.1f} | {r['layer_us']:.1f} | {r['kv_read_gbps']:.0f} |")
        lines += ["", _source(name, d), ""]
    return lines


def int8_head() -> list[str]:
    """The int8 LM head alone against the 16-bit head (benchmarks/gpu/int8_head_bench.py)."""
    lines: list[str] = []
    for name, d in _load("int8_head_bench_*.json"):
        lines += ["**LM head alone: int8 (`--quantize-lm-head int8`) against the bf16 head** (one CUDA graph of calls, "
                  "weights larger than the L2; the fastest int8 config of the sweep, each checked against float64)", "",
                  "| head | rows | bf16 µs | bf16 GB/s | int8 config | int8 µs | int8 GB/s | bf16 / int8 |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for r in d["results"]:
            best = r["int8"].get(r.get("best"), {})
            lines.append(f"| {r['shape']} ({r['N']} × {r['K']}) | {r['M']} | {r['bf16_us']:.1f} | {r['bf16_gbps']:.0f} | "
                         f"{r.get('best', '-')} | {best.get('us', float('nan')):.1f} | {best.get('gbps', 0):.0f} | "
                         f"{r.get('best_speedup', 0):.2f}× |")
        lines += ["", _source(name, d), ""]
    return lines


def int4_vs_bf16() -> list[str]:
    """Whole-model decode, int4wo-128 against bf16, for each model with both latency files."""
    runs = _load("bench_one_batch_*.json")
    lines: list[str] = []
    for _, int4 in runs:
        if int4.get("torchao_config") != "int4wo-128":
            continue
        bf16 = next((d for n, d in runs if not d.get("torchao_config") and not d.get("quantize_lm_head") and "prefill" not in n
                     and d["model"] == int4["model"] and d.get("device") == int4.get("device")), None)
        if bf16 is None:
            continue
        lines += _int4_vs_bf16_table(int4, bf16)
    return lines


def _int4_vs_bf16_table(int4: dict, bf16: dict) -> list[str]:
    base = {(r["batch_size"], r["input_len"]): (r, "bf16 table") for r in bf16["results"]}
    same_call = int4.get("bf16_same_call")  # results/-relative path of a bf16 run made in the int4 run's call
    if same_call:
        with open(os.path.join(RESULTS, same_call)) as f:
            # bf16_source: where that run came from when it was not the same call (e.g. the call before, same machine)
            label = int4.get("bf16_source", "same call")
            base.update({(r["batch_size"], r["input_len"]): (r, label) for r in json.load(f)["results"]})
    head = f" with the {int4['quantize_lm_head']} LM head (--quantize-lm-head)" if int4.get("quantize_lm_head") else ""
    lines = [f"**{os.path.basename(int4['model'])} decode: int4wo-128{head} against bf16** (same device; int4 weights "
             f"{int4['decode_weight_bytes'] / 1e9:.2f} GB read per step against {bf16['decode_weight_bytes'] / 1e9:.2f} GB; "
             "bf16 from the same device call where one was made"
             + (f": `{same_call}`" if same_call else "") + ", else from the bf16 table above, of its own date)",
             "", "| batch | bf16 tok/s | int4wo-128 tok/s | int4 / bf16 | int4 roofline ratio | bf16 from |",
             "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in int4["results"]:
        b, source = base.get((r["batch_size"], r["input_len"]), (None, ""))
        if b is not None:
            if source == "bf16 table" and str(bf16.get("date"))[:13] == str(int4.get("date"))[:13]:
                source = f"bf16 table ({str(bf16['date'])[:16]}, same call)"
            lines.append(f"| {r['batch_size']} | {b['decode_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                         f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}× | {r.get('decode_roofline_ratio', 0):.2f} | "
                         f"{source} |")
    return lines + [""]


def int4_kernels() -> list[str]:
    lines = []
    for name, d in _load("int4_h[0-9]*.json"):
        lines += [f"**int4 W4A16 group-{d.get('group_size')} kernels vs bf16 cuBLAS, Llama-3.1-8B layer shapes**", "",
                  "| layer | M | bf16 (µs) | int4 (µs) | speedup | share of int4 roofline |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in d["rows"]:
            lines.append(f"| {r['shape']} ({r['K']}→{r['N']}) | {r['M']} | {r['bf16_us']:.1f} | {r['int4_us']:.1f} | "
                         f"{r['speedup']:.2f}× | {r['int4_fraction_of_roofline']:.2f} |")
        lines += ["", _source(name, d), ""]
    return lines


def int4_speedup() -> list[str]:
    lines = []
    for name, d in _load("int4_speedup_*.json"):
        lines += [f"**{d['model']} decode through the scheduler loop: int4 against unquantized in one run** — random "
                  f"weights, input {d['input_len']}, {d['new_tokens']} new tokens, overlap scheduling on; roofline "
                  "ratio against each run's own bytes per step (int4: packed weights, scales and offsets, the bf16 "
                  "lm-head, KV)", "", "| config | batch | tok/s | ms/step | speedup | roofline ratio |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        key = next(k for k in d["table"][0] if k.startswith("speedup_vs_"))
        for r in d["table"]:
            lines.append(f"| {r['config']} | {r['batch']} | {r['tok_s']:.1f} | {r['step_ms']:.3f} | {r[key]:.2f}× | "
                         f"{r['roofline_ratio']:.3f} |")
        lines += ["", _source(name, d), ""]
    return lines


def gemlite_eval() -> list[str]:
    lines = []
    for name, d in _load("gemlite_eval_*.json"):
        lines += [f"**gemlite {d['gemlite']} against edgelm's int4 kernels** (the same group-{d['group_size']} codes, "
                  "Llama-3.1-8B layer shapes, bf16 activations; relative error against dequantize-then-matmul in fp32)",
                  "", "| layer | M | bf16 (µs) | edgelm (µs) | gemlite (µs) | edgelm error | gemlite error |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in d["rows"]:
            lines.append(f"| {r['shape']} | {r['M']} | {r['bf16_us']:.1f} | {r['edgelm_us']:.1f} | {r['gemlite_us']:.1f} | "
                         f"{r['rel_err_edgelm']:.4f} | {r['rel_err_gemlite']:.4f} |")
        lines += ["", _source(name, d), ""]
    return lines


def cpu_decode() -> list[str]:
    lines = []
    for name, d in _load("cpu_bench*.json"):
        quant = d.get("quant_name") or d.get("torchao_config")  # quant_name: e.g. int4wo-128+int8head
        head = f" --quantize-lm-head {d['quantize_lm_head']}" if d.get("quantize_lm_head") else ""
        flags = (f"its 4-bit layers as stored (the default for a GGUF{f'; `{head.strip()}`' if head else ''})"
                 if d.get("gguf_int4") else f"`--torchao-config {d.get('torchao_config')}{head}`")
        lines += [f"**CPU batch-1 decode, {d['model']} ({d['dtype']}), edgelm vs HF transformers `generate` "
                  "on the same GGUF weights, same run**"
                  + (f"; edgelm with {flags} (torch's CPU int4 kernel) in the same rounds, "
                     f"weights {d['weight_bytes'][quant] / 1e6:.0f} MB against {d['weight_bytes']['edgelm'] / 1e6:.0f} MB"
                     if quant else ""), "",
                  "| threads | edgelm tok/s | HF tok/s | edgelm / HF | same tokens | load average before |"
                  + (f" {quant} tok/s | {quant} / edgelm |" if quant else ""),
                  "| ---: | ---: | ---: | ---: | --- | --- |" + (" ---: | ---: |" if quant else "")]
        for r in d["runs"]:
            load = ", ".join(f"{x:.1f}" for x in r.get("load_average_before", [])[:1])
            row = (f"| {r['threads']} | {r['edgelm']['decode_tok_s']:.1f} | {r['hf_transformers']['decode_tok_s']:.1f}"
                   f" | {r['ratio_edgelm_over_hf']:.2f} | {r.get('tokens_equal')} | {load} |")
            if quant:
                q = r[f"edgelm_{quant}"]
                row += f" {q['decode_tok_s']:.1f} | {q['ratio_over_edgelm']:.2f} |"
            lines.append(row)
        lines += ["", _source(name, d), ""]
    return lines


def serving() -> list[str]:
    lines = []
    for name, d in _load("bench_serving_*.json"):
        machine = d.get("machine")
        device = machine.get("cpu", "CPU") if isinstance(machine, dict) else "CPU"
        base = (d.get("engine_baseline") or {}).get("decode_median_latency_ms_by_batch", {})
        lines += [f"**Serving load on {device} ({d.get('backend')}, {d.get('dataset_name')} prompts of "
                  f"{d.get('random_input_len')} {'tokens' if '--tokenizer' in d.get('command', '') else 'words'}, "
                  f"{d.get('random_output_len')} output tokens, "
                  f"{d['runs'][0].get('num_prompts', '?')} requests per run)**"
                  + (" — ITL against the engine alone (`bench_one_batch`, same model, same device call, "
                     "nearest batch size)" if base else ""), "",
                  "| concurrency | completed | failed | output tok/s | TTFT p50 (ms) | ITL p50 (ms) | E2E p50 (ms) |"
                  + (" engine ITL (ms) | serving / engine |" if base else ""),
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if base else "")]
        for r in d["runs"]:
            row = (f"| {r.get('max_concurrency')} | {r['completed']} | {r['failed']} | "
                   f"{r['output_throughput']:.2f} | {r['median_ttft_ms']:.0f} | {r['median_itl_ms']:.2f} | "
                   f"{r['median_e2e_latency_ms']:.0f} |")
            if base:
                conc = min(int(r.get("max_concurrency") or 1), int(r.get("num_prompts") or 10**9))
                bs = min(base, key=lambda k: abs(int(k) - conc))
                row += f" {base[bs]:.2f} (bs {bs}) | {base[bs] / r['median_itl_ms']:.2f} |"
            lines.append(row)
        lines += ["", _source(name, {**d, "device": device}), ""]
    return lines


def quality() -> list[str]:
    lines = []
    for name, d in _load("quant_quality*.json"):
        rows = d.get("results") or d.get("configs") or []
        if not isinstance(rows, list) or not rows:
            continue
        partial = any("@" in str(r.get("method", "")) for r in rows)
        title = ("**int4 quality with one kind of linear quantized, the rest unquantized (where the loss comes "
                 "from; method@linear)**" if partial else "**int4 quality on the embedded model (against unquantized)**")
        lines += [title, "",
                  "| config | method | top-1 agreement (all positions) | top-1 (last position) | mean KL |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r.get('config', '?')} | {r.get('method', '')} | "
                         f"{r.get('top1_agreement_all_positions', 0):.3f} | {r.get('top1_agreement_last_position', 0):.2f} | "
                         f"{r.get('mean_kl_all_positions', 0):.4f} |")
        lines += ["", _source(name, d), ""]
    return lines


def grammar() -> list[str]:
    found = _load("grammar_overhead_*.json")
    if not found:
        return []
    lines = ["**Decode step with a JSON-schema grammar against without (greedy, same run, best of rounds)** — "
             "schema *typical*: a bounded title, an enum, a bounded integer, 12+ free strings; *min_length*: a "
             "600-character minimum string, xgrammar's costly case. Grammar workers: 0 = matchers in the "
             "scheduler process, N = in N worker processes (`--grammar-workers`). Host fill / apply: time the "
             "scheduler spent advancing matchers and filling the bitmask (with workers: waiting for them) and "
             "applying it, per step; it overlaps the GPU's forward", "",
             "| device | model | batch | schema | grammar workers | free (ms/step) | JSON schema (ms/step) | overhead "
             "| host fill / apply (ms) |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for _, d in found:
        for r in d["summary"]:
            host = (f"{r['fill_ms_per_step']:.2f} / {r['apply_ms_per_step']:.2f}" if "fill_ms_per_step" in r else "")
            model = os.path.basename(d["model"]).removesuffix("-config")
            model += " (random weights" if "dummy" in d.get("command", "") else " (real weights"
            model += ", tokens replayed from JSON documents)" if "replayed" in d.get("token_source", "") else ")"
            lines.append(f"| {d.get('device', '?')} | {model} | {r['batch']} | {r.get('schema', 'min_length')} | "
                         f"{r.get('grammar_workers', 0)} | {r['free_step_ms']:.2f} | {r['constrained_step_ms']:.2f} | "
                         f"{100 * r['overhead']:+.0f}% | {host} |")
    lines.append("")
    lines += [_source(name, d) + "<br>" for name, d in found]
    return lines + [""]


def decode_profile() -> list[str]:
    lines = []
    for name, d in _load("decode_profile_*.json"):
        step = d["median_per_step"]["server_like"]
        g = d["profiled_graph"]
        note = f" — {d['note']}" if d.get("note") else ""
        cmd = d.get("command", "").split()
        weights = cmd[cmd.index("--torchao-config") + 1] if "--torchao-config" in cmd[:-1] else "bf16"
        lines += [f"**Where a batch-{d['batch_size']} decode step goes** (Llama-3.1-8B shape, {weights}, context "
                  f"{d['input_len']}; medians of 60 steps prepared as the scheduler does; kernels from one profiled "
                  f"CUDA-graph replay){note}", "",
                  "| part | µs per step |", "| --- | ---: |",
                  f"| whole step, host clock (as `bench_one_batch` times it) | {step['step_us']:.0f} |",
                  f"| host work before the graph launch (GPU idle) | {step['host_before_replay_us']:.0f} |",
                  f"| graph on the GPU (CUDA events) | {step['graph_gpu_us']:.0f} |",
                  f"| kernels busy / idle gaps inside the graph ({g['kernels_in_step']} kernels) | "
                  f"{g['busy_us']:.0f} / {g['gaps_us']:.0f} |"]
        for k in g["by_kernel"][:8]:
            lines.append(f"| `{k['kernel'][:48]}` × {k['count']} | {k['total_us']:.0f} |")
        lines += ["", _source(name, d), ""]
    return lines


def render() -> str:
    parts = gpu_latency() + decode_ablations() + step_ab() + scheduler_loop() + decode_profile() + attention_backends() + flashinfer_overhead() + int4_vs_bf16() + int8_head() + int4_speedup() + int4_kernels() + gemlite_eval() + quality() + grammar() + cpu_decode() + serving()
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    block = f"{BEGIN}\n{render()}{END}"
    text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    with open(readme, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
