"""Decode from CUDA graphs gives the same tokens and logits as eager decode."""

import pytest
import torch

from edgelm.layers import attention as attention_registry
from edgelm.layers.attention.torch_native_backend import TorchNativeAttnBackend
from edgelm.model_config import ModelConfig
from edgelm.model_executor.cuda_graph_runner import capture_batch_sizes
from edgelm.model_executor.forward_batch import ForwardBatch
from edgelm.model_executor.model_runner import ModelRunner
from edgelm.model_loader.resolve import resolve_model
from edgelm.server_args import ServerArgs


class GraphTorchBackend(TorchNativeAttnBackend):
    """torch_native decode over a fixed `[max_bs, max_context_len]` slot table, so that it can be
    captured: tests the graph runner whatever Triton backend is (or is not) there."""

    supports_cuda_graph = True
    replay_hook_reads_device_batch = True

    def init_cuda_graph_state(self, max_bs, max_context_len):
        self.graph_kv_slots = torch.zeros(max_bs, max_context_len, dtype=torch.int64, device=self.device)
        self.graph_mask = torch.zeros(max_bs, 1, 1, 1, max_context_len, dtype=torch.bool, device=self.device)

    def _fill_graph_metadata(self, bs, forward_batch):
        length = self.graph_kv_slots.shape[1]
        rows = self.req_to_token[forward_batch.req_pool_indices[:bs], :length].long()
        valid = torch.arange(length, device=self.device)[None, :] < forward_batch.seq_lens[:bs, None]
        self.graph_kv_slots[:bs].copy_(torch.where(valid, rows, torch.zeros_like(rows)))
        self.graph_mask[:bs].copy_(valid[:, None, None, None, :])
        self.decode_kv_slots, self.decode_mask = self.graph_kv_slots[:bs], self.graph_mask[:bs]

    init_forward_metadata_capture_cuda_graph = _fill_graph_metadata
    init_forward_metadata_replay_cuda_graph = _fill_graph_metadata


def _paired_greedy(plain, plain_ops, other, other_ops, seed, max_len, steps):
    """For 1 and then 3 random prompts: greedy decode with `plain` (its Triton ops switched on), then
    `other` fed plain's tokens; yields (n, tokens_p, logits_p, tokens_o, logits_o)."""
    from edgelm.layers import triton_ops

    gen = torch.Generator().manual_seed(seed)
    for n in (1, 3):
        prompts = [torch.randint(0, 512, (int(L),), generator=gen).tolist()
                   for L in torch.randint(3, max_len, (n,), generator=gen)]
        triton_ops.set_enabled(plain_ops)
        tokens_p, logits_p = _greedy(plain, prompts, steps)
        triton_ops.set_enabled(other_ops)
        tokens_o, logits_o = _greedy(other, prompts, steps, forced=tokens_p)
        yield n, tokens_p, logits_p, tokens_o, logits_o


def _assert_decode_close(n, tokens_p, logits_p, tokens_f, logits_f):
    """Two runs' decode logits within bf16 rounding of each other, their greedy tokens 90 % the same."""
    for lf, lp in zip(logits_f, logits_p):
        torch.testing.assert_close(lf, lp, rtol=3e-2, atol=3e-2)
    agree = sum(a == b for tf, tp in zip(tokens_f, tokens_p) for a, b in zip(tf, tp))
    assert agree >= 0.9 * n * len(tokens_p[0]), (tokens_f, tokens_p)


def test_capture_batch_sizes():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(6) == [1, 2, 4, 6]
    assert capture_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_batch_sizes(36) == [1, 2, 4, 8, 16, 24, 32, 36]


def test_recapture_batch_sizes_are_the_pdl_ones(monkeypatch):
    """The graphs captured a second time are those of the batch sizes whose kernels launch with PDL."""
    from edgelm.layers.triton_ops import pdl
    from edgelm.model_executor.cuda_graph_runner import CudaGraphRunner

    runner = object.__new__(CudaGraphRunner)  # no capture: only the choice is checked
    runner.capture_bs, runner.device = capture_batch_sizes(16), "cuda"
    monkeypatch.setattr(pdl, "mode", lambda device, rows, small=True: 2 if rows == 1 else 0)
    assert runner.recapture_bs() == [1]
    monkeypatch.setattr(pdl, "mode", lambda device, rows, small=True: 0)
    assert runner.recapture_bs() == []


def _graph_backends():
    out = [pytest.param("torch_graph_test")]
    try:
        cls = attention_registry._backend_class("triton")
    except Exception:
        return out
    if getattr(cls, "supports_cuda_graph", False):
        out.append(pytest.param("triton"))
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.1, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_llama")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path))
    return str(path)


def _runner(model_path, backend, dtype, **overrides):
    args = ServerArgs(model_path=model_path, device="cuda", dtype=dtype, attention_backend=backend,
                      context_length=96, max_total_tokens=2048, max_running_requests=16, cuda_graph_max_bs=8,
                      **overrides)
    config = ModelConfig.load(resolve_model(model_path), args.dtype, "cuda", args.context_length)
    return ModelRunner(args, config, "cuda")


def _greedy(runner, prompts, steps, forced=None):
    """Prefill `prompts` together, then `steps` batched decode passes; greedy tokens and the
    decode logits of every step. With `forced` (tokens of another run), decode feeds those
    instead of its own choices, so that two runs see the same inputs at every step."""
    runner.req_to_token_pool.clear()
    runner.allocator.clear()
    n, lens = len(prompts), [len(p) for p in prompts]
    req_slots = [runner.req_to_token_pool.alloc() for _ in prompts]
    kv = runner.allocator.alloc(sum(lens))
    off = 0
    for slot, p in zip(req_slots, prompts):
        runner.req_to_token_pool.write(slot, 0, kv[off:off + len(p)])
        off += len(p)
    batch = ForwardBatch.for_extend([t for p in prompts for t in p], req_slots, [0] * n, lens, kv, "cuda")
    tokens = [[t] for t in runner.forward(batch).argmax(-1).tolist()]
    all_logits = []
    for _ in range(steps):
        loc = runner.allocator.alloc(n)
        for i, slot in enumerate(req_slots):
            runner.req_to_token_pool.write(slot, lens[i], loc[i:i + 1])
            lens[i] += 1
        step = len(tokens[0]) - 1
        inputs = [t[step] for t in (forced or tokens)]
        batch = ForwardBatch.for_decode(inputs, req_slots, lens, loc, "cuda")
        logits = runner.forward(batch)
        all_logits.append(logits.clone())
        for t, nxt in zip(tokens, logits.argmax(-1).tolist()):
            t.append(nxt)
    return tokens, all_logits


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _graph_backends())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_matches_eager(tiny_llama, backend, dtype, monkeypatch):
    monkeypatch.setitem(attention_registry._BACKENDS, "torch_graph_test", (__name__, "GraphTorchBackend"))
    graphed = _runner(tiny_llama, backend, dtype)
    eager = _runner(tiny_llama, backend, dtype, disable_cuda_graph=True)
    assert eager.cuda_graph_runner is None
    g = graphed.cuda_graph_runner
    assert g is not None and g.capture_bs == [1, 2, 4, 8] and g.memory_bytes >= 0
    assert "CUDA graphs bs 1..8" in graphed.summary()
    replays = []
    real_replay = g.replay
    monkeypatch.setattr(g, "replay", lambda fb: replays.append(fb.batch_size) or real_replay(fb))

    gen = torch.Generator().manual_seed(1)
    # 3 requests (padded to 4), 1 request, and 9 (above the largest graph: eager fallback)
    for n, steps in ((3, 12), (1, 6), (9, 3)):
        prompts = [torch.randint(0, 512, (int(L),), generator=gen).tolist()
                   for L in torch.randint(3, 20, (n,), generator=gen)]
        tokens_e, logits_e = _greedy(eager, prompts, steps)
        replays.clear()
        tokens_g, logits_g = _greedy(graphed, prompts, steps, forced=tokens_e)
        assert replays == ([n] * steps if n <= 8 else [])
        tol = 1e-4 if dtype == "float32" else 3e-2
        for lg, le in zip(logits_g, logits_e):
            assert lg.shape == le.shape == (n, 512)
            torch.testing.assert_close(lg, le, rtol=tol, atol=tol)
        if dtype == "float32":  # bf16 may flip a near tie between two kernels' roundings
            assert tokens_g == tokens_e


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_fused_decode_layers_match_unfused(tiny_llama, graphs, monkeypatch):
    """The fused decoder layer (norms, SiLU·mul and residual adds inside the GEMVs) against the
    layer-by-layer kernels, on the tiny model with its GEMV shapes entered as Triton wins."""
    from edgelm.layers import triton_ops
    from edgelm.layers.triton_ops import gemv

    pytest.importorskip("triton")
    cap = torch.cuda.get_device_capability()
    wins = ((1, "reduce_n8_k1024_w4_s3"), (8, "dot_n16_k256_w4_s4"))
    # tiny_llama: hidden 128, 4 heads of 32, 2 kv heads, intermediate 256
    monkeypatch.setitem(gemv.WINS, cap, {(256, 128): wins, (128, 128): wins, (512, 128): wins, (128, 256): wins})
    fused_ops = "rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv,fused_decode"
    old = triton_ops.set_enabled(fused_ops)
    try:
        fused = _runner(tiny_llama, "triton", "bfloat16", disable_cuda_graph=not graphs)
        triton_ops.set_enabled("rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv")
        plain = _runner(tiny_llama, "triton", "bfloat16", disable_cuda_graph=not graphs)
        for n, tokens_p, logits_p, tokens_f, logits_f in _paired_greedy(
                plain, "rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv", fused, fused_ops, 3, 20, 8):
            plans = fused.model.model._fused_plans
            # n rows (eager) or the graph of the next captured size up (3 → 4)
            assert any(n <= k[0] <= 4 * n and v is not None for k, v in plans.items()), plans
            _assert_decode_close(n, tokens_p, logits_p, tokens_f, logits_f)
    finally:
        triton_ops.set_enabled(",".join(sorted(old)) or "0")


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("op", ["fused_int4", "int4_rope"])
def test_fused_int4_layers_match_unfused(tiny_llama, graphs, op, monkeypatch):
    """The fused int4 decoder layer (int4_fused.gemv_h2_fused: norms, SiLU·mul, residual adds and the
    rotary + KV write inside the four gemv_h2 launches; int4_rope: only the rotary + KV write, in
    qkv_proj's) against the layer-by-layer kernels, int4wo-128 on the tiny model: batch 1 takes the
    fused path (qkv_proj writing the pool), batch 3 keeps the plain layers."""
    from edgelm.layers import triton_ops
    from edgelm.layers.attention.triton_backend import TritonAttnBackend

    pytest.importorskip("triton")
    stored = []
    plain_stored = TritonAttnBackend.forward_decode_stored
    monkeypatch.setattr(TritonAttnBackend, "forward_decode_stored",
                        lambda self, q, *a: stored.append(q.shape[0]) or plain_stored(self, q, *a))
    base = "rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv,argmax,rope_kv"
    old = triton_ops.set_enabled(base + "," + op)
    try:
        fused = _runner(tiny_llama, "triton", "bfloat16", disable_cuda_graph=not graphs, torchao_config="int4wo-128")
        triton_ops.set_enabled(base)
        plain = _runner(tiny_llama, "triton", "bfloat16", disable_cuda_graph=not graphs, torchao_config="int4wo-128")
        for n, tokens_p, logits_p, tokens_f, logits_f in _paired_greedy(plain, base, fused, base + "," + op, 4, 20, 8):
            plans = {k[0]: v for k, v in fused.model.model._fused_plans.items()}
            if n == 1:
                assert (plans[1] is not None and plans[1].int4) == (op == "fused_int4"), plans
                assert stored and set(stored) == {1}, stored  # qkv_proj wrote K/V, batch 1 only
            else:
                assert all(v is None for k, v in plans.items() if k > 1), plans
            _assert_decode_close(n, tokens_p, logits_p, tokens_f, logits_f)
    finally:
        triton_ops.set_enabled(",".join(sorted(old)) or "0")


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("op", ["int4_xprep", "int4_xprep_qkv"])
def test_int4_xprep_matches_plain(tiny_llama, graphs, op, monkeypatch):
    """int4wo-128 with the batch-1 GEMVs on prepared x (int4_xprep: the norms and SiLU·mul write it, o_proj's own prep
    kernel; int4_xprep_qkv: qkv_proj's alone, from the input norm) against the plain GEMVs, both fed the same tokens
    and held against a third run that dequantizes then multiplies (cuBLAS, float32 sums): the prepared-x logits at
    least about as close to it as the plain GEMVs' (they differ from each other by more than bf16 rounding: the
    plain GEMV's products carry bf16's 8 bits, the prepared x's 11); greedy tokens the same except at near-ties
    (plain's top two closer than the two runs' distances to the reference); the producers' prepared x is taken."""
    from edgelm.layers import triton_ops
    from edgelm.layers.triton_ops import xprep
    from edgelm.quantization import int4_kernels

    pytest.importorskip("triton")
    hits = []
    plain_take = xprep.take
    monkeypatch.setattr(xprep, "take", lambda x: (lambda r: hits.append(r is not None) or r)(plain_take(x)))
    base = "rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv,argmax,rope_kv"
    old = triton_ops.set_enabled(base + "," + op)
    try:
        prep = _runner(tiny_llama, "triton", "bfloat16", disable_cuda_graph=not graphs, torchao_config="int4wo-128")
        triton_ops.set_enabled(base)
        plain = _runner(tiny_llama, "triton", "bfloat16", disable_cuda_graph=not graphs, torchao_config="int4wo-128")
        prompt = torch.randint(0, 512, (11,), generator=torch.Generator().manual_seed(5)).tolist()
        tokens_p, logits_p = _greedy(plain, [prompt], 8)
        triton_ops.set_enabled(base + "," + op)
        tokens_x, logits_x = _greedy(prep, [prompt], 8, forced=tokens_p)
        triton_ops.set_enabled(base)
        with monkeypatch.context() as mp:  # the reference: every int4 linear dequantizes, then cuBLAS
            mp.setattr(int4_kernels, "choose_kernel", lambda m, w: None)
            ref = _runner(tiny_llama, "triton", "bfloat16", disable_cuda_graph=not graphs, torchao_config="int4wo-128")
            _, logits_r = _greedy(ref, [prompt], 8, forced=tokens_p)
        err_x = max(float((x.float() - r.float()).abs().max()) for x, r in zip(logits_x, logits_r))
        err_p = max(float((p.float() - r.float()).abs().max()) for p, r in zip(logits_p, logits_r))
        assert err_x <= 1.25 * err_p + 2e-2, (err_x, err_p)
        assert tokens_x[0][0] == tokens_p[0][0]  # prefill: not a batch-1 GEMV
        for step, (a, b) in enumerate(zip(tokens_x[0][1:], tokens_p[0][1:])):  # decode steps
            lp = logits_p[step].float().flatten()
            # a different greedy token only where plain's top two are within both runs' distance to the reference
            assert a == b or float(lp[b] - lp[a]) <= err_x + err_p, (step, a, b, float(lp[b] - lp[a]), err_x, err_p)
        assert any(hits), "no GEMV took its producer's prepared x"
    finally:
        triton_ops.set_enabled(",".join(sorted(old)) or "0")


def _same_decode_with_op(with_op, plain, base: str, op: str) -> None:
    """Graph decode of `with_op` (a runner loaded with triton_ops `op` on) gives `plain`'s tokens and logits to
    the bit, `op` on while it runs, off while `plain` does."""
    from edgelm.layers import triton_ops

    triton_ops.set_enabled(base)
    prompt = torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(7)).tolist()
    tokens_p, logits_p = _greedy(plain, [prompt], 8)
    triton_ops.set_enabled(base + "," + op)
    tokens_x, logits_x = _greedy(with_op, [prompt], 8, forced=tokens_p)
    assert tokens_x == tokens_p
    assert all(torch.equal(a, b) for a, b in zip(logits_x, logits_p))


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "int4wo-128"])
def test_l2_prefetch_changes_nothing(tiny_llama, quant):
    """triton_ops "l2_prefetch" only pulls the next weights into the L2: graph decode with it gives the same
    tokens and bit-identical logits as without; each layer's attention holds o_proj's weights first."""
    from edgelm.layers import triton_ops

    pytest.importorskip("triton")
    base = ",".join(sorted(triton_ops.DEFAULT_ON))
    overrides = {"torchao_config": quant} if quant else {}
    old = triton_ops.set_enabled(base + ",l2_prefetch")
    try:
        pf = _runner(tiny_llama, "triton", "bfloat16", **overrides)
        attn = pf.model.model.layers[0].self_attn
        o_w = attn.o_proj.packed.qweight if quant else attn.o_proj.weight
        assert attn.attn.l2_prefetch and attn.attn.l2_prefetch[0][0].data_ptr() == o_w.data_ptr()
        triton_ops.set_enabled(base)
        plain = _runner(tiny_llama, "triton", "bfloat16", **overrides)
        _same_decode_with_op(pf, plain, base, "l2_prefetch")
    finally:
        triton_ops.set_enabled(",".join(sorted(old)) or "0")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_int4_meta_pairs_changes_nothing(tiny_llama, dtype):
    """triton_ops "int4_meta_pairs": every CUDA int4 linear gets its paired scales/offsets at load, and graph
    decode (qkv_proj's rotary epilogue included) gives the same tokens and bit-identical logits as without."""
    from edgelm.layers import triton_ops

    pytest.importorskip("triton")
    base = ",".join(sorted(triton_ops.DEFAULT_ON))
    old = triton_ops.set_enabled(base + ",int4_meta_pairs")
    try:
        paired = _runner(tiny_llama, "triton", dtype, torchao_config="int4wo-128")
        qkv = paired.model.model.layers[0].self_attn.qkv_proj
        assert qkv.meta is not None and qkv.meta.shape == qkv.scales.shape
        triton_ops.set_enabled(base)
        plain = _runner(tiny_llama, "triton", dtype, torchao_config="int4wo-128")
        assert plain.model.model.layers[0].self_attn.qkv_proj.meta is None
        _same_decode_with_op(paired, plain, base, "int4_meta_pairs")
    finally:
        triton_ops.set_enabled(",".join(sorted(old)) or "0")


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["int4wo-128", "gptq-act-order"])
def test_int4_model_graph_decode_matches_eager(tiny_llama, quant, tmp_path):
    """The int4 layers inside captured graphs: --torchao-config int4wo-128 (quantized while loading)
    and a GPTQ act-order checkpoint (x permuted before each kernel), graphs against eager."""
    path = tiny_llama
    overrides = {"torchao_config": quant} if quant.startswith("int4wo") else {}
    if quant == "gptq-act-order":
        from tests.test_prequantized import write_pair

        path, _ = write_pair("llama3", tmp_path, "gptq", 32, desc_act=True)
    graphed = _runner(path, "triton", "float16", **overrides)
    eager = _runner(path, "triton", "float16", disable_cuda_graph=True, **overrides)
    assert graphed.cuda_graph_runner is not None
    gen = torch.Generator().manual_seed(2)
    vocab = graphed.model_config.hf_config.vocab_size
    prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in (5, 11, 3)]
    tokens_e, logits_e = _greedy(eager, prompts, 8)
    _, logits_g = _greedy(graphed, prompts, 8, forced=tokens_e)
    for lg, le in zip(logits_g, logits_e):
        torch.testing.assert_close(lg, le, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fused,quant", [(False, None), (True, None), (False, "int4wo-128"), (True, "int4wo-128")])
def test_pdl_decode_matches_plain_launches(tiny_llama, fused, quant, monkeypatch):
    """Programmatic dependent launch (SM 9.0+) changes when kernels start, not what they compute:
    greedy decode from CUDA graphs with it gives bit-identical logits to the same kernels launched
    one after another, with every decode kernel on the Triton path (the GEMVs entered as wins; the
    int4 kernels when quantized). PDL runs batch-1 steps only: the 3-request batch checks that the
    switch leaves them as they were."""
    from edgelm.layers import triton_ops
    from edgelm.layers.triton_ops import gemv, pdl

    pytest.importorskip("triton")
    cap = torch.cuda.get_device_capability()
    if cap < (9, 0) or not pdl._TRITON_OK:
        pytest.skip("PDL needs SM 9.0+ and a Triton that launches with it")
    wins = ((1, "reduce_n8_k1024_w4_s3"), (8, "dot_n16_k256_w4_s4"))
    monkeypatch.setitem(gemv.WINS, cap, {(256, 128): wins, (128, 128): wins, (512, 128): wins, (128, 256): wins})
    ops = "rmsnorm,add_rmsnorm,silu_and_mul,rotary,gemv,rope_kv" + (",fused_decode,fused_int4" if fused else "")
    old = triton_ops.set_enabled(ops + ",pdl")
    try:
        assert pdl.active(torch.device("cuda"))
        overrides = {"torchao_config": quant} if quant else {}
        with_pdl = _runner(tiny_llama, "triton", "bfloat16", **overrides)
        assert with_pdl.cuda_graph_runner.recapture_bs() == [1]  # its batch-1 graph is the second capture
        triton_ops.set_enabled(ops)
        assert not pdl.active(torch.device("cuda"))
        plain = _runner(tiny_llama, "triton", "bfloat16", **overrides)
        assert plain.cuda_graph_runner.recapture_bs() == []
        for _, tokens_p, logits_p, tokens_d, logits_d in _paired_greedy(plain, ops, with_pdl, ops + ",pdl", 5, 40, 12):
            assert tokens_d == tokens_p
            for ld, lp in zip(logits_d, logits_p):
                assert torch.equal(ld, lp)
    finally:
        triton_ops.set_enabled(",".join(sorted(old)) or "0")
