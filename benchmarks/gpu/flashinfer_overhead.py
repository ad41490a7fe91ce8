"""Where a decode step's attention time goes, triton against flashinfer, at Llama-3.1-8B's shape.

    PYTHONPATH=. python benchmarks/gpu/flashinfer_overhead.py --out result.json

For batch 1 and 32 at a 1024-token context, each backend as the CUDA-graph runner drives it:
- `replay_hook_us`: host time of `init_forward_metadata_replay_cuda_graph` (it runs before every
  graph replay, with the GPU idle: for flashinfer the page-table gather and FlashInfer's plan;
  for flashinfer also the full `plan` instead of the lean re-plan, `full_plan_hook_us`);
- `layer_us`: one layer's K/V write + attention inside a CUDA graph of 8 layers (the layers' KV
  together exceed L2), from CUDA events, median of replays.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from edgelm.bench_utils import write_json
from edgelm.layers.attention import create_attention_backend
from edgelm.layers.attention.radix_attention import RadixAttention
from edgelm.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from edgelm.model_executor.forward_batch import ForwardBatch

HEADS, KV_HEADS, HEAD_DIM, LAYERS, CONTEXT = 32, 8, 128, 8, 1024


def measure(name: str, bs: int) -> dict:
    torch.manual_seed(0)
    dtype = torch.bfloat16
    tokens = bs * CONTEXT
    req_pool = ReqToTokenPool(bs, CONTEXT + 16, "cuda")
    pool = MHATokenToKVPool(tokens, dtype, KV_HEADS, HEAD_DIM, LAYERS, "cuda")
    for buf in pool.k_buffer + pool.v_buffer:
        buf.normal_()
    slots = torch.randperm(tokens, device="cuda") + 1
    for r in range(bs):
        req_pool.write(r, 0, slots[r * CONTEXT:(r + 1) * CONTEXT])
    cfg = SimpleNamespace(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    runner = SimpleNamespace(device="cuda", dtype=dtype, model_config=cfg, req_to_token_pool=req_pool,
                             token_to_kv_pool=pool)
    backend = create_attention_backend(name, runner)
    backend.init_cuda_graph_state(bs, CONTEXT + 16)
    layers = [RadixAttention(HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS, layer_id=i) for i in range(LAYERS)]
    batch = ForwardBatch.for_decode([0] * bs, list(range(bs)), [CONTEXT] * bs,
                                    slots.view(bs, CONTEXT)[:, -1].contiguous(), "cuda")
    batch.token_to_kv_pool, batch.req_to_token_pool, batch.attn_backend = pool, req_pool, backend
    qkv = torch.randn(bs, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=dtype)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)

    def step():
        for layer in layers:
            backend.forward(q, k, v, layer, batch)

    backend.init_forward_metadata_capture_cuda_graph(bs, batch)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()
        step()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step()
    torch.cuda.synchronize()

    def hook_us(fn, n=30) -> float:
        times = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        return statistics.median(times) * 1e6

    out = {"replay_hook_us": hook_us(lambda: backend.init_forward_metadata_replay_cuda_graph(bs, batch))}
    if name == "flashinfer":
        out["full_plan_hook_us"] = hook_us(lambda: backend._plan_graph(bs, batch, fast=False))
    layer_ms = []
    for _ in range(20):
        backend.init_forward_metadata_replay_cuda_graph(bs, batch)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        layer_ms.append(start.elapsed_time(end) / LAYERS)
    out["layer_us"] = statistics.median(layer_ms) * 1e3
    out["kv_read_gbps"] = bs * CONTEXT * 2 * KV_HEADS * HEAD_DIM * 2 / (out["layer_us"] * 1e-6) / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--backends", nargs="+", default=["triton", "flashinfer"])
    args = parser.parse_args()
    report = {"command": "python " + shlex.join(sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "shape": {"heads": HEADS, "kv_heads": KV_HEADS,
              "head_dim": HEAD_DIM, "context": CONTEXT, "layers_per_graph": LAYERS}, "results": {}}
    for name in args.backends:
        for bs in (1, 32):
            r = measure(name, bs)
            report["results"][f"{name}_bs{bs}"] = r
            print(f"{name:>10} bs {bs:>2}: replay hook {r['replay_hook_us']:7.1f} us"
                  + (f" (full plan {r['full_plan_hook_us']:.1f} us)" if "full_plan_hook_us" in r else "")
                  + f", layer {r['layer_us']:6.1f} us ({r['kv_read_gbps']:.0f} GB/s KV)", flush=True)
    if args.out:
        write_json(args.out, report, indent=2)


if __name__ == "__main__":
    main()
