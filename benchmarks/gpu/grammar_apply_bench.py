"""Host and device cost of the grammar bitmask on a GPU: xgrammar fill (serial vs batched) at two
grammar states, and the apply step (Triton kernel vs torch ops), batch 1 and 16.

    python benchmarks/gpu/grammar_apply_bench.py --tokenizer .whl/smollm2-135m-config --out $OUT/grammar_apply.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from edgelm.constrained import bitmask as bm


def host_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    total = (time.perf_counter() - t) / n
    return round(1e6 * host, 2), round(1e6 * total, 2)


def _apply_costs(logits, mask, row_list) -> dict:
    """(host, host + device) µs per call of each way to apply `mask` to `logits`."""
    def device_mask():
        return mask.to("cuda", non_blocking=True)

    return {"triton_rows_us(host,total)": host_us(lambda: bm._apply_triton(logits, device_mask(), row_list)),
            "triton_all_us(host,total)": host_us(lambda: bm._apply_triton(logits, device_mask(), None)),
            "torch_rows_us(host,total)": host_us(lambda: bm._apply_torch(logits, device_mask(), row_list)),
            "torch_all_us(host,total)": host_us(lambda: bm._apply_torch(logits, device_mask(), None)),
            "apply_vocab_mask_us(host,total)": host_us(lambda: bm.apply_vocab_mask(logits, mask, row_list)),
            "empty_launch_us(host,total)": host_us(lambda: logits.add_(0))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = 49152
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    schema = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                               "story": {"type": "string", "minLength": 600}},
              "required": ["title", "story"]}
    compiled = compiler.compile_json_schema(json.dumps(schema))
    rows = []
    for state, text in (("start", ""), ("in_string", '{"title": "A tale", "story": "Once upon a time there')):
        for b in (1, 16):
            matchers = [xgr.GrammarMatcher(compiled) for _ in range(b)]
            for m in matchers:
                for t in tok.encode(text, add_special_tokens=False):
                    assert m.accept_token(t)
            mask = bm.allocate_vocab_mask(vocab, b)
            t0 = time.perf_counter()
            for _ in range(50):
                for i, m in enumerate(matchers):
                    m.fill_next_token_bitmask(mask, i)
            serial = (time.perf_counter() - t0) / 50
            t0 = time.perf_counter()
            for _ in range(50):
                _threaded_fill(matchers, mask)
            batched = (time.perf_counter() - t0) / 50
            rows.append({"what": "fill", "state": state, "batch": b, "serial_us": round(1e6 * serial, 1),
                         "threaded_batch_fill_us": round(1e6 * batched, 1)})
            print(rows[-1], flush=True)
    for v in (49152, 128256) if torch.cuda.is_available() else ():
        for b in (1, 16):
            logits = torch.randn(b, v, device="cuda")
            mask = bm.allocate_vocab_mask(v, b)
            mask[:, ::3] = 0
            rows.append({"what": "apply", "vocab": v, "batch": b, **_apply_costs(logits, mask, list(range(b)))})
            print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "rows": rows}, f, indent=1)


_BATCH = []


def _threaded_fill(matchers, mask):
    """xgrammar's BatchGrammarMatcher (threads: all cores but one, at most 8), as edgelm used to fill."""
    import os

    import xgrammar as xgr

    if not _BATCH:
        _BATCH.append(xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) - 1))))
    if len(matchers) == 1:
        matchers[0].fill_next_token_bitmask(mask, 0)
    else:
        _BATCH[0].batch_fill_next_token_bitmask(matchers, mask, list(range(len(matchers))))


if __name__ == "__main__":
    main()
