"""Decode through the server's scheduler loop (in-process: no HTTP, no tokenizer process), with
overlap scheduling off and on, against the memory-bandwidth roofline measured in the same run.

bench_one_batch times the model runner's step as SGLang's tool does; this times what a server
achieves per step: the scheduler's bookkeeping, sampling read-back and output handling included,
and with overlap scheduling that host work runs while the GPU computes the next step.

    python benchmarks/scheduler_loop.py --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
        --batch-sizes 1 16 --out benchmarks/results/scheduler_loop_llama-3.1-8b_bf16_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from edgelm.bench_one_batch import decode_weight_bytes, shipped_config_dir  # noqa: E402
from edgelm.bench_utils import (
    measure_bandwidth,  # noqa: E402
    write_json,
)
from edgelm.managers import io_struct as io  # noqa: E402
from edgelm.managers.scheduler import Scheduler  # noqa: E402
from edgelm.managers.tokenizer_utils import load_tokenizer  # noqa: E402
from edgelm.model_config import ModelConfig  # noqa: E402
from edgelm.model_executor.model_runner import ModelRunner  # noqa: E402
from edgelm.model_loader.resolve import resolve_model  # noqa: E402
from edgelm.sampling.sampling_params import SamplingParams  # noqa: E402
from edgelm.server_args import ServerArgs  # noqa: E402


def run(scheduler: Scheduler, batch: int, input_len: int, new_tokens: int, tag: str) -> dict:
    vocab = scheduler.vocab_size
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        prompt = torch.randint(0, vocab, (input_len,), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        scheduler.add_request(io.TokenizedGenerateReq(f"{tag}-{i}", prompt, params))
    while scheduler.waiting or scheduler.chunked_req:  # prefill: not timed
        scheduler.step_once()
    first, start = scheduler.decode_steps, time.perf_counter()
    while scheduler.has_work():  # with overlap, the last call only reads the last step back
        scheduler.step_once()
    elapsed = time.perf_counter() - start
    steps = scheduler.decode_steps - first  # decode forwards, the same count either way
    return {"steps": steps, "step_ms": 1e3 * elapsed / max(steps, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--tokenizer-path", default=None, help="a tokenizer for a config that ships none (the loop "
                    "only needs one to exist: greedy, no stop strings, no grammar)")
    ap.add_argument("--torchao-config", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    model_path = shipped_config_dir(args.model_path) or args.model_path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = measure_bandwidth(device) if device == "cuda" else None
    ctx_len = args.input_len + args.new_tokens + 16
    server_args = ServerArgs(model_path=model_path, load_format=args.load_format, dtype=args.dtype,
                             tokenizer_path=args.tokenizer_path, torchao_config=args.torchao_config,
                             context_length=ctx_len, max_total_tokens=max(args.batch_sizes) * ctx_len + 256,
                             cuda_graph_max_bs=max(max(args.batch_sizes), 1), grammar_backend="none")
    resolved = resolve_model(model_path)
    config = ModelConfig.load(resolved, args.dtype, device, ctx_len)
    runner = ModelRunner(server_args, config, device)
    scheduler, sink, ctx = Scheduler.in_process(server_args, runner, load_tokenizer(server_args, resolved))
    weights = decode_weight_bytes(runner.model)
    rows = []
    for r in range(args.rounds):
        for bs in args.batch_sizes:
            for overlap in (False, True):
                scheduler.overlap = overlap
                row = {"batch": bs, "overlap": overlap, **run(scheduler, bs, args.input_len, args.new_tokens,
                                                              f"r{r}-{bs}-{overlap}")}
                while sink.poll(0):
                    sink.recv_pyobj()
                rows.append(row)
    summary = []
    for bs in args.batch_sizes:
        avg_len = args.input_len + args.new_tokens / 2
        step_bytes = weights + bs * avg_len * runner.memory_plan.kv_bytes_per_token
        for overlap in (False, True):
            best = min(x["step_ms"] for x in rows if x["batch"] == bs and x["overlap"] == overlap)
            s = {"batch": bs, "overlap": overlap, "step_ms": best, "tok_s": bs * 1e3 / best,
                 "bytes_per_step": step_bytes,
                 "median_step_ms_over_rounds": statistics.median(
                     x["step_ms"] for x in rows if x["batch"] == bs and x["overlap"] == overlap)}
            if peaks:
                s["roofline_ratio"] = step_bytes / (best / 1e3) / 1e9 / peaks["bandwidth_gbps"]
            summary.append(s)
    report = {"benchmark": "decode step through the scheduler loop, overlap scheduling off / on (best of rounds)",
              "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "model": resolved.display_name, "torchao_config": args.torchao_config, "input_len": args.input_len, "new_tokens": args.new_tokens,
              "peaks": peaks, "summary": summary, "rows": rows}
    write_json(args.out, report)
    for s in summary:
        ratio = f", roofline {s['roofline_ratio']:.3f}" if "roofline_ratio" in s else ""
        print(f"batch {s['batch']} overlap {'on ' if s['overlap'] else 'off'}: {s['step_ms']:.3f} ms/step, "
              f"{s['tok_s']:.1f} tok/s{ratio}")
    ctx.destroy(linger=0)
    return report


if __name__ == "__main__":
    main()
