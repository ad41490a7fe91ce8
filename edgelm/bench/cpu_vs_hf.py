"""Batch-1 greedy decode speed: edgelm's ModelRunner against HF transformers `generate`, on the
same GGUF weights, in one process (the same threads, the same machine load).

    python -m edgelm.bench --out benchmarks/results/cpu_bench.json [--threads 2 1]

Each side prefills the same chat prompt, then decodes `--new-tokens` tokens one step at a time;
only the decode steps are timed (HF's through a logits processor called once per step). The
rounds alternate ours / HF so that a change in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

from edgelm.bench_utils import write_json
from edgelm.model_config import ModelConfig
from edgelm.model_executor.forward_batch import ForwardBatch
from edgelm.model_executor.model_runner import ModelRunner
from edgelm.model_loader.resolve import resolve_model
from edgelm.server_args import ServerArgs

PROMPT = "Write a long story about a robot who learns to paint."


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        out["gguf"] = version("gguf")
    except Exception:
        out["gguf"] = None
    try:
        out["edgelm_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except Exception:
        out["edgelm_commit"] = None
    return out


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


class EdgelmDecoder:
    """One request through ModelRunner, as the scheduler would drive it at batch 1."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.last_tokens: list[int] = []

    def run(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
        """Prefill, then `new_tokens` decode steps; returns (all new tokens, decode seconds)."""
        r = self.runner
        req = r.req_to_token_pool.alloc()
        kv = r.allocator.alloc(len(prompt) + new_tokens)
        r.req_to_token_pool.write(req, 0, kv)
        device = r.device
        logits = r.forward(ForwardBatch.for_extend(prompt, [req], [0], [len(prompt)], kv[:len(prompt)], device))
        out = [int(logits.argmax(-1))]
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        seq_len = len(prompt)
        for _ in range(new_tokens):
            seq_len += 1
            batch = ForwardBatch.for_decode([out[-1]], [req], [seq_len], kv[seq_len - 1:seq_len], device)
            logits = r.forward(batch)
            out.append(int(logits.argmax(-1)))  # the host reads the token, as a scheduler must
        elapsed = time.perf_counter() - start
        r.allocator.free(kv)
        r.req_to_token_pool.free(req)
        self.last_tokens = out
        return out, elapsed


class _StepClock:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def hf_decode(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """transformers `generate` (greedy, KV cache) for 1 + new_tokens tokens; the time from the
    first token's logits to the last's covers exactly `new_tokens` decode steps."""
    from transformers import LogitsProcessorList

    clock = _StepClock()
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens + 1,
                             min_new_tokens=new_tokens + 1, do_sample=False, use_cache=True,
                             logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    assert len(clock.times) == new_tokens + 1
    return out[0, len(prompt):].tolist(), clock.times[-1] - clock.times[0]


def compare(ours: EdgelmDecoder, hf, prompt: list[int], new_tokens: int, rounds: int,
            quantized: EdgelmDecoder | None = None, quant_name: str = "") -> dict:
    """Warm up both, then `rounds` alternating timed rounds at the current thread count; with
    `quantized`, another edgelm runner (`quant_name`: its --torchao-config, or gguf-int4) takes its turn in each
    round."""
    ours.run(prompt, 4)
    hf_decode(hf, prompt, 4)
    if quantized is not None:
        quantized.run(prompt, 4)
    load_before = load_average()
    ours_s, hf_s, quant_s = [], [], []
    for _ in range(rounds):
        ours_tokens, t = ours.run(prompt, new_tokens)
        ours_s.append(t)
        hf_tokens, t = hf_decode(hf, prompt, new_tokens)
        hf_s.append(t)
        if quantized is not None:
            quant_tokens, t = quantized.run(prompt, new_tokens)
            quant_s.append(t)
    ours_tps = new_tokens / statistics.median(ours_s)
    hf_tps = new_tokens / statistics.median(hf_s)
    extra = {}
    if quantized is not None:
        q_tps = new_tokens / statistics.median(quant_s)
        extra = {f"edgelm_{quant_name}": {
            "decode_tok_s": q_tps, "ms_per_token": 1000 / q_tps, "decode_s_per_round": quant_s,
            "ratio_over_edgelm": q_tps / ours_tps, "ratio_over_hf": q_tps / hf_tps,
            "first_token_difference_from_edgelm": next(
                (i for i, (a, b) in enumerate(zip(quant_tokens, ours_tokens)) if a != b), None)}}
    return {**extra,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "edgelm": {"decode_tok_s": ours_tps, "ms_per_token": 1000 / ours_tps, "decode_s_per_round": ours_s},
        "hf_transformers": {"decode_tok_s": hf_tps, "ms_per_token": 1000 / hf_tps, "decode_s_per_round": hf_s},
        "ratio_edgelm_over_hf": ours_tps / hf_tps,
        "tokens_equal": ours_tokens == hf_tokens,
        "first_token_difference": next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens)) if a != b), None),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m edgelm.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Where to write the JSON result.")
    parser.add_argument("--model-path", default=None, help="A .gguf file (default: the embedded SmolLM2-135M).")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--new-tokens", type=int, default=64, help="Decode steps timed per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds per side (alternating).")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts to compare at, one run each (default: torch's choice).")
    parser.add_argument("--torchao-config", default=None,
                        help="Also time edgelm with this --torchao-config (e.g. int4wo-128) in the same rounds.")
    parser.add_argument("--gguf-int4", action="store_true",
                        help="Also time edgelm as it serves a GGUF by default: its 4-bit linear layers as stored "
                             "(model_loader.gguf_int4). The edgelm baseline runs the dequantized weights "
                             "(--dequantize-gguf), the same numbers transformers reads.")
    parser.add_argument("--quantize-lm-head", default="none", choices=("none", "int8"),
                        help="The --torchao-config / --gguf-int4 run also with this LM head (int8: "
                             "--quantize-lm-head int8).")
    args = parser.parse_args(argv)
    if args.quantize_lm_head != "none" and not (args.torchao_config or args.gguf_int4):
        parser.error("--quantize-lm-head goes with --torchao-config or --gguf-int4 (it changes that variant)")
    if args.torchao_config and args.gguf_int4:
        parser.error("one variant a run: --torchao-config or --gguf-int4")
    quant_name = ((args.torchao_config or ("gguf-int4" if args.gguf_int4 else ""))
                  + ("+int8head" if args.quantize_lm_head == "int8" else ""))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(args.model_path)
    if not source.gguf_file:
        parser.error("--model-path must be a GGUF file: transformers reads the same weights from it")
    server_args = ServerArgs(model_path=source.gguf_path, device=args.device, max_total_tokens=4096,
                             max_running_requests=4, context_length=2048, dequantize_gguf=True)
    config = ModelConfig.load(source, server_args.dtype, args.device, server_args.context_length)
    runner = ModelRunner(server_args, config, args.device)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                              dtype=config.dtype).to(args.device).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)

    ours = EdgelmDecoder(runner)
    quantized = None
    if args.torchao_config or args.gguf_int4:
        quant_args = dataclasses.replace(server_args, torchao_config=args.torchao_config or "",
                                         quantize_lm_head=args.quantize_lm_head, dequantize_gguf=not args.gguf_int4)
        quantized = EdgelmDecoder(ModelRunner(quant_args, config, args.device))
    runs = []
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        runs.append(compare(ours, hf, prompt, args.new_tokens, args.rounds, quantized, quant_name))
        print(f"{threads} threads: edgelm {runs[-1]['edgelm']['decode_tok_s']:.1f} tok/s, transformers "
              f"{runs[-1]['hf_transformers']['decode_tok_s']:.1f} tok/s, ratio {runs[-1]['ratio_edgelm_over_hf']:.2f}")
        if quantized is not None:
            q = runs[-1][f"edgelm_{quant_name}"]
            print(f"  edgelm {quant_name}: {q['decode_tok_s']:.1f} tok/s ({q['ratio_over_edgelm']:.2f}x edgelm)")
    result = {
        "benchmark": "batch-1 greedy decode, edgelm ModelRunner vs transformers generate, same GGUF weights",
        "command": "python -m edgelm.bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(),
        "device_kind": args.device,
        "cpu_count": os.cpu_count(),
        "versions": versions(),
        "model": source.display_name,
        "dtype": str(config.dtype).replace("torch.", ""),
        "attention_backend": runner.attention_backend_name,
        "torchao_config": args.torchao_config,
        "gguf_int4": args.gguf_int4,
        "quantize_lm_head": args.quantize_lm_head if args.quantize_lm_head != "none" else None,
        "quant_name": quant_name or None,
        "int4_cpu": os.environ.get("EDGELM_INT4_CPU", "kernel") if args.torchao_config or args.gguf_int4 else None,
        "weight_bytes": {"edgelm": runner.weight_bytes,
                         **({quant_name: quantized.runner.weight_bytes} if quantized else {})},
        "prompt": PROMPT,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "timing": "decode steps only (prefill excluded); tok/s = new_tokens / median round time",
        "runs": runs,
        "sample_output": tokenizer.decode(ours.last_tokens[:32]),
    }
    write_json(args.out, result, indent=2)
    return result


if __name__ == "__main__":
    main()
