"""Does host work after a decode launch slow the GPU's forward? A decode step at batch 16 (CUDA
graph), then N ms of host work before sampling: nothing (sync at once), sleep, a pure-Python spin,
xgrammar bitmask fills (on the main thread, and on 8 threads). Per mode, the graph's GPU time
(CUDA events around the replay) and the step time. A diagnostic, not a published figure.

    python benchmarks/gpu/overlap_probe.py --model-path .gw/llama-3.1-8b-body-smollm2-vocab \
        --load-format dummy --batch-size 16 --input-len 512 --tokenizer .gw/smollm2-135m-config
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_profile import _TimedGraph, load_runner, pop_option  # noqa: E402

from edgelm.bench_one_batch import prefill_batch  # noqa: E402
from edgelm.model_executor.forward_batch import ForwardBatch  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    tok_path = pop_option(argv, "--tokenizer")
    runner, _, bs, input_len = load_runner(argv)

    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    schema = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40}}, "required": ["title"]}
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema))
    matchers = []
    for _ in range(16):
        m = xgr.GrammarMatcher(compiled)
        for t in tok.encode('{"title": "The', add_special_tokens=False):
            assert m.accept_token(t)
        matchers.append(m)
    masks = xgr.allocate_token_bitmask(16, len(tok))
    pool = ThreadPoolExecutor(8)

    def fill_for(ms, threads):
        end = time.perf_counter() + ms / 1e3
        n = 0
        while time.perf_counter() < end:
            if threads:
                list(pool.map(lambda k: matchers[k].fill_next_token_bitmask(masks, k), range(16)))
            else:
                for k in range(16):
                    matchers[k].fill_next_token_bitmask(masks, k)
            n += 16
        return n

    def spin(ms):
        end = time.perf_counter() + ms / 1e3
        x = 0
        while time.perf_counter() < end:
            x += 1

    modes = {"none": lambda: None, "sleep5": lambda: time.sleep(0.005), "spin5": lambda: spin(5),
             "fill5_serial": lambda: fill_for(5, False), "fill5_threads": lambda: fill_for(5, True)}
    log: list = []
    graphs = runner.cuda_graph_runner.graphs
    for b in list(graphs):
        graphs[b] = _TimedGraph(graphs[b], log)
    results = {}
    for rnd in range(2):
        for name, work in modes.items():
            req_slots, info_s, batch = prefill_batch(runner, bs, input_len)
            next_ids = runner.sample(runner.forward(batch), info_s).next_token_ids
            torch.cuda.synchronize()
            rows = []
            for step in range(30):
                t0 = time.perf_counter()
                ids = next_ids.tolist()
                loc = runner.allocator.alloc(bs)
                fb = ForwardBatch.for_decode(ids, req_slots, [input_len + step + 1] * bs, loc, "cuda", lazy=True)
                logits = runner.forward(fb)
                done = torch.cuda.Event()
                done.record()
                t_launch = time.perf_counter()
                work()
                t_work = time.perf_counter()
                gpu_done = done.query()
                next_ids = runner.sample(logits, info_s).next_token_ids
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                _, start, end = log[-1]
                rows.append({"step_ms": (t1 - t0) * 1e3, "graph_gpu_ms": start.elapsed_time(end),
                             "work_ms": (t_work - t_launch) * 1e3, "gpu_done_after_work": gpu_done})
            if rnd == 1:
                results[name] = {k: round(statistics.median(float(r[k]) for r in rows[5:]), 3) for k in rows[0]}
                print(name, json.dumps(results[name]), flush=True)


if __name__ == "__main__":
    main()
