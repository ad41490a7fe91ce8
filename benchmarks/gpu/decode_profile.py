"""Where a CUDA-graph decode step's time goes: host preparation, graph time on the GPU, and each
kernel of the graph with the idle gap before it (CUPTI through torch.profiler).

    python benchmarks/gpu/decode_profile.py --model-path llama-3.1-8b --load-format dummy \
        --dtype bfloat16 --batch-size 1 --input-len 1024 --out $OUT/decode_profile.json

Takes bench_one_batch's arguments (one batch size, one input length). Per decode step it records
the host clock from the start of the step to the graph launch, CUDA events right around the graph
replay, and the host clock of the whole step (synchronized, as bench_one_batch times it). Then a
profiler trace of a few steps gives each kernel's duration and the gap since the previous kernel
ended; kernels are grouped by name (with their order within one decoder layer).
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgelm.bench_one_batch import prefill_batch, prepare_args  # noqa: E402
from edgelm.model_config import ModelConfig  # noqa: E402
from edgelm.model_executor.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from edgelm.model_executor.model_runner import ModelRunner  # noqa: E402
from edgelm.model_loader.resolve import resolve_model  # noqa: E402


class _TimedGraph:
    """Stands in for a captured graph: CUDA events right before and after its replay."""

    def __init__(self, graph, log: list):
        self.graph, self.log = graph, log

    def replay(self):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.log.append((time.perf_counter(), start, end))
        start.record()
        self.graph.replay()
        end.record()


def decode_steps(runner, batch_size: int, input_len: int, steps: int, server_like: bool = False) -> list[dict]:
    """server_like: prepare each step as the scheduler and bench_one_batch do (token ids to the host,
    one host block for the graph). Otherwise (reported under "bench_one_batch", the name from before
    that tool moved to the scheduler's path): inputs built on the device, as it used to."""
    device = runner.device
    req_slots, info, batch = prefill_batch(runner, batch_size, input_len)
    next_ids = runner.sample(runner.forward(batch), info).next_token_ids
    torch.cuda.synchronize()
    req_pool_indices = torch.tensor(req_slots, dtype=torch.int64, device=device)
    seq_lens = torch.full((batch_size,), input_len, dtype=torch.int32, device=device)
    req_to_token = runner.req_to_token_pool.req_to_token
    log: list = []
    graphs = runner.cuda_graph_runner.graphs
    for bs in list(graphs):
        graphs[bs] = _TimedGraph(graphs[bs], log)
    out = []
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            marker = torch.profiler.record_function("decode_step")
            marker.__enter__()
            if server_like:  # as the scheduler and bench_one_batch prepare a step
                ids = next_ids.tolist()
                loc = runner.allocator.alloc(batch_size)
                lens = [input_len + step + 1] * batch_size
                batch = ForwardBatch.for_decode(ids, req_slots, lens, loc, device, lazy=True)
            else:
                out_cache_loc = runner.allocator.alloc(batch_size)
                req_to_token[req_pool_indices, seq_lens.long()] = out_cache_loc.to(torch.int32)
                seq_lens = seq_lens + 1
                batch = ForwardBatch(
                    forward_mode=ForwardMode.DECODE, batch_size=batch_size, input_ids=next_ids,
                    positions=(seq_lens - 1).long(), out_cache_loc=out_cache_loc, req_pool_indices=req_pool_indices,
                    seq_lens=seq_lens, req_pool_indices_cpu=req_slots,
                    seq_lens_cpu=torch.full((batch_size,), input_len + step + 1, dtype=torch.int32))
            logits = runner.forward(batch)
            t_fwd = time.perf_counter()
            next_ids = runner.sample(logits, info).next_token_ids
            t_sample = time.perf_counter()
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            marker.__exit__(None, None, None)
            t_launch, start, end = log[-1]
            out.append({"step_us": (t1 - t0) * 1e6, "host_before_replay_us": (t_launch - t0) * 1e6,
                        "host_forward_us": (t_fwd - t0) * 1e6, "host_sample_us": (t_sample - t_fwd) * 1e6,
                        "graph_gpu_us": start.elapsed_time(end) * 1e3})
    finally:
        for bs in list(graphs):
            graphs[bs] = graphs[bs].graph
    return out


def kernel_table(trace_path: str, num_layers: int) -> dict:
    """Kernels of the last profiled graph replay: per kernel name, count, total and median time,
    median gap before it; the order of kernels within a middle decoder layer."""
    events = json.load(open(trace_path))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    # split into steps at gaps longer than 50 us (the host syncs between steps)
    steps, cur = [], []
    for k in kernels:
        if cur and k["ts"] - (cur[-1]["ts"] + cur[-1]["dur"]) > 50:
            steps.append(cur)
            cur = []
        cur.append(k)
    steps.append(cur)
    step = steps[-1]  # the last decode step (the trace starts with the prefill)
    rows, prev_end = [], None
    for k in step:
        gap = 0.0 if prev_end is None else k["ts"] - prev_end
        rows.append((k["name"], k["dur"], gap))
        prev_end = k["ts"] + k["dur"]
    by_name: dict[str, dict] = {}
    for name, dur, gap in rows:
        d = by_name.setdefault(name[:120], {"count": 0, "durs": [], "gaps": []})
        d["count"] += 1
        d["durs"].append(dur)
        d["gaps"].append(gap)
    table = sorted(({"kernel": n, "count": d["count"], "total_us": round(sum(d["durs"]), 1),
                     "median_us": round(statistics.median(d["durs"]), 2),
                     "median_gap_before_us": round(statistics.median(d["gaps"]), 2),
                     "total_gap_before_us": round(sum(d["gaps"]), 1)} for n, d in by_name.items()),
                   key=lambda r: -r["total_us"])
    per_layer = len(rows) // max(num_layers, 1)
    mid = len(rows) // 2
    # inc_us: how much later this kernel ends than the one before it (its share of the step on the critical path;
    # with PDL a kernel starts before its predecessor ends, so its own duration overstates it)
    layer = [{"kernel": n[:80], "us": round(d, 2), "gap_before_us": round(g, 2), "inc_us": round(d + g, 2)}
             for n, d, g in rows[mid - mid % max(per_layer, 1):][:per_layer]] if per_layer else []
    busy = sum(d for _, d, _ in rows)
    span = step[-1]["ts"] + step[-1]["dur"] - step[0]["ts"]
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e]
    marks = [e for e in cpu if e["name"] == "decode_step"]
    host_ops = []
    if marks:
        m = marks[-1]
        inside = sorted((e for e in cpu if m["ts"] <= e["ts"] <= m["ts"] + m["dur"] and e is not m),
                        key=lambda e: e["ts"])
        host_ops = [{"op": e["name"][:60], "start_us": round(e["ts"] - m["ts"], 1), "us": round(e["dur"], 1)}
                    for e in inside if e["dur"] >= 1.0]
    return {"host_ops_last_step": host_ops, "kernels_in_step": len(rows), "busy_us": round(busy, 1), "span_us": round(span, 1),
            "gaps_us": round(span - busy, 1), "steps_seen": len(steps), "by_kernel": table,
            "one_layer_window": layer}


def pop_option(argv: list[str], name: str) -> str | None:
    """Remove `name VALUE` from argv (the rest goes to bench_one_batch's parser); VALUE or None."""
    if name not in argv:
        return None
    i = argv.index(name)
    value = argv[i + 1]
    del argv[i:i + 2]
    return value


def load_runner(argv: list[str]):
    """A CUDA model runner from bench_one_batch's arguments: (runner, config, batch size, input len)."""
    server_args, bench, _ = prepare_args(argv)
    config = ModelConfig.load(resolve_model(server_args.model_path), server_args.dtype, "cuda",
                              server_args.context_length, server_args.trust_remote_code)
    return ModelRunner(server_args, config, "cuda"), config, bench.batch_size[0], bench.input_len[0]


def main() -> None:
    argv = sys.argv[1:]
    out_path = pop_option(argv, "--out")
    runner, config, bs, input_len = load_runner(argv)
    summary = {}
    for server_like in (False, True):
        decode_steps(runner, bs, input_len, 8, server_like)  # warm-up
        steps = decode_steps(runner, bs, input_len, 60, server_like)
        summary["server_like" if server_like else "bench_one_batch"] = {
            k: round(statistics.median(s[k] for s in steps), 1) for k in steps[0]}
    with tempfile.TemporaryDirectory() as tmp:
        trace = f"{tmp}/trace.json"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            decode_steps(runner, bs, input_len, 4, server_like=True)
        prof.export_chrome_trace(trace)
        kernels = kernel_table(trace, config.hf_config.num_hidden_layers)
    report = {"command": "python benchmarks/gpu/decode_profile.py " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "device": torch.cuda.get_device_name(), "batch_size": bs, "input_len": input_len,
              "median_per_step": summary, "profiled_graph": kernels}
    text = json.dumps(report, indent=1)
    print(json.dumps({"median_per_step": summary,
                      **{k: v for k, v in kernels.items() if k not in ("by_kernel", "one_layer_window", "host_ops_last_step")}}))
    for r in kernels["host_ops_last_step"]:
        print(r)
    for r in kernels["by_kernel"][:25]:
        print(r)
    for r in kernels["one_layer_window"]:
        print(r)
    if out_path:
        Path(out_path).write_text(text)


if __name__ == "__main__":
    main()
