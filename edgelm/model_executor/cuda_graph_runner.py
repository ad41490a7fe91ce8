"""Decode steps replayed from CUDA graphs, one graph per captured batch size.

A decode step of a small model is hundreds of short kernel launches; on a Jetson the CPU that
launches them is slower than the GPU that runs them. A graph launches the whole step at once.

Protocol with the attention backend (`supports_cuda_graph = True`):
  init_cuda_graph_state(max_bs, max_context_len)          once, before any capture
  init_forward_metadata_capture_cuda_graph(bs, batch)     before warming up and capturing `bs`
  init_forward_metadata_replay_cuda_graph(bs, batch)      before each replay (batch.seq_lens_cpu
                                                          is the padded host copy)
  replay_hook_reads_device_batch = True                   if that hook reads the device batch or
                                                          req_to_token (they are then ready before it)
The batch's device tensors are views `[:bs]` of static buffers sized `max_bs`. Rows past the
real batch are padding: the request pool's padding row, seq_len 1, KV slot 0 (the pool's dummy slot).

Host work before a replay is what a batch-1 step waits for with the GPU idle, so it is kept to a
few launches: a `for_decode` batch's host block goes to the device in one copy from pinned memory,
its KV slots in another; the graph itself then derives int32 seq_lens and records the KV slots in
req_to_token (before the replay hook instead, for a backend that plans from them).
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from edgelm.layers.triton_ops import pdl
from edgelm.model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from edgelm.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to max_bs (max_bs itself always included)."""
    sizes = [bs for bs in (1, 2, 4, 8) if bs <= max_bs] + list(range(16, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def default_cuda_graph_max_bs() -> int:
    """32 on a Jetson or a GPU under 32 GiB, 160 on larger discrete GPUs."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if getattr(props, "is_integrated", False) or props.total_memory < (32 << 30):
        return 32
    return 160


class CudaGraphRunner:
    def __init__(self, model_runner: ModelRunner, max_bs: int):
        self.model_runner = model_runner
        self.model = model_runner.model
        self.backend = model_runner.attn_backend
        self.device = model_runner.device
        self.capture_bs = capture_batch_sizes(max_bs)
        self.max_bs = self.capture_bs[-1]
        kw = dict(device=self.device)
        self.padding_row = model_runner.req_to_token_pool.padding_row
        # static inputs: one int64 block [4, max_bs] (input_ids, positions, req_pool_indices, seq_lens),
        # its pinned host twin, and the KV slots; the captured graph makes int32 seq_lens from row 3
        self.block = torch.zeros((4, self.max_bs), dtype=torch.int64, **kw)
        self.block[2].fill_(self.padding_row)
        self.block[3].fill_(1)
        self.staging = torch.empty((4, self.max_bs), dtype=torch.int64, pin_memory=True)
        self.staging.copy_(self.block)
        self.staging_free = torch.cuda.Event()  # the last copy out of staging has run
        self.input_ids, self.positions, self.req_pool_indices = self.block[0], self.block[1], self.block[2]
        self.out_cache_loc = torch.zeros(self.max_bs, dtype=torch.int64, **kw)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, **kw)
        self.seq_lens_cpu = torch.ones(self.max_bs, dtype=torch.int32)
        # a backend whose replay hook reads the device batch or req_to_token (FlashInfer plans from
        # them) needs them ready before the hook; otherwise the graph prepares them itself
        self.prepare_in_graph = not getattr(self.backend, "replay_hook_reads_device_batch", False)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.batches: dict[int, ForwardBatch] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [bs, vocab] float32, written by each replay
        self.memory_bytes = 0
        self.capture_seconds = 0.0
        self.backend.init_cuda_graph_state(self.max_bs, model_runner.req_to_token_pool.max_context_len)
        self.capture()

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            req_pool_indices_cpu=[self.padding_row] * bs,
            seq_lens_cpu=self.seq_lens_cpu[:bs],
            req_to_token_pool=self.model_runner.req_to_token_pool,
            token_to_kv_pool=self.model_runner.token_to_kv_pool,
            attn_backend=self.backend,
        )

    def _prepare(self, bs: int) -> None:
        """int32 seq_lens from the block, and each row's new KV slot into req_to_token (padding
        rows write the padding row)."""
        self.seq_lens[:bs].copy_(self.block[3, :bs])
        table = self.model_runner.req_to_token_pool.req_to_token
        table[self.req_pool_indices[:bs], self.positions[:bs]] = self.out_cache_loc[:bs].to(table.dtype)

    def _run(self, batch: ForwardBatch) -> torch.Tensor:
        if self.prepare_in_graph:
            self._prepare(batch.batch_size)
        return self.model(batch.input_ids, batch.positions, batch)

    def capture(self) -> None:
        """Largest batch first, all graphs in one memory pool: the smaller ones reuse its blocks.
        Then the batch sizes launched with PDL (batch 1 on SM 9.0+) are captured once more, into a
        pool of their own, and that graph replaces the first: on an H100 the second capture of the
        batch-1 Llama-3.1-8B step ran 1.2-1.4 % faster than the first (5.53 vs 5.60 ms a step in
        bench_one_batch, benchmarks/results/ablations/prefetch/session5_run_h100.log), and only with PDL's early release
        (graph time on the GPU 5659 -> 5585 us; without early release 5669 both times). Why is not
        known: the kernels, launch attributes and buffers are the same. EDGELM_GRAPH_RECAPTURE=0
        turns the second capture off."""
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        gc.collect()
        gc.disable()  # a collection during capture would slow every capture down
        try:
            pool = None
            for bs in reversed(self.capture_bs):
                pool = self._capture_one(bs, pool, stream)
            if os.environ.get("EDGELM_GRAPH_RECAPTURE", "1") != "0":
                pool = None
                for bs in reversed(self.recapture_bs()):
                    pool = self._capture_one(bs, pool, stream)
        finally:
            gc.enable()
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.memory_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])

    def recapture_bs(self) -> list[int]:
        """The captured batch sizes whose kernels launch with PDL (see capture)."""
        return [bs for bs in self.capture_bs if pdl.mode(torch.device(self.device), bs) != 0]

    def _capture_one(self, bs: int, pool, stream: torch.cuda.Stream):
        """Warm up and capture the graph of batch size `bs` into `pool` (None: a new one); returns its pool."""
        batch = self._static_batch(bs)
        self.backend.init_forward_metadata_capture_cuda_graph(bs, batch)
        with torch.cuda.stream(stream):
            # warm-up: Triton compiles and autotunes here, outside the capture
            for _ in range(2):
                self._run(batch)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            logits = self._run(batch)
        self.graphs[bs], self.batches[bs], self.logits[bs] = graph, batch, logits
        return graph.pool()

    def can_run(self, forward_batch: ForwardBatch) -> bool:
        return (forward_batch.forward_mode.is_decode() and forward_batch.batch_size <= self.max_bs
                and not forward_batch.return_all_logits)

    def replay(self, forward_batch: ForwardBatch) -> torch.Tensor:
        """Logits [raw_bs, vocab] float32 of `forward_batch`, a decode batch of at most max_bs."""
        raw_bs = forward_batch.batch_size
        bs = self.capture_bs[bisect.bisect_left(self.capture_bs, raw_bs)]
        fb = forward_batch
        if fb.decode_host is not None:  # host lists: one pinned copy of the whole block
            self.staging_free.synchronize()
            self.staging[:, :raw_bs].copy_(fb.decode_host)
            if bs != raw_bs:
                self.staging[:2, raw_bs:bs].zero_()
                self.staging[2, raw_bs:bs].fill_(self.padding_row)
                self.staging[3, raw_bs:bs].fill_(1)
            self.block.copy_(self.staging, non_blocking=True)
            self.staging_free.record()
            if fb.input_ids_device is not None:  # the in-flight step's samples, in stream order
                self.block[0, :raw_bs].copy_(fb.input_ids_device)
        else:  # device tensors (tests, tools)
            for row, src in enumerate((fb.input_ids, fb.positions, fb.req_pool_indices, fb.seq_lens)):
                self.block[row, :raw_bs].copy_(src)
            if bs != raw_bs:
                self.block[:2, raw_bs:bs].zero_()
                self.block[2, raw_bs:bs].fill_(self.padding_row)
                self.block[3, raw_bs:bs].fill_(1)
        self.out_cache_loc[:raw_bs].copy_(fb.out_cache_loc)
        if bs != raw_bs:
            self.out_cache_loc[raw_bs:bs].zero_()
            self.seq_lens_cpu[raw_bs:bs].fill_(1)
        self.seq_lens_cpu[:raw_bs].copy_(fb.seq_lens_cpu)
        if not self.prepare_in_graph:
            self._prepare(bs)
        batch = self.batches[bs]
        batch.req_pool_indices_cpu = list(fb.req_pool_indices_cpu) + [self.padding_row] * (bs - raw_bs)
        self.backend.init_forward_metadata_replay_cuda_graph(bs, batch)
        self.graphs[bs].replay()
        # a copy: the sampler edits logits in place, and the next replay overwrites the buffer
        return self.logits[bs][:raw_bs].clone()
