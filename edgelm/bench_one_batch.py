"""Latency of one static batch, without a server: prefill, then decode steps (SGLang's
`bench_one_batch`, with its flags).

    python -m edgelm.bench_one_batch --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
        --batch-size 1 64 --input-len 1024 --output-len 128 --result-file result.json

`--model-path` also takes the name of a config shipped in edgelm/configs (random weights).
`--attention-backends triton flashinfer` runs every case with each backend in turn over the same
weights and KV pool (side by side in one process). Each
figure is set against a ceiling measured in the same run: decode against memory bandwidth
(the bytes a step must read: weights once, the KV cache of every request), prefill against the
matmul rate.

The decode loop is the server's: on CUDA the next step is launched before the previous step's tokens
are read back (overlap scheduling); `--disable-overlap-schedule` times the plain loop, each step
prepared from tokens on the host (what SGLang's bench_one_batch times).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from edgelm.bench_utils import measure_peaks, write_json
from edgelm.layers.vocab_embedding import VocabEmbedding
from edgelm.managers.scheduler_output import HostSamples
from edgelm.model_config import ModelConfig
from edgelm.model_executor.forward_batch import ForwardBatch
from edgelm.model_executor.model_runner import ModelRunner, tensor_bytes
from edgelm.model_loader.resolve import resolve_model
from edgelm.sampling.sampling_batch_info import SamplingBatchInfo
from edgelm.server_args import ATTENTION_BACKENDS, ServerArgs, ServerArgsError

logger = logging.getLogger("edgelm.bench_one_batch")

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@dataclasses.dataclass
class BenchArgs:
    run_name: str = "default"
    batch_size: tuple[int, ...] = (1,)
    input_len: tuple[int, ...] = (1024,)
    output_len: tuple[int, ...] = (16,)
    result_file: str | None = None
    skip_peaks: bool = False
    compare_eager: bool = False
    attention_backends: tuple[str, ...] = ()
    repeat: int = 1
    seed: int = 0

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--run-name", default=BenchArgs.run_name, help="A label stored in the result.")
        parser.add_argument("--batch-size", type=int, nargs="+", default=BenchArgs.batch_size)
        parser.add_argument("--input-len", type=int, nargs="+", default=BenchArgs.input_len)
        parser.add_argument("--output-len", type=int, nargs="+", default=BenchArgs.output_len)
        parser.add_argument("--result-file", "--result-filename", dest="result_file", default=None,
                            help="Write the results here as JSON.")
        parser.add_argument("--skip-peaks", action="store_true",
                            help="Do not measure memory bandwidth and matmul peak (no roofline ratios).")
        parser.add_argument("--compare-eager", action="store_true",
                            help="Also time decode without CUDA graphs (same process, same model).")
        parser.add_argument("--attention-backends", nargs="+", default=(), choices=ATTENTION_BACKENDS,
                            help="Run every case with each of these attention backends in turn (same weights, "
                            "same KV pool); the first replaces --attention-backend.")
        parser.add_argument("--repeat", type=int, default=1,
                            help="Time each case this many times: median prefill, decode steps pooled.")
        parser.add_argument("--seed", type=int, default=0, help="Seed of the random prompts.")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> BenchArgs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def shipped_config_dir(name: str | None) -> str | None:
    """edgelm/configs/<name> when `name` is no path on disk but names a shipped config."""
    if not name or os.path.exists(os.path.expanduser(name)):
        return None
    path = os.path.join(CONFIGS_DIR, name)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def shipped_configs() -> list[str]:
    return sorted(d for d in os.listdir(CONFIGS_DIR) if os.path.isfile(os.path.join(CONFIGS_DIR, d, "config.json")))


# ------------------------------------------------------------------ model arithmetic
def _embedding_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, VocabEmbedding)]


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter once, except embedding tables, of
    which only a few rows are read (a table tied to the LM head is read once, as the head)."""
    # an int8 head (--quantize-lm-head) is counted with the quantized buffers below; no embedding table is read whole
    head = model.lm_head_weight if getattr(model, "head_quant", None) is None else None
    skip = {id(w) for w in _embedding_weights(model) if w is not head}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in skip:
            seen.add(id(p))
            total += tensor_bytes(p)
    for m in model.modules():  # quantized linears keep packed weights and scales as buffers
        if hasattr(m, "qweight"):
            # what a decode step reads: the CPU kernel's own copy where it exists, else the packed buffers
            on_cpu = getattr(m, "cpu_weight", None) is not None
            for name, b in m.named_buffers(recurse=False):
                if on_cpu and name in ("qweight", "scales", "offsets"):
                    continue
                # meta: scales and offsets again, paired (int4_meta_pairs): a step reads one form or the other
                if b is not None and name not in ("dense_weight", "meta") and id(b) not in seen:
                    seen.add(id(b))
                    total += tensor_bytes(b)
    return total


def prefill_flops(model: torch.nn.Module, model_config: ModelConfig, batch_size: int, input_len: int) -> float:
    """2·params·tokens for the layers' matmuls, the LM head on each request's last token only,
    plus causal attention: QKᵀ and PV, 2·2·heads·head_dim flops per (query, key) pair."""
    embeds = {id(w) for w in _embedding_weights(model)}
    layer_params = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in embeds)
    # quantized linears: their logical in × out weights, not the packed storage
    layer_params += sum(m.in_features * m.out_features for m in model.modules()
                        if hasattr(m, "qweight") and hasattr(m, "in_features"))  # not the int8 head
    quant = getattr(model, "head_quant", None)
    head_params = model.lm_head_weight.numel() if quant is None else quant.qweight.numel()
    tokens = batch_size * input_len
    pairs = batch_size * input_len * (input_len + 1) / 2
    attn = 4 * model_config.num_heads * model_config.head_dim * model_config.num_layers * pairs
    return 2 * layer_params * tokens + 2 * head_params * batch_size + attn


# ------------------------------------------------------------------ one run
def _greedy_info(batch_size: int, vocab_size: int, device: str) -> SamplingBatchInfo:
    return SamplingBatchInfo(
        temperatures=torch.zeros(batch_size, 1, device=device),
        top_ps=torch.ones(batch_size, device=device),
        top_ks=torch.full((batch_size,), vocab_size, dtype=torch.int64, device=device),
        min_ps=torch.zeros(batch_size, device=device),
        seeds=torch.zeros(batch_size, dtype=torch.int64, device=device),
        steps=torch.zeros(batch_size, dtype=torch.int64, device=device),
        is_all_greedy=True, need_top_p_top_k=False, need_min_p=False)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prefill_batch(runner: ModelRunner, batch_size: int, input_len: int, seed: int = 0
                  ) -> tuple[list[int], SamplingBatchInfo, ForwardBatch]:
    """Empty pools, then `batch_size` random prompts of `input_len` tokens given request and KV
    slots: the request slots, greedy sampling info and the extend batch that prefills them."""
    device, vocab = runner.device, runner.model_config.vocab_size
    runner.req_to_token_pool.clear()
    runner.allocator.clear()
    prompts = torch.randint(0, vocab, (batch_size, input_len), generator=torch.Generator().manual_seed(seed))
    req_slots = [runner.req_to_token_pool.alloc() for _ in range(batch_size)]
    kv_slots = runner.allocator.alloc(batch_size * input_len)
    for i, r in enumerate(req_slots):
        runner.req_to_token_pool.write(r, 0, kv_slots[i * input_len:(i + 1) * input_len])
    batch = ForwardBatch.for_extend(prompts.flatten().tolist(), req_slots, [0] * batch_size,
                                    [input_len] * batch_size, kv_slots, device)
    return req_slots, _greedy_info(batch_size, vocab, device), batch


def run_once(runner: ModelRunner, batch_size: int, input_len: int, output_len: int, seed: int = 0,
             overlap: bool = False) -> dict:
    """Prefill `batch_size` random prompts of `input_len` tokens in one pass, then
    `output_len` - 1 decode steps. Each decode latency is the host-clock interval between one
    step's tokens reaching the host and the next's.

    Without `overlap` a step is prepared from the previous step's tokens on the host and read back
    before the next one is prepared (SGLang's bench_one_batch). With `overlap` the loop is the
    server's overlap scheduler (managers/scheduler.py, run_decode): step n+1 is launched with step
    n's samples still on the device, then step n's tokens are read back while the GPU computes
    n+1, so the host's preparation of a step hides behind the previous one."""
    device = runner.device
    if batch_size > runner.max_running_requests or batch_size * (input_len + output_len) > runner.max_total_tokens:
        raise ValueError(f"batch {batch_size} × {input_len + output_len} tokens does not fit: "
                         f"{runner.max_running_requests} requests, {runner.max_total_tokens} KV tokens")
    req_slots, info, batch = prefill_batch(runner, batch_size, input_len, seed)
    _sync(device)
    t0 = time.perf_counter()
    next_ids = runner.sample(runner.forward(batch), info).next_token_ids
    _sync(device)
    prefill_s = time.perf_counter() - t0

    decode_s: list[float] = []
    tokens: list[list[int]] = [next_ids.tolist()]
    last = time.perf_counter()
    pending = None  # overlap: the step in flight, its samples on their way to the host
    for step in range(output_len - 1):
        out_cache_loc = runner.allocator.alloc(batch_size)
        seq_lens = [input_len + step + 1] * batch_size
        if overlap:  # the previous step's samples, still on the device, are this step's input ids
            ids = next_ids
        else:  # as the unoverlapped scheduler prepares a step: sampled ids to the host, host lists in
            ids = tokens[-1]
        batch = ForwardBatch.for_decode(ids, req_slots, seq_lens, out_cache_loc, device, lazy=True)
        out = runner.sample(runner.forward(batch), info)
        next_ids = out.next_token_ids
        if overlap:
            if pending is not None:  # read the previous step back while the GPU runs this one
                tokens.append(pending.wait().next_token_ids.tolist())
                now = time.perf_counter()
                decode_s.append(now - last)
                last = now
            pending = HostSamples(out)
        else:
            tokens.append(next_ids.tolist())
            now = time.perf_counter()
            decode_s.append(now - last)
            last = now
    if pending is not None:
        tokens.append(pending.wait().next_token_ids.tolist())
        decode_s.append(time.perf_counter() - last)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "tokens": tokens}


def summarize(runner: ModelRunner, peaks: dict | None, batch_size: int, input_len: int, output_len: int,
              timings: dict) -> dict:
    model = runner.model
    prefill_s, decode_s = timings["prefill_s"], timings["decode_s"]
    graphs = runner.cuda_graph_runner
    r = {"batch_size": batch_size, "input_len": input_len, "output_len": output_len,
         "cuda_graph": graphs is not None and batch_size <= graphs.max_bs,
         "prefill_latency_s": prefill_s, "prefill_tok_s": batch_size * input_len / prefill_s}
    flops = prefill_flops(model, runner.model_config, batch_size, input_len)
    r["prefill_tflops"] = flops / prefill_s / 1e12
    if decode_s:
        median = statistics.median(decode_s)
        # a step reads the weights once and each request's KV cache: seq_len grows from
        # input_len + 1 to input_len + output_len - 1 over the steps
        avg_len = input_len + 1 + (output_len - 2) / 2
        kv_bytes = batch_size * avg_len * runner.memory_plan.kv_bytes_per_token
        step_bytes = decode_weight_bytes(model) + kv_bytes
        r.update({"decode_median_latency_s": median, "decode_mean_latency_s": statistics.fmean(decode_s),
                  "decode_tok_s": batch_size / median, "decode_bytes_per_step": step_bytes,
                  "decode_kv_bytes_per_step": kv_bytes, "decode_gbps": step_bytes / median / 1e9})
    r["total_latency_s"] = prefill_s + sum(decode_s)
    r["total_tok_s"] = batch_size * (input_len + output_len) / r["total_latency_s"]
    if peaks:
        r["prefill_matmul_fraction"] = r["prefill_tflops"] / peaks["matmul_tflops"]
        if decode_s:
            r["decode_roofline_ratio"] = r["decode_gbps"] / peaks["bandwidth_gbps"]
    return r


def _run_eager(runner: ModelRunner, batch_size: int, input_len: int, output_len: int, seed: int,
               overlap: bool) -> dict:
    graphs, runner.cuda_graph_runner = runner.cuda_graph_runner, None
    try:
        run_once(runner, batch_size, input_len, min(output_len, 4), seed, overlap)
        return run_once(runner, batch_size, input_len, output_len, seed, overlap)
    finally:
        runner.cuda_graph_runner = graphs


# ------------------------------------------------------------------ driver
def _versions() -> dict:
    import importlib.metadata

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        out["flashinfer"] = importlib.metadata.version("flashinfer-python")
    except importlib.metadata.PackageNotFoundError:
        out["flashinfer"] = None
    return out


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def prepare_args(argv: list[str] | None) -> tuple[ServerArgs, BenchArgs, bool]:
    parser = argparse.ArgumentParser(prog="python -m edgelm.bench_one_batch", description=__doc__.split("\n")[0])
    ServerArgs.add_cli_args(parser)
    BenchArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    shipped = shipped_config_dir(args.model_path)
    if shipped:
        args.model_path = shipped
        if args.load_format == "auto":
            args.load_format = "dummy"  # a shipped config has no weights
    bench = BenchArgs.from_cli_args(args)
    max_bs, max_len = max(bench.batch_size), max(bench.input_len) + max(bench.output_len)
    # size the pools for the largest run, not the model's whole context
    if args.context_length is None:
        args.context_length = max_len + 8
    args.max_running_requests = args.max_running_requests or max_bs
    args.max_total_tokens = args.max_total_tokens or max_bs * max_len + 64
    args.cuda_graph_max_bs = args.cuda_graph_max_bs or max_bs
    if bench.attention_backends:
        args.attention_backend = bench.attention_backends[0]
    try:
        server_args = ServerArgs.from_cli_args(args)
    except ServerArgsError as exc:
        parser.error(str(exc))
    return server_args, bench, bool(shipped)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args, bench, shipped = prepare_args(argv)
    logging.basicConfig(level=server_args.log_level.upper(), format="[%(asctime)s] %(message)s")
    device = server_args.resolved_device()
    config = ModelConfig.load(resolve_model(server_args.model_path), server_args.dtype, device,
                              server_args.context_length, server_args.trust_remote_code)
    peaks = None
    if not bench.skip_peaks:  # before the model loads: the buffers need memory
        peaks = measure_peaks(device, config.dtype)
        logger.info("measured: %.0f GB/s copy, %.0f GB/s read, %.3g TFLOP/s %s matmul",
                    peaks["copy_gbps"], peaks["read_gbps"], peaks["matmul_tflops"], peaks["dtype"])
    t0 = time.perf_counter()
    runner = ModelRunner(server_args, config, device)
    startup_s = time.perf_counter() - t0
    results: list[dict] = []
    # the decode loop the server runs: overlapped on CUDA unless --disable-overlap-schedule
    overlap = server_args.resolved_overlap_schedule(device)
    report = {
        "run_name": bench.run_name,
        "command": "python -m edgelm.bench_one_batch " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "versions": _versions(),
        "model": os.path.basename(os.path.normpath(server_args.model_path)) if shipped else server_args.model_path,
        "load_format": server_args.load_format,
        "dtype": str(runner.dtype).replace("torch.", ""),
        "attention_backend": runner.attention_backend_name,
        "torchao_config": server_args.torchao_config or None,
        "quantize_lm_head": server_args.quantize_lm_head if server_args.quantize_lm_head != "none" else None,
        "overlap_schedule": overlap,
        "cuda_graph_max_bs": runner.cuda_graph_runner.max_bs if runner.cuda_graph_runner else None,
        "graph_memory_bytes": runner.graph_memory_bytes,
        "graph_capture_s": runner.cuda_graph_runner.capture_seconds if runner.cuda_graph_runner else None,
        "startup_s": startup_s,
        "weight_bytes": runner.weight_bytes,
        "decode_weight_bytes": decode_weight_bytes(runner.model),
        "kv_bytes_per_token": runner.memory_plan.kv_bytes_per_token,
        "peaks": peaks,
        "results": results,
    }
    backends = list(bench.attention_backends) or [runner.attention_backend_name]
    if bench.attention_backends:
        report["attention_backends"] = {}
    for i, name in enumerate(backends):
        if i:  # same weights and pools, this backend's kernels and CUDA graphs
            t0 = time.perf_counter()
            runner.set_attention_backend(name)
            logger.info("attention backend %s ready in %.1f s", name, time.perf_counter() - t0)
        if bench.attention_backends:
            graphs = runner.cuda_graph_runner
            report["attention_backends"][name] = {
                "graph_memory_bytes": runner.graph_memory_bytes,
                "graph_capture_s": graphs.capture_seconds if graphs else None}
        for bs in bench.batch_size:
            for input_len in bench.input_len:
                for output_len in bench.output_len:
                    # warm-up: compiles and autotunes kernels for these shapes
                    run_once(runner, bs, input_len, min(output_len, 4), bench.seed, overlap)
                    runs = [run_once(runner, bs, input_len, output_len, bench.seed, overlap)
                            for _ in range(max(1, bench.repeat))]
                    timings = {"prefill_s": statistics.median(t["prefill_s"] for t in runs),
                               "decode_s": [x for t in runs for x in t["decode_s"]]}
                    r = {"attention_backend": runner.attention_backend_name,
                         **summarize(runner, peaks, bs, input_len, output_len, timings)}
                    if len(runs) > 1:  # every timing, so that an outlier shows
                        r["prefill_latencies_s"] = [t["prefill_s"] for t in runs]
                    if bench.compare_eager and r["cuda_graph"] and output_len > 1:
                        eager = _run_eager(runner, bs, input_len, output_len, bench.seed, overlap)
                        r["eager_decode_median_latency_s"] = statistics.median(eager["decode_s"])
                        r["cuda_graph_decode_speedup"] = (r["eager_decode_median_latency_s"]
                                                          / r["decode_median_latency_s"])
                    results.append(r)
                    logger.info(_result_line(r))
                    if bench.result_file:  # after every run: a later failure keeps what was measured
                        write_json(bench.result_file, report, indent=2)
    print(format_table(report))
    return report


def _result_line(r: dict) -> str:
    line = (f"{r['attention_backend']} bs {r['batch_size']} in {r['input_len']} out {r['output_len']}: "
            f"prefill {r['prefill_latency_s'] * 1e3:.1f} ms "
            f"({r['prefill_tok_s']:.0f} tok/s)")
    if "decode_median_latency_s" in r:
        line += f", decode {r['decode_median_latency_s'] * 1e3:.2f} ms/step ({r['decode_tok_s']:.1f} tok/s)"
    if "eager_decode_median_latency_s" in r:
        line += f", eager decode {r['eager_decode_median_latency_s'] * 1e3:.2f} ms/step"
    return line


def format_table(report: dict) -> str:
    attention = ", ".join(report.get("attention_backends") or [report["attention_backend"]])
    lines = [f"{report['model']} {report['dtype']} on {report['device']}, attention {attention}"
             f"{', torchao ' + report['torchao_config'] if report['torchao_config'] else ''}"
             f"{', lm head ' + report['quantize_lm_head'] if report.get('quantize_lm_head') else ''}, "
             f"CUDA graphs {'bs<=' + str(report['cuda_graph_max_bs']) if report['cuda_graph_max_bs'] else 'off'}, "
             f"decode loop {'overlapped' if report.get('overlap_schedule') else 'not overlapped'}"]
    if report["peaks"]:
        p = report["peaks"]
        lines.append(f"measured ceilings: {p['bandwidth_gbps']:.0f} GB/s, {p['matmul_tflops']:.3g} TFLOP/s {p['dtype']}")
    head = ("attention", "bs", "in", "out", "prefill ms", "prefill tok/s", "of peak", "ITL ms", "decode tok/s",
            "GB/s", "roofline", "eager ITL ms")
    lines.append(" ".join(f"{h:>13}" for h in head))
    for r in report["results"]:
        row = (r.get("attention_backend", report["attention_backend"]), r["batch_size"], r["input_len"],
               r["output_len"], f"{r['prefill_latency_s'] * 1e3:.1f}",
               f"{r['prefill_tok_s']:.0f}", f"{r.get('prefill_matmul_fraction', float('nan')):.3f}",
               f"{r.get('decode_median_latency_s', float('nan')) * 1e3:.2f}", f"{r.get('decode_tok_s', 0):.1f}",
               f"{r.get('decode_gbps', 0):.0f}", f"{r.get('decode_roofline_ratio', float('nan')):.3f}",
               f"{r.get('eager_decode_median_latency_s', float('nan')) * 1e3:.2f}")
        lines.append(" ".join(f"{c!s:>13}" for c in row))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
