"""The FlashInfer attention backend: start-up checks and the automatic choice (CPU, FlashInfer
mocked), its page tables (CPU), and on a GPU with FlashInfer installed its outputs against
torch_native and whole-model greedy decoding against the Triton backend."""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from edgelm.layers import attention as registry
from edgelm.layers.attention import (
    BackendUnavailableError,
    check_backend,
    pick_backend,
    start_attention_backend,
)
from edgelm.layers.attention import flashinfer_backend as fib
from edgelm.layers.attention.flashinfer_backend import FlashInferAttnBackend, FlashInferStartError
from edgelm.layers.attention.radix_attention import RadixAttention
from edgelm.layers.attention.torch_native_backend import TorchNativeAttnBackend
from edgelm.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from edgelm.model_executor.forward_batch import ForwardBatch


def _flashinfer_importable() -> bool:
    try:
        import flashinfer  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


needs_flashinfer = pytest.mark.skipif(not _flashinfer_importable(), reason="flashinfer is not installed")


# ---------------------------------------------------------------- start-up checks (CPU)
def test_missing_package_is_refused_with_install_hint_and_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer -> ModuleNotFoundError
    with pytest.raises(BackendUnavailableError) as err:
        check_backend("flashinfer", "cuda")
    msg = str(err.value)
    assert "pip install 'edgelm[flashinfer]'" in msg and "flashinfer-python" in msg
    assert "--attention-backend triton" in msg


def test_broken_install_is_refused(monkeypatch):
    def broken():
        raise ImportError("libcudart.so.13: cannot open shared object file", name="tvm_ffi_lib")

    monkeypatch.setattr(fib, "_import_flashinfer", broken)
    msg = FlashInferAttnBackend.unavailable_reason("cuda")
    assert "does not import" in msg and "libcudart" in msg and "triton" in msg


def test_cpu_is_refused():
    with pytest.raises(BackendUnavailableError, match="CUDA GPUs only.*torch_native"):
        check_backend("flashinfer", "cpu")


def test_model_runner_stops_before_loading(monkeypatch, tmp_path):
    """--attention-backend flashinfer where it cannot run stops the runner at once (no weights read)."""
    from transformers import LlamaConfig

    from edgelm.model_config import ModelConfig
    from edgelm.model_executor import model_runner as mr
    from edgelm.model_loader.resolve import resolve_model
    from edgelm.server_args import ServerArgs

    LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(str(tmp_path))
    monkeypatch.setattr(mr, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    args = ServerArgs(model_path=str(tmp_path), device="cpu", attention_backend="flashinfer", load_format="dummy")
    config = ModelConfig.load(resolve_model(str(tmp_path)), args.dtype, "cpu", 512)
    with pytest.raises(BackendUnavailableError, match="flashinfer"):
        mr.ModelRunner(args, config, "cpu")


def _available(monkeypatch, **reasons):
    """Make each named backend's start-up check answer `reason` (None: it runs)."""
    for name, reason in reasons.items():
        cls = registry._backend_class(name)
        monkeypatch.setattr(cls, "unavailable_reason", classmethod(lambda c, device, r=reason: r))


def test_auto_picks_triton_on_cuda_when_it_runs(monkeypatch, caplog):
    """triton first on CUDA (faster decode measured, no kernel build at start-up), even with FlashInfer."""
    _available(monkeypatch, flashinfer=None, triton=None)
    with caplog.at_level(logging.INFO, logger="edgelm.layers.attention"):
        assert pick_backend(None, "cuda") == "triton"
    assert "attention backend: triton (the first that runs on cuda" in caplog.text


def test_auto_takes_flashinfer_where_triton_cannot_run(monkeypatch, caplog):
    _available(monkeypatch, flashinfer=None, triton="the triton package is not installed")
    with caplog.at_level(logging.INFO, logger="edgelm.layers.attention"):
        assert pick_backend(None, "cuda") == "flashinfer"
    assert "attention backend: flashinfer" in caplog.text and "not triton: the triton package is not installed" \
        in caplog.text


def test_auto_without_triton_or_flashinfer_is_torch_native(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    _available(monkeypatch, triton="the triton package is not installed")
    assert pick_backend(None, "cuda") == "torch_native"


def test_auto_on_cpu_is_torch_native(monkeypatch):
    _available(monkeypatch, flashinfer=None, triton=None)  # even if they claimed to run: not on a CPU
    assert pick_backend(None, "cpu") == "torch_native"


def test_explicit_choice_is_checked():
    assert pick_backend("torch_native", "cpu") == "torch_native"
    with pytest.raises(BackendUnavailableError, match="triton"):
        pick_backend("triton", "cpu")


# ---------------------------------------------------------------- a fake FlashInfer (CPU)
class _FakeWrapper:
    """Records plans; run() writes zeros. `fail` makes plan raise (a kernel build failing)."""

    fail: str | None = None

    calls: list = []  # (class name, method, args, kwargs) of every call, for the signature check

    def __init__(self, workspace, layout, use_cuda_graph=False, use_tensor_cores=False, backend="auto", **buffers):
        assert layout == "NHD" and backend == "fa2"
        self.use_cuda_graph, self.use_tensor_cores, self.buffers, self.plans = use_cuda_graph, use_tensor_cores, buffers, []
        kwargs = dict(use_cuda_graph=use_cuda_graph, backend=backend, **buffers)
        if "Decode" in type(self).__name__:
            kwargs["use_tensor_cores"] = use_tensor_cores
        self.calls.append((type(self).__name__, "__init__", (workspace, layout), kwargs))

    def plan(self, *args, **kwargs):
        if _FakeWrapper.fail:
            raise RuntimeError(_FakeWrapper.fail)
        self.plans.append((args, kwargs))
        self.calls.append((type(self).__name__, "plan", args, kwargs))

    def run(self, q, *kv, out=None):
        self.calls.append((type(self).__name__, "run", (q, *kv), {"out": out}))
        out = torch.empty_like(q) if out is None else out
        return out.zero_()


def _fast_decode_plan(wrapper, *args, **kwargs):
    _FakeWrapper.calls.append(("<module>", "fast_decode_plan", (wrapper, *args), kwargs))
    wrapper.plans.append((args, kwargs))


def _fill_fake(mod):
    for name in ("BatchPrefillWithRaggedKVCacheWrapper", "BatchPrefillWithPagedKVCacheWrapper",
                 "BatchDecodeWithPagedKVCacheWrapper"):
        setattr(mod, name, type(name, (_FakeWrapper,), {}))
    mod.fast_decode_plan = _fast_decode_plan


@pytest.fixture
def fake_flashinfer(monkeypatch):
    mod = types.ModuleType("flashinfer")
    _fill_fake(mod)
    monkeypatch.setitem(sys.modules, "flashinfer", mod)
    monkeypatch.setattr(_FakeWrapper, "fail", None)
    monkeypatch.setattr(_FakeWrapper, "calls", [])
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 1024)
    return mod


def _fake_runner(num_heads=8, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, device="cpu", rows=8, row_len=64):
    cfg = SimpleNamespace(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    return SimpleNamespace(device=device, dtype=dtype, model_config=cfg,
                           req_to_token_pool=ReqToTokenPool(rows, row_len, "cpu"),
                           token_to_kv_pool=MHATokenToKVPool(200, dtype, num_kv_heads, head_dim, 1, "cpu"))


def test_kernel_build_failure_stops_the_start(fake_flashinfer, monkeypatch):
    monkeypatch.setattr(_FakeWrapper, "fail", "nvcc not found\nninja: build stopped: subcommand failed.")
    with pytest.raises(FlashInferStartError) as err:
        FlashInferAttnBackend(_fake_runner())
    msg = str(err.value)
    assert msg.startswith("--attention-backend flashinfer:") and "ninja: build stopped" in msg
    assert "--attention-backend triton" in msg


def test_float32_is_refused(fake_flashinfer):
    with pytest.raises(FlashInferStartError, match="float16 or bfloat16"):
        FlashInferAttnBackend(_fake_runner(dtype=torch.float32))


def test_auto_start_falls_back_when_flashinfer_fails(fake_flashinfer, monkeypatch, caplog):
    """Chosen automatically, a FlashInfer that cannot build its kernels gives way to the next
    backend that runs (on this CPU-only box: torch_native); asked for by name, it stops the start."""
    monkeypatch.setattr(_FakeWrapper, "fail", "nvcc fatal: Unsupported gpu architecture")
    runner = _fake_runner()
    # the CUDA order of preference, on this CPU (where triton's own check then refuses)
    monkeypatch.setattr(registry, "backend_candidates", lambda device: ("flashinfer", "triton", "torch_native"))
    with caplog.at_level(logging.WARNING, logger="edgelm.layers.attention"):
        name, backend = start_attention_backend("flashinfer", runner, auto=True)
    assert name == "torch_native" and isinstance(backend, TorchNativeAttnBackend)
    assert "flashinfer did not start" in caplog.text and "Unsupported gpu architecture" in caplog.text
    with pytest.raises(FlashInferStartError, match="Unsupported gpu architecture"):
        start_attention_backend("flashinfer", runner, auto=False)


def test_decode_wrapper_kind_follows_group_size(fake_flashinfer):
    assert FlashInferAttnBackend(_fake_runner(8, 2)).decode_wrapper.use_tensor_cores  # group 4
    assert not FlashInferAttnBackend(_fake_runner(4, 2)).decode_wrapper.use_tensor_cores  # group 2


def _layout(runner, rows: dict[int, list[int]]):
    """Write req_to_token rows: {req: [kv slots]}."""
    for req, slots in rows.items():
        runner.req_to_token_pool.write(req, 0, torch.tensor(slots))


def test_page_tables_from_req_to_token(fake_flashinfer):
    runner = _fake_runner()
    backend = FlashInferAttnBackend(runner)
    _layout(runner, {5: [11, 12, 13, 14], 0: [3], 2: [40, 41, 42, 43, 44, 45, 46]})
    # decode: lengths 4, 1, 7 (the new token's slot is the last of each row)
    fb = ForwardBatch.for_decode([0, 0, 0], [5, 0, 2], [4, 1, 7], torch.tensor([14, 3, 46]), "cpu")
    backend.init_forward_metadata(fb)
    args, kwargs = backend.decode_wrapper.plans[-1]
    indptr, indices, last_page_len = args[:3]
    assert indptr.device.type == "cpu" and indptr.tolist() == [0, 4, 5, 12]
    assert indices.dtype == torch.int32 and indices.tolist() == [11, 12, 13, 14, 3, 40, 41, 42, 43, 44, 45, 46]
    assert last_page_len.tolist() == [1, 1, 1] and args[3:] == (8, 2, 16, 1)
    assert kwargs["sm_scale"] == 16**-0.5 and kwargs["q_data_type"] == torch.bfloat16
    assert backend.active_decode_wrapper is backend.decode_wrapper

    # extend without prefixes: ragged over the new tokens
    fb = ForwardBatch.for_extend([0] * 5, [5, 0], [0, 0], [4, 1], torch.tensor([11, 12, 13, 14, 3]), "cpu")
    backend.init_forward_metadata(fb)
    assert backend.extend_ragged
    args, kwargs = backend.ragged_wrapper.plans[-1]
    assert args[0].tolist() == args[1].tolist() == [0, 4, 5] and kwargs["causal"] is True

    # extend after a cached prefix: paged over prefix + new tokens
    fb = ForwardBatch.for_extend([0] * 5, [2, 0], [3, 0], [4, 1], torch.tensor([43, 44, 45, 46, 3]), "cpu")
    backend.init_forward_metadata(fb)
    assert not backend.extend_ragged
    args, kwargs = backend.paged_wrapper.plans[-1]
    assert args[0].tolist() == [0, 4, 5] and args[1].tolist() == [0, 7, 8]
    assert args[2].tolist() == [40, 41, 42, 43, 44, 45, 46, 3] and kwargs["causal"] is True


def test_graph_wrappers_share_fixed_buffers(fake_flashinfer):
    runner = _fake_runner()
    backend = FlashInferAttnBackend(runner)
    backend.init_cuda_graph_state(max_bs=4, max_context_len=64)
    _layout(runner, {3: [7, 8, 9], 1: [20, 21]})
    pad = ForwardBatch.for_decode([0] * 4, [0] * 4, [1] * 4, torch.zeros(4, dtype=torch.int64), "cpu")
    backend.init_forward_metadata_capture_cuda_graph(4, pad)
    wrapper = backend.graph_wrappers[4]
    assert wrapper.use_cuda_graph and wrapper.buffers["paged_kv_indices_buffer"] is backend.graph_kv_indices
    assert wrapper.buffers["paged_kv_indptr_buffer"].shape == (5,)
    # replay: 2 real requests padded to 4 (req 0, seq_len 1)
    fb = ForwardBatch.for_decode([0] * 4, [3, 1, 0, 0], [3, 2, 1, 1], torch.tensor([9, 21, 0, 0]), "cpu")
    backend.init_forward_metadata_replay_cuda_graph(4, fb)
    args, kwargs = wrapper.plans[-1]
    assert [c[1] for c in _FakeWrapper.calls[-2:]] == ["plan", "fast_decode_plan"]  # capture: full; replay: fast
    assert kwargs["global_override_indptr_cpu"] is args[0]
    assert args[0].tolist() == [0, 3, 5, 6, 7]
    assert backend.graph_kv_indptr.tolist() == [0, 3, 5, 6, 7]
    # the page list was gathered straight into the fixed buffer the captured kernels read
    assert args[1].data_ptr() == backend.graph_kv_indices.data_ptr()
    assert backend.graph_kv_indices[:7].tolist() == [7, 8, 9, 20, 21, 0, 0]
    assert backend.active_decode_wrapper is wrapper


@needs_flashinfer
def test_calls_bind_to_the_installed_flashinfer(monkeypatch):
    """Every constructor, plan and run call the backend makes (start-up, decode, both extends,
    CUDA-graph wrappers) binds to the installed FlashInfer's signatures (no GPU needed)."""
    import inspect

    real = pytest.importorskip("flashinfer")
    fake = types.ModuleType("flashinfer")
    _fill_fake(fake)
    monkeypatch.setattr(fib, "_import_flashinfer", lambda: fake)
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 1024)
    monkeypatch.setattr(_FakeWrapper, "calls", [])
    runner = _fake_runner()
    backend = FlashInferAttnBackend(runner)
    _layout(runner, {1: [5, 6, 7]})
    backend.init_forward_metadata(ForwardBatch.for_decode([0], [1], [3], torch.tensor([7]), "cpu"))
    backend.init_forward_metadata(ForwardBatch.for_extend([0] * 2, [1], [1], [2], torch.tensor([6, 7]), "cpu"))
    backend.init_cuda_graph_state(2, 64)
    pad = ForwardBatch.for_decode([0] * 2, [1, 0], [3, 1], torch.tensor([7, 0]), "cpu")
    backend.init_forward_metadata_capture_cuda_graph(2, pad)
    backend.init_forward_metadata_replay_cuda_graph(2, pad)
    seen = set()
    for cls_name, method, args, kwargs in _FakeWrapper.calls:
        seen.add((cls_name, method))
        if cls_name == "<module>":  # a module-level function that takes the wrapper first
            inspect.signature(getattr(real, method)).bind(*args, **kwargs)
            continue
        cls = getattr(real, cls_name)
        inspect.signature(getattr(cls, method)).bind(None, *args, **kwargs)  # raises TypeError on a mismatch
        if method == "plan" and hasattr(cls, "_plan_impl"):  # decode's plan forwards **kwargs to it
            inspect.signature(cls._plan_impl).bind(None, *args, **kwargs)
    assert len(seen) == 10  # 3 wrappers x (__init__, plan, run), fast_decode_plan (graph replay)


def test_reserved_bytes():
    assert fib.device_workspace_bytes(0, 0, 8192) == fib.WORKSPACE_BYTES + 3 * fib.INT_WORKSPACE_BYTES
    with_graphs = fib.device_workspace_bytes(7, 32, 8192)
    assert with_graphs == fib.WORKSPACE_BYTES + 10 * fib.INT_WORKSPACE_BYTES + 4 * 32 * 8200


# ---------------------------------------------------------------- GPU: against torch_native
TOL = {torch.bfloat16: 4e-2, torch.float16: 2e-2}


class Setup:
    """A shared req_to_token, two identical KV pools, torch_native and flashinfer backends."""

    def __init__(self, num_heads, num_kv_heads, head_dim, dtype, pool_size, max_ctx, num_reqs=16, seed=0):
        torch.manual_seed(seed)
        self.dtype = dtype
        self.layer = RadixAttention(num_heads, head_dim, head_dim**-0.5, num_kv_heads, layer_id=0)
        self.req_pool = ReqToTokenPool(num_reqs, max_ctx, "cuda")
        self.ref_pool = MHATokenToKVPool(pool_size, dtype, num_kv_heads, head_dim, 1, "cuda")
        self.fi_pool = MHATokenToKVPool(pool_size, dtype, num_kv_heads, head_dim, 1, "cuda")
        for ref, fi in zip(self.ref_pool.k_buffer + self.ref_pool.v_buffer, self.fi_pool.k_buffer + self.fi_pool.v_buffer):
            ref.copy_(torch.randn(ref.shape, device="cuda").to(dtype))
            fi.copy_(ref)
        cfg = SimpleNamespace(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        runner = SimpleNamespace(device="cuda", dtype=dtype, model_config=cfg, req_to_token_pool=self.req_pool,
                                 token_to_kv_pool=self.ref_pool)
        self.ref = TorchNativeAttnBackend(runner)
        self.fi = FlashInferAttnBackend(runner)
        self.free = (torch.randperm(pool_size) + 1).tolist()  # scattered slots

    def place(self, req, start, n):
        slots = torch.tensor([self.free.pop() for _ in range(n)], dtype=torch.int64)
        self.req_pool.write(req, start, slots.to("cuda"))
        return slots

    def qkv(self, num_tokens):
        h, hkv, d = self.layer.tp_q_head_num, self.layer.tp_k_head_num, self.layer.head_dim
        qkv = torch.randn(num_tokens, (h + 2 * hkv) * d, device="cuda").to(self.dtype)
        return qkv.split([h * d, hkv * d, hkv * d], dim=-1)  # strided column slices, like the models'

    def run(self, backend, pool, fb, q, k, v):
        fb.token_to_kv_pool, fb.req_to_token_pool = pool, self.req_pool
        backend.init_forward_metadata(fb)
        return backend.forward(q, k, v, self.layer, fb)

    def compare(self, fb, q, k, v):
        out_ref = self.run(self.ref, self.ref_pool, fb, q, k, v)
        out_fi = self.run(self.fi, self.fi_pool, fb, q, k, v)
        assert out_fi.dtype == q.dtype and out_fi.shape == q.shape
        assert torch.isfinite(out_fi).all()
        err = (out_fi.float() - out_ref.float()).norm() / out_ref.float().norm()
        assert err < TOL[self.dtype], f"relative error {err:.2e}"
        assert torch.equal(self.fi_pool.k_buffer[0], self.ref_pool.k_buffer[0])
        assert torch.equal(self.fi_pool.v_buffer[0], self.ref_pool.v_buffer[0])
        return err


def decode_batch(s, req_ids, seq_lens):
    new_slots = [s.place(r, 0, n)[-1:] for r, n in zip(req_ids, seq_lens)]
    return ForwardBatch.for_decode([0] * len(req_ids), req_ids, seq_lens, torch.cat(new_slots), "cuda")


def extend_batch(s, req_ids, prefix_lens, extend_lens):
    new_slots = [s.place(r, 0, p + e)[p:] for r, p, e in zip(req_ids, prefix_lens, extend_lens)]
    return ForwardBatch.for_extend([0] * sum(extend_lens), req_ids, prefix_lens, extend_lens, torch.cat(new_slots),
                                   "cuda")


# (q heads, kv heads, head_dim): Llama-3.1-8B (tensor-core decode), group 2 and MHA (CUDA-core decode)
SHAPES = [(32, 8, 128), (4, 2, 128), (16, 16, 128)]


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_matches_torch_native(shape):
    h, hkv, d = shape
    s = Setup(h, hkv, d, torch.bfloat16, pool_size=40_000, max_ctx=4200)
    seq_lens = [1, 2, 63, 64, 65, 500, 1024, 4096, 3000, 7, 129, 2049]
    fb = decode_batch(s, list(range(len(seq_lens))), seq_lens)
    s.compare(fb, *s.qkv(len(seq_lens)))


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_prefix", [False, True])
def test_extend_matches_torch_native(shape, with_prefix):
    h, hkv, d = shape
    s = Setup(h, hkv, d, torch.bfloat16, pool_size=20_000, max_ctx=2200)
    prefix_lens = [0, 13, 400, 7, 1000] if with_prefix else [0] * 5
    extend_lens = [5, 200, 33, 1, 640]
    fb = extend_batch(s, [1, 4, 0, 6, 9], prefix_lens, extend_lens)
    s.compare(fb, *s.qkv(sum(extend_lens)))
    assert s.fi.extend_ragged == (not with_prefix)


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_graph_hooks_with_padded_rows(shape):
    """Decode through a CUDA-graph wrapper (fixed buffers, padded rows: req 0, seq_len 1, slot 0),
    captured in a real graph and replayed on new lengths, against torch_native on the real rows."""
    h, hkv, d = shape
    s = Setup(h, hkv, d, torch.bfloat16, pool_size=20_000, max_ctx=2100)
    s.fi.init_cuda_graph_state(max_bs=4, max_context_len=2100)
    pad = ForwardBatch.for_decode([0] * 4, [0] * 4, [1] * 4, torch.zeros(4, dtype=torch.int64), "cuda")
    pad.token_to_kv_pool, pad.req_to_token_pool = s.fi_pool, s.req_pool
    q_buf, k_buf, v_buf = (t.clone() for t in s.qkv(4))
    s.fi.init_forward_metadata_capture_cuda_graph(4, pad)
    s.fi.forward_decode(q_buf, k_buf, v_buf, s.layer, pad)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_graph = s.fi.forward_decode(q_buf, k_buf, v_buf, s.layer, pad)
    for lens in ([50, 9], [2000, 1, 700]):
        n = len(lens)
        real = decode_batch(s, [3, 1, 5][:n], lens)
        q, k, v = s.qkv(n)
        fb = ForwardBatch.for_decode([0] * 4, [3, 1, 5][:n] + [0] * (4 - n), lens + [1] * (4 - n),
                                     torch.cat([real.out_cache_loc, torch.zeros(4 - n, dtype=torch.int64, device="cuda")]),
                                     "cuda")
        pad.out_cache_loc.copy_(fb.out_cache_loc)
        pad.req_pool_indices.copy_(fb.req_pool_indices)
        pad.seq_lens.copy_(fb.seq_lens)
        for buf, t in ((q_buf, q), (k_buf, k), (v_buf, v)):
            buf[:n].copy_(t)
        s.fi.init_forward_metadata_replay_cuda_graph(4, fb)
        graph.replay()
        out_ref = s.run(s.ref, s.ref_pool, real, q, k, v)
        err = (out_graph[:n].float() - out_ref.float()).norm() / out_ref.float().norm()
        assert err < TOL[torch.bfloat16], f"relative error {err:.2e} at lengths {lens}"


# ---------------------------------------------------------------- GPU: whole model against Triton
@pytest.fixture(scope="module", params=[(512, 4, 2), (1024, 8, 2)], ids=["group2", "group4"])
def tiny_llama(request, tmp_path_factory):
    """Random 2-layer Llama checkpoints with head_dim 128: CUDA-core (group 2) and tensor-core (group 4) decode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, heads, kv_heads = request.param
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      initializer_range=0.1, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_llama_fi")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path))
    return str(path)


def _runner(model_path, backend, **overrides):
    from edgelm.model_config import ModelConfig
    from edgelm.model_executor.model_runner import ModelRunner
    from edgelm.model_loader.resolve import resolve_model
    from edgelm.server_args import ServerArgs

    args = ServerArgs(model_path=model_path, device="cuda", dtype="bfloat16", attention_backend=backend,
                      context_length=400, max_total_tokens=8192, max_running_requests=16, cuda_graph_max_bs=8,
                      **overrides)
    config = ModelConfig.load(resolve_model(model_path), args.dtype, "cuda", args.context_length)
    return ModelRunner(args, config, "cuda")


def _greedy(runner, prompts, steps, forced=None, device="cuda"):
    """Prefill `prompts` in two chunks (the second attends to the first's KV: FlashInfer's paged
    path; the first is its ragged path), then `steps` batched decode passes. Greedy tokens, and
    the logits of the second chunk's last tokens and of every decode pass. With `forced` (another
    run's tokens) decode feeds those, so that both runs see the same inputs at every step."""
    runner.req_to_token_pool.clear()
    runner.allocator.clear()
    n, lens = len(prompts), [len(p) for p in prompts]
    req_slots = [runner.req_to_token_pool.alloc() for _ in prompts]
    kv = [runner.allocator.alloc(len(p)) for p in prompts]
    for slot, slots in zip(req_slots, kv):
        runner.req_to_token_pool.write(slot, 0, slots)
    half = [len(p) // 2 for p in prompts]
    chunks = ([0] * n, half), (half, [L - h for L, h in zip(lens, half)])
    for prefix, extend in chunks:
        ids = [t for p, a, e in zip(prompts, prefix, extend) for t in p[a:a + e]]
        loc = torch.cat([s[a:a + e] for s, a, e in zip(kv, prefix, extend)])
        logits = runner.forward(ForwardBatch.for_extend(ids, req_slots, prefix, extend, loc, device))
    all_logits = [logits.clone()]
    tokens = [[t] for t in logits.argmax(-1).tolist()]
    for step in range(steps):
        loc = runner.allocator.alloc(n)
        for i, slot in enumerate(req_slots):
            runner.req_to_token_pool.write(slot, lens[i], loc[i:i + 1])
            lens[i] += 1
        inputs = [t[step] for t in (forced or tokens)]
        logits = runner.forward(ForwardBatch.for_decode(inputs, req_slots, lens, loc, device))
        all_logits.append(logits.clone())
        for t, nxt in zip(tokens, logits.argmax(-1).tolist()):
            t.append(nxt)
    return tokens, all_logits


def _check_same_greedy(tokens_a, logits_a, tokens_b, logits_b) -> tuple[int, int]:
    """Logits of two backends on the same inputs (b fed a's tokens) are close, and their greedy
    choices are the same except at near ties: rows where b's top-2 margin is under a tenth of the
    row's standard deviation (random tiny models have many), at most 1 in 8 rows. (flips, rows)."""
    flips = rows = 0
    for la, lb in zip(logits_a, logits_b):
        la, lb = la.float(), lb.float()
        rel = (la - lb).norm() / lb.norm()
        assert rel < 4e-2, f"logits differ by {rel:.2e} (relative)"
        top2 = lb.topk(2, dim=-1).values
        near_tie = top2[:, 0] - top2[:, 1] < 0.1 * lb.std(dim=-1)
        differ = la.argmax(-1) != lb.argmax(-1)
        assert not (differ & ~near_tie).any(), "greedy choices differ where the margin is clear"
        flips += int(differ.sum())
        rows += la.shape[0]
    assert flips <= max(1, rows // 8), f"{flips} near-tie flips in {rows} rows"
    if flips == 0:
        assert tokens_a == tokens_b
    return flips, rows


def _record(**fields):
    """Append a line of figures to $EDGELM_TEST_STATS (the device script collects them)."""
    path = os.environ.get("EDGELM_TEST_STATS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graphs", "eager"])
def test_model_greedy_matches_triton(tiny_llama, cuda_graph):
    """Prefill + batched greedy decode with flashinfer, then triton on the same weights and pools
    fed flashinfer's tokens: same greedy tokens (near ties aside), close logits."""
    runner = _runner(tiny_llama, "flashinfer", disable_cuda_graph=not cuda_graph)
    assert runner.attention_backend_name == "flashinfer"
    assert (runner.cuda_graph_runner is not None) == cuda_graph
    gen = torch.Generator().manual_seed(1)
    cases = []
    # 3 requests (a padded graph of 4), 1, and 9 (above the largest graph: eager), prompts up to 300 tokens
    for n, steps in ((3, 16), (1, 8), (9, 4)):
        prompts = [torch.randint(0, 512, (int(L),), generator=gen).tolist()
                   for L in torch.randint(3, 300, (n,), generator=gen)]
        cases.append((prompts, steps))
    flash = [_greedy(runner, prompts, steps) for prompts, steps in cases]
    runner.set_attention_backend("triton")
    assert runner.attention_backend_name == "triton" and (runner.cuda_graph_runner is not None) == cuda_graph
    flips = rows = equal = tokens = 0
    for (prompts, steps), (tokens_fi, logits_fi) in zip(cases, flash):
        tokens_tri, logits_tri = _greedy(runner, prompts, steps, forced=tokens_fi)
        f, r = _check_same_greedy(tokens_fi, logits_fi, tokens_tri, logits_tri)
        flips, rows = flips + f, rows + r
        equal += sum(a == b for ta, tb in zip(tokens_fi, tokens_tri) for a, b in zip(ta, tb))
        tokens += sum(len(t) for t in tokens_fi)
    with open(os.path.join(tiny_llama, "config.json")) as f:
        hf = json.load(f)
    _record(test="model_greedy_flashinfer_vs_triton", cuda_graph=cuda_graph,
            model=f"tiny llama {hf['num_attention_heads']}/{hf['num_key_value_heads']} heads, head_dim 128",
            greedy_tokens_equal=equal, greedy_tokens=tokens, near_tie_flips=flips, logit_rows=rows)
