"""Attention backends on the GPU: triton vs torch_native at Llama-3.1-8B's attention shape.

    PYTHONPATH=. python benchmarks/gpu/attention_bench.py --out benchmarks/results/attention_h100.json [--sweep]

Decode (one layer call: K/V write + attention) for batch 1/8/32/64 at context 1k/4k: eager time
(L2 flushed between calls), time inside a CUDA graph of several layers (per layer; the layers'
KV together exceed L2), achieved KV-read bandwidth, error against torch_native. Extend: 4k new
tokens. --sweep also times decode/extend kernel configurations and split targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import triton
from triton.testing import do_bench

from edgelm.bench_utils import write_json
from edgelm.layers.attention.radix_attention import RadixAttention
from edgelm.layers.attention.torch_native_backend import TorchNativeAttnBackend
from edgelm.layers.attention.triton_backend import TritonAttnBackend
from edgelm.layers.attention.triton_ops import DecodeConfig, ExtendConfig
from edgelm.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from edgelm.model_executor.forward_batch import ForwardBatch

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B
DEV = "cuda"


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


class Env:
    """req_to_token with shuffled slots, a pool of `layers` random layers, q/k/v, both backends."""

    def __init__(self, dtype, num_layers, prefix_lens, extend_lens=None):
        self.dtype = dtype
        bs = len(prefix_lens)
        decode = extend_lens is None
        seq_lens = [p + 1 for p in prefix_lens] if decode else [p + e for p, e in zip(prefix_lens, extend_lens)]
        tokens = sum(seq_lens)
        self.req_pool = ReqToTokenPool(bs, max(seq_lens) + 8, DEV)
        self.pool = MHATokenToKVPool(tokens, dtype, KV_HEADS, HEAD_DIM, num_layers, DEV)
        for buf in self.pool.k_buffer + self.pool.v_buffer:
            buf.normal_()
        slots = torch.randperm(tokens, device=DEV) + 1
        new, start = [], 0
        for r, n in enumerate(seq_lens):
            self.req_pool.write(r, 0, slots[start : start + n])
            new.append(slots[start + prefix_lens[r] : start + n])
            start += n
        if decode:
            self.fb = ForwardBatch.for_decode([0] * bs, list(range(bs)), seq_lens, torch.cat(new), DEV)
        else:
            self.fb = ForwardBatch.for_extend([0] * sum(extend_lens), list(range(bs)), prefix_lens, extend_lens,
                                              torch.cat(new), DEV)
        self.fb.token_to_kv_pool, self.fb.req_to_token_pool = self.pool, self.req_pool
        n_new = len(self.fb.input_ids)
        qkv = torch.randn(n_new, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEV, dtype=dtype)
        self.q, self.k, self.v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        self.layers = [RadixAttention(HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS, i) for i in range(num_layers)]
        cfg = SimpleNamespace(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
        runner = SimpleNamespace(device=DEV, dtype=dtype, model_config=cfg, req_to_token_pool=self.req_pool,
                                 token_to_kv_pool=self.pool)
        self.native = TorchNativeAttnBackend(runner)
        self.triton = TritonAttnBackend(runner)
        self.kv_read_bytes = sum(seq_lens) * KV_HEADS * HEAD_DIM * 2 * self.pool.k_buffer[0].element_size()

    def call(self, backend, layer=0):
        return backend.forward(self.q, self.k, self.v, self.layers[layer], self.fb)

    def eager_ms(self, backend):
        backend.init_forward_metadata(self.fb)
        return do_bench(lambda: self.call(backend), warmup=25, rep=100, return_mode="median")

    def host_us(self, backend, calls=50):
        """Host time to issue one call (Python + launches), the GPU kept out of the way."""
        backend.init_forward_metadata(self.fb)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            self.call(backend)
        host = (time.perf_counter() - t) / calls * 1e6
        torch.cuda.synchronize()
        return host

    def graph_ms(self, backend, max_context_len):
        """Per-layer time of a CUDA graph that runs every layer once (decode only)."""
        bs = self.fb.batch_size
        backend.init_cuda_graph_state(bs, max_context_len)
        backend.init_forward_metadata_capture_cuda_graph(bs, self.fb)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(len(self.layers)):
                self.call(backend, i)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(len(self.layers)):
                self.call(backend, i)
        backend.init_forward_metadata_replay_cuda_graph(bs, self.fb)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(4):
                graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 4 / len(self.layers))
        del graph
        return statistics.median(times)


def decode_layers(bs, ctx, dtype):
    """Enough layers that their KV (read once per graph replay) is several times the L2 cache."""
    per_layer = bs * ctx * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize
    return max(1, min(32, math.ceil(256 * 2**20 / per_layer)))


def copy_bandwidth_gbs():
    x = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / ms / 1e6


def bench_decode(dtype, shapes, with_native=True):
    rows = []
    for bs, ctx in shapes:
        env = Env(dtype, decode_layers(bs, ctx, dtype), [ctx - 1] * bs)
        env.triton.init_forward_metadata(env.fb)
        splits = env.triton.forward_metadata.mid_o.shape[2]
        out_tri = env.call(env.triton).clone()
        row = dict(batch=bs, context=ctx, layers_in_graph=len(env.layers), kv_splits=splits,
                   kv_read_mb=env.kv_read_bytes / 2**20,
                   triton_eager_us=1e3 * env.eager_ms(env.triton), triton_host_us=env.host_us(env.triton),
                   triton_graph_us=1e3 * env.graph_ms(env.triton, ctx + 8))
        row["triton_graph_kv_gbs"] = env.kv_read_bytes / row["triton_graph_us"] / 1e3
        row["triton_eager_kv_gbs"] = env.kv_read_bytes / row["triton_eager_us"] / 1e3
        if with_native:
            env.native.init_forward_metadata(env.fb)
            row["rel_err_vs_native"] = rel_err(out_tri, env.call(env.native))
            row["native_eager_us"] = 1e3 * env.eager_ms(env.native)
            row["native_host_us"] = env.host_us(env.native)
            row["speedup_graph_vs_native_eager"] = row["native_eager_us"] / row["triton_graph_us"]
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        del env
        torch.cuda.empty_cache()
    return rows


def causal_flops(prefix_lens, extend_lens):
    # QK^T and PV: 2 matmuls x 2 flops per multiply-add, over the visible (query, key) pairs
    pairs = sum(e * p + e * (e + 1) // 2 for p, e in zip(prefix_lens, extend_lens))
    return 4 * pairs * HEADS * HEAD_DIM


def bench_extend(dtype, cases, with_native=True, config=None):
    rows = []
    for name, prefix_lens, extend_lens in cases:
        env = Env(dtype, 1, prefix_lens, extend_lens)
        if config is not None:
            env.triton.extend_config = config
        env.triton.init_forward_metadata(env.fb)
        out_tri = env.call(env.triton).clone()
        flops = causal_flops(prefix_lens, extend_lens)
        row = dict(case=name, prefix_lens=prefix_lens, extend_lens=extend_lens,
                   config=dataclasses.asdict(env.triton.extend_config), triton_us=1e3 * env.eager_ms(env.triton))
        row["triton_tflops"] = flops / row["triton_us"] / 1e6
        if with_native:
            env.native.init_forward_metadata(env.fb)
            row["rel_err_vs_native"] = rel_err(out_tri, env.call(env.native))
            row["native_us"] = 1e3 * env.eager_ms(env.native)
            row["native_tflops"] = flops / row["native_us"] / 1e6
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        del env
        torch.cuda.empty_cache()
    return rows


def sweep_decode(dtype, shapes, configs):
    rows = []
    for bs, ctx in shapes:
        env = Env(dtype, decode_layers(bs, ctx, dtype), [ctx - 1] * bs)
        for cfg in configs:
            env.triton.decode_config = cfg
            try:
                us = 1e3 * env.graph_ms(env.triton, ctx + 8)
            except Exception as exc:  # a config that does not fit (shared memory, registers)
                rows.append(dict(batch=bs, context=ctx, **dataclasses.asdict(cfg), error=str(exc)[:200]))
                continue
            rows.append(dict(batch=bs, context=ctx, **dataclasses.asdict(cfg), graph_us=us,
                             kv_gbs=env.kv_read_bytes / us / 1e3))
        best = min((r for r in rows if r["batch"] == bs and r["context"] == ctx and "graph_us" in r),
                   key=lambda r: r["graph_us"])
        print(f"sweep decode bs={bs} ctx={ctx}: best {best}", flush=True)
        del env
        torch.cuda.empty_cache()
    return rows


def rank_decode_configs(rows):
    """Configs by the geometric mean, over the swept shapes, of time / best time at that shape."""
    best = {}
    for r in rows:
        if "graph_us" in r:
            key = (r["batch"], r["context"])
            best[key] = min(best.get(key, math.inf), r["graph_us"])
    by_cfg = {}
    for r in rows:
        if "graph_us" in r:
            cfg = tuple((f.name, r[f.name]) for f in dataclasses.fields(DecodeConfig))
            by_cfg.setdefault(cfg, []).append(r["graph_us"] / best[(r["batch"], r["context"])])
    ranked = [dict(cfg, slowdown_geomean=math.exp(sum(map(math.log, v)) / len(v)), shapes=len(v))
              for cfg, v in by_cfg.items() if len(v) == len(best)]
    return sorted(ranked, key=lambda r: r["slowdown_geomean"])


def print_summary(result):
    print("\nbatch ctx | triton graph us  GB/s | triton eager us (host) | native us (host) | err")
    for r in result["decode"]:
        print(f"{r['batch']:5d} {r['context']:5d} | {r['triton_graph_us']:9.1f} {r['triton_graph_kv_gbs']:6.0f} | "
              f"{r['triton_eager_us']:9.1f} ({r['triton_host_us']:5.1f}) | {r['native_eager_us']:9.1f} "
              f"({r['native_host_us']:5.1f}) | {r['rel_err_vs_native']:.1e}")
    for r in result["extend"]:
        print(f"extend {r['case']}: triton {r['triton_us']:.0f} us ({r['triton_tflops']:.0f} TFLOP/s), "
              f"native {r['native_us']:.0f} us, err {r['rel_err_vs_native']:.1e}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true", help="also time kernel configurations")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    t0 = time.time()
    result = dict(
        command="PYTHONPATH=. python " + " ".join(sys.argv),
        device=torch.cuda.get_device_name(), sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
        torch=torch.__version__, triton=triton.__version__, dtype=args.dtype,
        shape=dict(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM),
        copy_bandwidth_gbs_read_plus_write=copy_bandwidth_gbs(),
    )

    def save():
        result["seconds"] = time.time() - t0
        write_json(args.out, result)

    print(f"device {result['device']}, copy {result['copy_bandwidth_gbs_read_plus_write']:.0f} GB/s", flush=True)
    decode_shapes = [(bs, ctx) for ctx in (1024, 4096) for bs in (1, 8, 32, 64)]
    probe = Env(dtype, 1, [7])
    result["decode_config"] = dataclasses.asdict(probe.triton.decode_config)
    result["extend_default_config"] = dataclasses.asdict(probe.triton.extend_config)
    del probe
    result["decode"] = bench_decode(dtype, decode_shapes)
    save()
    extend_cases = [("1x4096 new", [0], [4096]), ("4x1024 new after 1024 prefix", [1024] * 4, [1024] * 4),
                    ("1x4096 new after 4096 prefix", [4096], [4096])]
    result["extend"] = bench_extend(dtype, extend_cases)
    save()
    print_summary(result)
    if args.sweep:
        configs = [DecodeConfig(block_n=n, num_warps=w, num_stages=s, min_split_len=max(64, n), programs_per_sm=p)
                   for n in (32, 64, 128) for w in (2, 4, 8) for s in (2, 3) for p in (1, 2, 4, 8)]
        result["sweep_decode"] = sweep_decode(dtype, [(1, 1024), (1, 4096), (8, 4096), (32, 1024), (64, 4096)],
                                              configs)
        save()
        ext_configs = [ExtendConfig(m, n, w, s) for m, n, w, s in
                       [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (128, 32, 4, 2), (64, 64, 4, 2),
                        (64, 64, 4, 3), (64, 32, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2)]]
        result["sweep_extend"] = []
        for cfg in ext_configs:
            try:
                result["sweep_extend"] += bench_extend(dtype, extend_cases[:2], with_native=False, config=cfg)
            except Exception as exc:
                result["sweep_extend"].append(dict(config=dataclasses.asdict(cfg), error=str(exc)[:200]))
        result["sweep_decode_ranking"] = rank_decode_configs(result["sweep_decode"])
        for r in result["sweep_decode_ranking"][:6]:
            print("decode config", r, flush=True)
    save()


if __name__ == "__main__":
    main()
