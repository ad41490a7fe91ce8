"""edgelm's own Triton attention backend (`--attention-backend triton`), for CUDA GPUs of SM 8.0+.

Decode: one launch rotates q and k and writes k and v into the pool (the model hands its rotary to
the backend), then one launch of split-KV flash-decoding over the token-paged pool with all q heads
of a kv head in one program, the last split of each head group merging the others. Extend: one launch for all requests, prefix and new tokens read from
the pool through req_to_token, causal within the new tokens. Decode runs under CUDA graphs: its
scratch buffers are preallocated and its split count is fixed per captured batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgelm.layers import triton_ops as switches
from edgelm.layers.attention.base import AttentionBackend
from edgelm.layers.triton_ops.scratch import scratch

_FALLBACK = "use --attention-backend torch_native"


@dataclass
class DecodeMetadata:
    mid_o: torch.Tensor  # [bs, H, splits, D] float32 partial outputs
    mid_lse: torch.Tensor  # [bs, H, splits] float32 partial log-sum-exps (log2 domain)
    counters: torch.Tensor  # int32 zeros: the in-kernel merge's arrival counters (left zero)


@dataclass
class ExtendMetadata:
    prefix_lens: torch.Tensor  # [bs]
    extend_lens: torch.Tensor  # [bs]
    extend_start: torch.Tensor  # [bs] offset of each request's first new token
    max_extend_len: int


class TritonAttnBackend(AttentionBackend):
    supports_cuda_graph = True

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        if not str(device).startswith("cuda"):
            return f"needs a CUDA GPU of compute capability 8.0 or newer, not device {device!r}; {_FALLBACK}"
        try:
            import triton  # noqa: F401
        except ImportError:
            return f"the triton package is not installed; {_FALLBACK}"
        if not torch.cuda.is_available():
            return f"torch sees no CUDA GPU; {_FALLBACK}"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"needs compute capability 8.0 or newer, this GPU is {major}.{minor}; {_FALLBACK}"
        return None

    def __init__(self, model_runner):
        from edgelm.layers.attention import triton_ops  # imports triton: only once the backend is chosen

        self.ops = triton_ops
        self.device = str(model_runner.device)
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        cfg = model_runner.model_config
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dtype = model_runner.dtype
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if kind == "cuda" else 4
        self.decode_config = triton_ops.default_decode_config(self.head_dim, dtype, kind)
        self.extend_config = triton_ops.default_extend_config(self.head_dim, dtype, kind)
        self.forward_metadata: DecodeMetadata | ExtendMetadata | None = None
        # CUDA-graph state (init_cuda_graph_state)
        self.graph_max_context_len = 0
        self.graph_mid_o: torch.Tensor | None = None
        self.graph_mid_lse: torch.Tensor | None = None
        self.graph_metadata: dict[int, DecodeMetadata] = {}

    # ---- metadata ----
    def _counters(self, bs: int) -> torch.Tensor:
        """The in-kernel merge's arrival counters for bs requests (zero; the kernel leaves them so)."""
        return scratch(self.device, "attn_merge", torch.int32,
                       self.ops.decode_counters(bs, self.num_heads, self.num_kv_heads))

    def _num_kv_splits(self, bs: int, max_seq_len: int) -> int:
        return self.ops.num_kv_splits(bs, self.num_heads, self.num_kv_heads, max_seq_len, self.num_sms, self.decode_config)

    def init_forward_metadata(self, forward_batch) -> None:
        bs = forward_batch.batch_size
        if forward_batch.forward_mode.is_decode():
            max_len = int(forward_batch.seq_lens_cpu.max()) if bs else 1
            splits = self._num_kv_splits(bs, max_len)
            self.forward_metadata = DecodeMetadata(
                mid_o=torch.empty((bs, self.num_heads, splits, self.head_dim), dtype=torch.float32,
                                  device=self.device),
                mid_lse=torch.empty((bs, self.num_heads, splits), dtype=torch.float32, device=self.device),
                counters=self._counters(bs))
            return
        fb = forward_batch
        if fb.extend_prefix_lens is not None and fb.extend_seq_lens is not None and fb.extend_start_loc is not None:
            prefix_lens, extend_lens, extend_start = fb.extend_prefix_lens, fb.extend_seq_lens, fb.extend_start_loc
        else:
            lens = torch.tensor(fb.extend_seq_lens_cpu, dtype=torch.int32)
            start = torch.zeros_like(lens)
            start[1:] = torch.cumsum(lens[:-1], 0)
            prefix_lens = torch.tensor(fb.extend_prefix_lens_cpu, dtype=torch.int32).to(self.device)
            extend_lens, extend_start = lens.to(self.device), start.to(self.device)
        self.forward_metadata = ExtendMetadata(prefix_lens, extend_lens, extend_start,
                                               max(fb.extend_seq_lens_cpu, default=0))

    # ---- CUDA graphs ----
    def init_cuda_graph_state(self, max_bs: int, max_context_len: int) -> None:
        """Scratch for every batch size up to max_bs, shared by all of them (one graph runs at a time)."""
        self.graph_max_context_len = max_context_len
        rows = max(bs * self._num_kv_splits(bs, max_context_len) for bs in range(1, max_bs + 1))
        self.graph_mid_o = torch.empty(rows * self.num_heads * self.head_dim, dtype=torch.float32,
                                       device=self.device)
        self.graph_mid_lse = torch.empty(rows * self.num_heads, dtype=torch.float32, device=self.device)
        self._counters(max_bs)  # sized before any capture: none allocates
        self.graph_metadata = {}

    def init_forward_metadata_capture_cuda_graph(self, bs: int, forward_batch) -> None:
        if self.graph_mid_o is None:
            raise RuntimeError("init_cuda_graph_state must run before capturing")
        splits = self._num_kv_splits(bs, self.graph_max_context_len)
        h, d = self.num_heads, self.head_dim
        meta = DecodeMetadata(mid_o=self.graph_mid_o[: bs * h * splits * d].view(bs, h, splits, d),
                              mid_lse=self.graph_mid_lse[: bs * h * splits].view(bs, h, splits),
                              counters=self._counters(bs))
        self.graph_metadata[bs] = meta
        self.forward_metadata = meta

    def init_forward_metadata_replay_cuda_graph(self, bs: int, forward_batch) -> None:
        # The captured kernels read seq_lens / req_pool_indices / out_cache_loc from the graph
        # runner's static buffers and derive each request's split length on the device: nothing
        # to copy here.
        self.forward_metadata = self.graph_metadata[bs]

    # ---- forward ----
    def forward(self, q, k, v, layer, forward_batch, rope=None):
        if rope is not None:  # one launch for the rotary and the KV write where the layouts allow
            positions, rotary = rope
            k_buf, v_buf = forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
            if rotary.rotate_and_store(positions, q, k, v, k_buf, v_buf, forward_batch.out_cache_loc):
                if forward_batch.forward_mode.is_decode():
                    return self._decode(q, layer, forward_batch, k_buf, v_buf)
                return self._extend(q, layer, forward_batch, k_buf, v_buf)
        return super().forward(q, k, v, layer, forward_batch, rope)

    def fused_kv_target(self, layer, forward_batch):
        # where the rotary + KV-write launch is switched on (rotary, rope_kv)
        if not (switches.enabled("rotary") and switches.enabled("rope_kv")):
            return None
        return self.decode_pool_target(layer, forward_batch)

    def forward_decode_stored(self, q, layer, forward_batch, k_buf, v_buf):
        return self._decode(q, layer, forward_batch, k_buf, v_buf)

    def forward_decode(self, q, k, v, layer, forward_batch):
        k_buf, v_buf = forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        self.ops.store_kv(k, v, k_buf, v_buf, forward_batch.out_cache_loc)
        return self._decode(q, layer, forward_batch, k_buf, v_buf)

    def _decode(self, q, layer, forward_batch, k_buf, v_buf):
        bs, h, d = q.shape[0], layer.tp_q_head_num, layer.head_dim
        o = torch.empty((bs, h * d), dtype=q.dtype, device=q.device)
        meta = self.forward_metadata
        self.ops.decode_attention(q.reshape(bs, h, d), k_buf, v_buf, o.view(bs, h, d), self.req_to_token,
                         forward_batch.req_pool_indices, forward_batch.seq_lens, meta.mid_o[:bs], meta.mid_lse[:bs],
                         layer.scaling, self.decode_config, meta.counters,
                         prefetch=getattr(layer, "l2_prefetch", None) if switches.enabled("l2_prefetch") else None)
        return o

    def forward_extend(self, q, k, v, layer, forward_batch):
        k_buf, v_buf = forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        self.ops.store_kv(k, v, k_buf, v_buf, forward_batch.out_cache_loc)
        return self._extend(q, layer, forward_batch, k_buf, v_buf)

    def _extend(self, q, layer, forward_batch, k_buf, v_buf):
        t, h, d = q.shape[0], layer.tp_q_head_num, layer.head_dim
        o = torch.empty((t, h * d), dtype=q.dtype, device=q.device)
        meta = self.forward_metadata
        self.ops.extend_attention(q.reshape(t, h, d), k_buf, v_buf, o.view(t, h, d), self.req_to_token,
                         forward_batch.req_pool_indices, meta.prefix_lens, meta.extend_lens, meta.extend_start,
                         meta.max_extend_len, layer.scaling, self.extend_config)
        return o
