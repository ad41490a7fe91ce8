"""Per-step cost of grammar-constrained decoding on the host: filling the vocabulary bitmask from
each request's xgrammar matcher, and applying it to a [batch, vocab] logits tensor.

    python benchmarks/bench_grammar_bitmask.py --batch-sizes 1 16 [--vocab-size 128256] [--device cuda]
    python benchmarks/bench_grammar_bitmask.py --apply-only --device cuda   # random masks, no xgrammar

Prints one JSON object: per batch size, mean / p50 / p90 microseconds per decode step for fill,
apply (edgelm's apply_vocab_mask: xgrammar's C++ loop on the CPU, a Triton kernel on CUDA) and
apply_torch (the plain-torch fallback) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from edgelm.constrained import allocate_vocab_mask, apply_vocab_mask, create_grammar_backend, fill_vocab_masks
from edgelm.constrained.bitmask import _apply_torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}
ANSWER = ('{"name": "Ada Lovelace, Countess of Lovelace", "age": 36, "tags": ["red", "blue", "green"], '
          '"address": {"city": "London", "zip": "12345"}}')


def _stats(samples_s: list[float]) -> dict:
    us = sorted(s * 1e6 for s in samples_s)
    return {"mean_us": round(statistics.fmean(us), 1), "p50_us": round(us[len(us) // 2], 1),
            "p90_us": round(us[int(len(us) * 0.9)], 1)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(backend, tokenizer, batch_size: int, vocab_size: int, device: str, repeats: int) -> dict:
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    grammar = backend.get_future(("json", json.dumps(SCHEMA))).result(timeout=120)
    bitmask = allocate_vocab_mask(backend.vocab_size, batch_size)
    logits = torch.randn(batch_size, vocab_size, device=device)
    fill, apply, apply_torch = [], [], []
    for _ in range(repeats):
        grammars = [grammar.copy() for _ in range(batch_size)]
        for token in ids:  # one decode step per answer token, every row in the same state
            t0 = time.perf_counter()
            rows = fill_vocab_masks(grammars, bitmask)
            t1 = time.perf_counter()
            _sync(device)
            t2 = time.perf_counter()
            apply_vocab_mask(logits, bitmask, rows)
            _sync(device)
            t3 = time.perf_counter()
            fill.append(t1 - t0)
            apply.append(t3 - t2)
            t4 = time.perf_counter()
            _apply_torch(logits, bitmask.to(device, non_blocking=True), rows)
            _sync(device)
            apply_torch.append(time.perf_counter() - t4)
            for g in grammars:
                assert g.accept_token(token)
    return {"batch_size": batch_size, "steps": len(fill), "fill": _stats(fill), "apply": _stats(apply),
            "apply_torch": _stats(apply_torch)}


def bench_apply_only(batch_size: int, vocab_size: int, device: str, iters: int = 200) -> dict:
    """apply_vocab_mask on random masks (every row constrained), host bitmask copied each call."""
    bitmask = allocate_vocab_mask(vocab_size, batch_size)
    bitmask.copy_(torch.randint(-(2**31), 2**31 - 1, bitmask.shape, dtype=torch.int32))
    logits = torch.randn(batch_size, vocab_size, device=device)
    rows = list(range(batch_size))
    out = {"batch_size": batch_size}
    variants = {"apply": lambda: apply_vocab_mask(logits, bitmask, rows),
                "apply_torch": lambda: _apply_torch(logits, bitmask.to(device, non_blocking=True), rows)}
    for name, fn in variants.items():
        for _ in range(10):
            fn()
        runs = []
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            runs.append((time.perf_counter() - t0) / iters)
        out[name] = {"median_us": round(sorted(runs)[2] * 1e6, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="logits columns (default: the tokenizer's); larger = a padded lm head")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3, help="passes over the answer's tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--apply-only", action="store_true", help="time only the mask application")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.apply_only:
        vocab_size = args.vocab_size or 128256
        results = [bench_apply_only(bs, vocab_size, args.device) for bs in args.batch_sizes]
        _report(args, vocab_size, results)
        return

    from transformers import AutoTokenizer

    from edgelm.model_loader.resolve import embedded_model_path

    gguf = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    vocab_size = args.vocab_size or len(tokenizer)
    backend = create_grammar_backend("xgrammar", tokenizer, vocab_size, [tokenizer.eos_token_id])
    try:
        results = [bench(backend, tokenizer, bs, vocab_size, args.device, args.repeats) for bs in args.batch_sizes]
    finally:
        backend.shutdown()
    _report(args, vocab_size, results)


def _report(args, vocab_size: int, results: list[dict]) -> None:
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    report = {"bench": "grammar_bitmask_apply" if args.apply_only else "grammar_bitmask", "device": args.device,
              "device_name": device_name, "vocab_size": vocab_size, "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
