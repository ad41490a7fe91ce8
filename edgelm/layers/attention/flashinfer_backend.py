"""FlashInfer attention (`--attention-backend flashinfer`; `pip install 'edgelm[flashinfer]'`).

edgelm's KV pool is token-granular; FlashInfer sees it as a paged cache of one-token pages: page
`i` of a layer is KV slot `i`, a request's page list is its `req_to_token` row, and every last
page holds one token. So `kv_indptr` is the running sum of the sequence lengths and `kv_indices`
the requests' `req_to_token` rows laid back to back, gathered on the device.

- Extend: the ragged prefill wrapper over the new tokens' own K/V when no request of the batch
  has a cached prefix (plain prompts), else the paged prefill wrapper over the pool; causal, with
  the new tokens at the end of each sequence.
- Decode: the paged decode wrapper; with 4 or more q heads per kv head its tensor-core variant
  (FlashInfer's prefill kernel with one query row per request), else its CUDA-core kernel.
- CUDA graphs: one decode wrapper per captured batch size, working in fixed indptr / indices
  buffers, re-planned before every replay from the host copy of the sequence lengths.

Every plan is built from host-side lengths (`seq_lens_cpu`), so planning never waits for the GPU.
FlashInfer compiles its kernels with nvcc on first use (or loads them from its cache); the
backend builds and runs them once at start-up, so a missing compiler or an unsupported shape
stops the server there, never in the middle of a request.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from edgelm.layers.attention import BackendUnavailableError
from edgelm.layers.attention.base import AttentionBackend

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edgelm[flashinfer]' (the flashinfer-python package)"
_FALLBACK = "use --attention-backend triton"
# FlashInfer's split-KV partial results; 128 MB is the size its documentation recommends.
WORKSPACE_BYTES = 128 << 20
# FlashInfer gives every wrapper an 8 MB int workspace of its own
INT_WORKSPACE_BYTES = 8 << 20
# q heads per kv head from which decode runs on tensor cores (FlashInfer's prefill kernel)
TENSOR_CORE_MIN_GROUP = 4


def device_workspace_bytes(num_cuda_graphs: int, cuda_graph_max_bs: int, context_len: int) -> int:
    """GPU memory the backend takes besides the KV pool: the shared float workspace, the int
    workspaces of its 3 eager wrappers and of one decode wrapper per captured batch size, and
    the graphs' page table (max_bs full rows of int32)."""
    graph_pages = 4 * cuda_graph_max_bs * (context_len + 8) if num_cuda_graphs else 0
    return WORKSPACE_BYTES + (3 + num_cuda_graphs) * INT_WORKSPACE_BYTES + graph_pages


class FlashInferStartError(BackendUnavailableError):
    """FlashInfer is installed but cannot serve this model here (dtype, shape, kernel build)."""

    def __init__(self, reason: str):
        super().__init__(f"--attention-backend flashinfer: {reason}")


def _import_flashinfer():
    import flashinfer

    return flashinfer


def _attention_scaling(model_runner, head_dim: int) -> float:
    """The softmax scale of the model's attention layers (one plan serves every layer)."""
    from edgelm.layers.attention.radix_attention import RadixAttention

    model = getattr(model_runner, "model", None)
    scalings = {m.scaling for m in model.modules() if isinstance(m, RadixAttention)} if model is not None else set()
    if len(scalings) > 1:
        raise FlashInferStartError(f"the model's layers use different softmax scales {sorted(scalings)}; "
                                   f"one FlashInfer plan serves every layer; {_FALLBACK}")
    return scalings.pop() if scalings else head_dim**-0.5


def _fused_kv_write():
    """edgelm's one-launch Triton K/V write where triton is installed, else None (torch indexing)."""
    try:
        from edgelm.layers.attention.triton_ops import store_kv
    except ImportError:
        return None
    return store_kv


class FlashInferAttnBackend(AttentionBackend):
    supports_cuda_graph = True
    replay_hook_reads_device_batch = True  # plans from req_to_token and the static batch

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        if not str(device).startswith("cuda"):
            return (f"FlashInfer runs on CUDA GPUs only, not device {device!r}; use --attention-backend "
                    "torch_native on a CPU")
        try:
            _import_flashinfer()
        except ImportError as exc:
            if (getattr(exc, "name", None) or "").split(".")[0] == "flashinfer":
                return f"the flashinfer package is not installed: {INSTALL_HINT}, or {_FALLBACK}"
            return (f"the flashinfer package does not import ({type(exc).__name__}: {exc}); reinstall it with "
                    f"{INSTALL_HINT}, or {_FALLBACK}")
        except Exception as exc:  # noqa: BLE001 - a broken install is a start-up refusal, not a crash
            return f"the flashinfer package does not import ({type(exc).__name__}: {exc}); {_FALLBACK}"
        if not torch.cuda.is_available():
            return f"torch sees no CUDA GPU; {_FALLBACK}, or torch_native"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return (f"edgelm runs FlashInfer on GPUs of compute capability 8.0 or newer, this GPU is "
                    f"{major}.{minor}; use --attention-backend torch_native")
        return None

    def __init__(self, model_runner):
        flashinfer = _import_flashinfer()
        self.flashinfer = flashinfer
        # a leaner re-plan for CUDA-graph decode wrappers (FlashInfer 0.2.x and later have it)
        self.fast_decode_plan = getattr(flashinfer, "fast_decode_plan", None)
        self.device = str(model_runner.device)
        self.req_to_token = model_runner.req_to_token_pool.req_to_token  # [rows, row_len] int32
        cfg = model_runner.model_config
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dtype = model_runner.dtype
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise FlashInferStartError(f"FlashInfer's kernels take float16 or bfloat16, not "
                                       f"{str(self.dtype).replace('torch.', '')}; use --dtype bfloat16 or half, "
                                       f"or {_FALLBACK}")
        if self.num_heads % self.num_kv_heads:
            raise FlashInferStartError(f"{self.num_heads} q heads are no multiple of {self.num_kv_heads} kv heads")
        self.sm_scale = _attention_scaling(model_runner, self.head_dim)
        self.use_tensor_cores = self.num_heads // self.num_kv_heads >= TENSOR_CORE_MIN_GROUP
        self.store_kv = _fused_kv_write()
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # backend "fa2" everywhere: FlashInfer's portable kernels (SM 8.0+), one JIT module for the
        # ragged and paged prefill and the tensor-core decode, one for CUDA-core decode
        self.ragged_wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self.paged_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self.decode_wrapper = self._new_decode_wrapper()
        self._ones_cpu = torch.ones(1, dtype=torch.int32)  # last_page_len: every page holds one token
        # per-batch state, set by the metadata hooks
        self.extend_ragged = False
        self.active_decode_wrapper = self.decode_wrapper
        # CUDA-graph state (init_cuda_graph_state)
        self.graph_kv_indptr: torch.Tensor | None = None
        self.graph_kv_indices: torch.Tensor | None = None
        self.graph_last_page_len: torch.Tensor | None = None
        self.graph_wrappers: dict = {}
        self._warm_up()

    # ---- helpers ----
    def _new_decode_wrapper(self, bs: int | None = None):
        kwargs = {}
        if bs is not None:  # a CUDA-graph wrapper: fixed batch size, buffers it never reallocates
            kwargs = dict(use_cuda_graph=True, paged_kv_indptr_buffer=self.graph_kv_indptr[: bs + 1],
                          paged_kv_indices_buffer=self.graph_kv_indices,
                          paged_kv_last_page_len_buffer=self.graph_last_page_len[:bs])
        return self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores, backend="fa2", **kwargs)

    def _last_page_len(self, bs: int) -> torch.Tensor:
        if self._ones_cpu.shape[0] < bs:
            self._ones_cpu = torch.ones(max(bs, 2 * self._ones_cpu.shape[0]), dtype=torch.int32)
        return self._ones_cpu[:bs]

    @staticmethod
    def _indptr(lengths) -> torch.Tensor:
        """[len(lengths) + 1] int32 on the host: 0, then the running sums."""
        lengths = torch.as_tensor(lengths, dtype=torch.int32)
        out = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32)
        torch.cumsum(lengths, 0, out=out[1:])
        return out

    def _gather_pages(self, req_pool_indices: torch.Tensor, kv_indptr_dev: torch.Tensor, total: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """[total] int32: the rows `req_to_token[r, :len_r]` of the batch's requests back to back.
        kv_indptr_dev [bs + 1] on the device; no host sync (total comes from the host lengths)."""
        if out is None:
            out = torch.empty(total, dtype=torch.int32, device=self.device)
        pos = torch.arange(total, dtype=torch.int32, device=self.device)
        req = torch.searchsorted(kv_indptr_dev[1:], pos, right=True)  # [total] which request each page is of
        offset = (pos - kv_indptr_dev[req]).long()
        rows = req_pool_indices.long()[req]
        torch.index_select(self.req_to_token.view(-1), 0, rows * self.req_to_token.shape[1] + offset, out=out)
        return out

    def _plan_decode(self, wrapper, forward_batch, bs: int, indptr_dev: torch.Tensor | None,
                     indices_out: torch.Tensor | None, fast: bool = False) -> None:
        """Plan `wrapper` for the first `bs` requests. With indptr_dev / indices_out (a CUDA-graph
        wrapper's own buffers) the page table is written straight into them; `fast` then skips
        FlashInfer's re-copy of those buffers and its per-plan checks (fast_decode_plan), which
        only a wrapper already planned once (at capture) may do."""
        indptr = self._indptr(forward_batch.seq_lens_cpu[:bs])
        total = int(indptr[-1])
        if indptr_dev is None:
            indptr_dev = indptr.to(self.device, non_blocking=True)
        else:
            indptr_dev.copy_(indptr, non_blocking=True)
        out = None if indices_out is None else indices_out[:total]
        indices = self._gather_pages(forward_batch.req_pool_indices[:bs], indptr_dev, total, out)
        plan = wrapper.plan
        if fast and self.fast_decode_plan is not None:
            plan = functools.partial(self.fast_decode_plan, wrapper, global_override_indptr_cpu=indptr)
        plan(indptr, indices, self._last_page_len(bs), self.num_heads, self.num_kv_heads, self.head_dim, 1,
             pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.sm_scale,
             non_blocking=True)

    def _plan_extend(self, forward_batch) -> None:
        fb = forward_batch
        qo_indptr = self._indptr(fb.extend_seq_lens_cpu)
        self.extend_ragged = not any(fb.extend_prefix_lens_cpu)
        common = dict(causal=True, sm_scale=self.sm_scale, q_data_type=self.dtype, kv_data_type=self.dtype,
                      non_blocking=True)
        if self.extend_ragged:  # attention within the new tokens only: their K/V as they are
            self.ragged_wrapper.plan(qo_indptr, qo_indptr, self.num_heads, self.num_kv_heads, self.head_dim, **common)
            return
        kv_indptr = self._indptr(fb.seq_lens_cpu[: fb.batch_size])
        total = int(kv_indptr[-1])
        indices = self._gather_pages(fb.req_pool_indices, kv_indptr.to(self.device, non_blocking=True), total)
        self.paged_wrapper.plan(qo_indptr, kv_indptr, indices, self._last_page_len(fb.batch_size), self.num_heads,
                                self.num_kv_heads, self.head_dim, 1, **common)

    def _warm_up(self) -> None:
        """Build (or load) and run every kernel this model needs once, on a one-token batch."""
        start = time.perf_counter()
        logger.info("FlashInfer: preparing kernels for %s, head_dim %d, %d/%d heads (%s decode); the first start "
                    "JIT-compiles them with nvcc", str(self.dtype).replace("torch.", ""), self.head_dim,
                    self.num_heads, self.num_kv_heads, "tensor-core" if self.use_tensor_cores else "CUDA-core")
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = torch.zeros(1, h, d, dtype=self.dtype, device=self.device)
        kv = torch.zeros(2, 1, hkv, d, dtype=self.dtype, device=self.device)  # 2 one-token pages
        pages = kv.view(2, 1, hkv, d)
        one = torch.tensor([0, 1], dtype=torch.int32)
        slot = torch.zeros(1, dtype=torch.int32, device=self.device)
        try:
            self.ragged_wrapper.plan(one, one, h, hkv, d, causal=True, sm_scale=self.sm_scale, q_data_type=self.dtype,
                                     kv_data_type=self.dtype)
            self.ragged_wrapper.run(q, kv[0], kv[1])
            self.paged_wrapper.plan(one, one, slot, self._last_page_len(1), h, hkv, d, 1, causal=True,
                                    sm_scale=self.sm_scale, q_data_type=self.dtype, kv_data_type=self.dtype)
            self.paged_wrapper.run(q, (pages, pages))
            self.decode_wrapper.plan(one, slot, self._last_page_len(1), h, hkv, d, 1, pos_encoding_mode="NONE",
                                     q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.sm_scale)
            self.decode_wrapper.run(q, (pages, pages))
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()  # a kernel that fails asynchronously fails here, not later
        except Exception as exc:  # noqa: BLE001 - any failure here must stop the start, with its text
            text = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {text[-1] if text else ''}"
            raise FlashInferStartError(
                f"FlashInfer could not build or run its attention kernels for {str(self.dtype).replace('torch.', '')}, "
                f"head_dim {d}, {h}/{hkv} heads on this GPU ({detail}); FlashInfer JIT-compiles its kernels with "
                f"the CUDA toolkit's nvcc (install it, or set CUDA_HOME); or {_FALLBACK}") from exc
        logger.info("FlashInfer: kernels ready in %.1f s", time.perf_counter() - start)

    # ---- metadata ----
    def init_forward_metadata(self, forward_batch) -> None:
        if forward_batch.forward_mode.is_decode():
            self._plan_decode(self.decode_wrapper, forward_batch, forward_batch.batch_size, None, None)
            self.active_decode_wrapper = self.decode_wrapper
            return
        self._plan_extend(forward_batch)

    # ---- CUDA graphs ----
    def init_cuda_graph_state(self, max_bs: int, max_context_len: int) -> None:
        """Buffers shared by every captured batch size (one graph runs at a time): indptr, the
        last-page lengths (all 1), and room for max_bs full rows of pages (requests may share
        prefix slots, so the pool size is no bound)."""
        self.graph_kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)
        self.graph_kv_indices = torch.zeros(max_bs * max_context_len, dtype=torch.int32, device=self.device)
        self.graph_last_page_len = torch.ones(max_bs, dtype=torch.int32, device=self.device)
        self.graph_wrappers = {}

    def init_forward_metadata_capture_cuda_graph(self, bs: int, forward_batch) -> None:
        if self.graph_kv_indptr is None:
            raise RuntimeError("init_cuda_graph_state must run before capturing")
        wrapper = self._new_decode_wrapper(bs)
        self.graph_wrappers[bs] = wrapper
        self._plan_graph(bs, forward_batch, fast=False)  # the full plan: FlashInfer resolves its kernels
        if self.device.startswith("cuda"):
            # the graph runner warms up and captures on a side stream: the plan's copies (on this
            # stream) must have landed first. Replays run on this stream, after their plan.
            torch.cuda.current_stream().synchronize()

    def init_forward_metadata_replay_cuda_graph(self, bs: int, forward_batch) -> None:
        self._plan_graph(bs, forward_batch, fast=True)

    def _plan_graph(self, bs: int, forward_batch, fast: bool) -> None:
        wrapper = self.graph_wrappers[bs]
        self._plan_decode(wrapper, forward_batch, bs, self.graph_kv_indptr[: bs + 1], self.graph_kv_indices, fast)
        self.active_decode_wrapper = wrapper

    # ---- forward ----
    def _store_kv(self, k, v, layer, forward_batch):
        pool = forward_batch.token_to_kv_pool
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        if self.store_kv is not None:
            self.store_kv(k, v, k_buf, v_buf, forward_batch.out_cache_loc)
        else:
            hkv, d = layer.tp_k_head_num, layer.head_dim
            pool.set_kv_buffer(layer.layer_id, forward_batch.out_cache_loc, k.view(-1, hkv, d), v.view(-1, hkv, d))
        # [slots, 1, Hkv, D]: one-token pages in FlashInfer's NHD layout
        return k_buf.unsqueeze(1), v_buf.unsqueeze(1)

    def forward_decode(self, q, k, v, layer, forward_batch):
        k_pages, v_pages = self._store_kv(k, v, layer, forward_batch)
        bs, h, d = q.shape[0], layer.tp_q_head_num, layer.head_dim
        o = torch.empty((bs, h, d), dtype=q.dtype, device=q.device)
        self.active_decode_wrapper.run(q.view(bs, h, d), (k_pages, v_pages), out=o)
        return o.view(bs, h * d)

    def forward_extend(self, q, k, v, layer, forward_batch):
        k_pages, v_pages = self._store_kv(k, v, layer, forward_batch)
        t, h, hkv, d = q.shape[0], layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        o = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
        q = q.view(t, h, d)  # strided views of the fused projection: FlashInfer reads row / head strides
        if self.extend_ragged:
            self.ragged_wrapper.run(q, k.view(t, hkv, d), v.view(t, hkv, d), out=o)
        else:
            self.paged_wrapper.run(q, (k_pages, v_pages), out=o)
        return o.view(t, h * d)
