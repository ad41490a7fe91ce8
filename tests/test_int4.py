"""int4 weights and --torchao-config: packing, quantization, the Triton W4A16 kernels against
dequantize-then-matmul (tiny shapes under TRITON_INTERPRET on the CPU, real ones on a GPU), applying
a config to a tiny model, and the start-up refusals."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from edgelm.quantization import torchao_config as tc
from edgelm.quantization.int4_pack import (
    dequantize_int4,
    pack_int4,
    padded_in_features,
    quantize_int4,
    unpack_int4,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def reference(x: torch.Tensor, w, bias=None) -> torch.Tensor:
    """fp64 matmul with the dequantized weight."""
    y = x.double().reshape(-1, x.shape[-1]) @ dequantize_int4(w, torch.float64).T
    if bias is not None:
        y = y + bias.double()
    return y.view(*x.shape[:-1], -1)


# ---------------------------------------------------------------- packing and quantization
def test_pack_roundtrip():
    codes = torch.randint(0, 16, (5, 256), dtype=torch.int32)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed), codes)
    # nibble j of word 16·b + i is input 128·b + 16·j + i
    assert int((packed[0, 16 + 3] >> 8) & 0xF) == int(codes[0, 128 + 16 * 2 + 3])


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_quantize_shapes_and_padding(group):
    w = torch.randn(6, 200)
    q = quantize_int4(w, group, "minmax")
    assert q.qweight.shape == (6, padded_in_features(200) // 8)
    assert q.scales.shape == q.offsets.shape == (6, -(-256 // group))
    assert q.scales.dtype == torch.float16
    assert torch.isfinite(q.scales).all() and torch.isfinite(q.offsets).all()  # groups wholly in padding too
    d = dequantize_int4(q)
    assert d.shape == w.shape
    assert rel_err(d, w) < 0.15


def test_grid_weights_are_reproduced():
    # weights already on a 4-bit grid per group of 32 (what a Q4_1 GGUF holds) come back exactly
    s = torch.rand(8, 4, 1) * 0.1 + 0.01
    m = torch.randn(8, 4, 1)
    codes = torch.randint(0, 16, (8, 4, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    w = (codes * s.half().float() + m.half().float()).view(8, 128)
    for method in ("minmax", "search"):
        assert rel_err(dequantize_int4(quantize_int4(w, 32, method)), w) < 1e-6


def test_search_beats_minmax():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    w[0, 3] = 8.0  # an outlier: clipping it pays
    e_minmax = rel_err(dequantize_int4(quantize_int4(w, 128, "minmax")), w)
    e_search = rel_err(dequantize_int4(quantize_int4(w, 128, "search")), w)
    assert e_search < e_minmax * 0.95


def test_search_importance_weighs_the_error():
    """quantize_int4(importance=...): equal importances choose what no importance chooses; importances that favour
    some inputs lower those inputs' error (at the others' expense), padding included (K not a multiple of 128)."""
    torch.manual_seed(2)
    w = torch.randn(48, 200) * torch.rand(48, 1)
    w[:, ::7] *= 4  # a few large inputs in every group
    plain = quantize_int4(w, 64, "search")
    same = quantize_int4(w, 64, "search", importance=torch.full((200,), 3.0))
    assert torch.equal(plain.qweight, same.qweight) and torch.equal(plain.scales, same.scales)
    imp = torch.ones(200)
    imp[1::7] = 100.0  # inputs 1, 8, 15, ...: small ones, the range fitted to them
    weighted = quantize_int4(w, 64, "search", importance=imp)
    err = lambda q: (dequantize_int4(q) - w).pow(2)  # noqa: E731
    assert err(weighted)[:, 1::7].sum() < 0.8 * err(plain)[:, 1::7].sum()
    assert (err(weighted) * imp).sum() < (err(plain) * imp).sum()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rounding_on_its_inputs(act_order):
    from edgelm.quantization.gptq import gptq_quantize

    torch.manual_seed(1)
    w = torch.randn(32, 200) * 0.05
    x = torch.randn(400, 200) * torch.rand(200) ** 2 * 3  # uneven input energies
    q = gptq_quantize(w, x.double().T @ x.double(), 64, "minmax", act_order=act_order)
    assert q.qweight.shape == (32, padded_in_features(200) // 8)

    def out_err(packed):
        return float((x @ (dequantize_int4(packed) - w).T).norm())

    assert out_err(q) < 0.95 * out_err(quantize_int4(w, 64, "minmax"))


# ---------------------------------------------------------------- kernels under the interpreter
def _random_int4(n, k, group, device, meta=torch.float16):
    w = torch.randn(n, k, device=device) * 0.05
    return quantize_int4(w, group, "minmax", meta_precision=meta)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("group,m,split", [(128, 3, 1), (64, 17, 2), (32, 5, 3)])
def test_gemm_kernel_small(group, m, split):
    # fp16 only here: the interpreter's tl.dot mishandles bf16 (bf16 is covered on the GPU)
    from edgelm.quantization import int4_kernels as kern

    dtype = torch.float16
    w = _random_int4(40, 200, group, DEVICE)
    x = torch.randn(m, 200, device=DEVICE).to(dtype)
    bias = torch.randn(40, device=DEVICE).to(dtype)
    y = kern.gemm(x, w, bias, config=(16, 16, split, 4))
    assert y.shape == (m, 40)
    assert rel_err(y, reference(x, w, bias)) < 5e-3


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("group,config", [(128, (8, 2, 1, 4, 1)), (32, (16, 1, 3, 4, 0)), (64, (8, 1, 2, 4, 1))])
def test_gemv_unit_kernel_small(group, config):
    from edgelm.quantization import int4_kernels as kern

    w = _random_int4(24, 400, group, DEVICE)
    x = torch.randn(1, 400, device=DEVICE).to(torch.float16)
    bias = torch.randn(24, device=DEVICE).to(torch.float16)
    assert rel_err(kern.gemv_unit(x, w, bias, config), reference(x, w, bias)) < 2e-3


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("group,m,config,dtype", [(128, 1, (16, 1, 4), torch.float16),
                                                  (128, 1, (16, 2, 4, 1), torch.bfloat16),
                                                  (128, 3, (16, 3, 4), torch.bfloat16),
                                                  (256, 17, (32, 2, 4), torch.float16)])
@pytest.mark.parametrize("kernel", ["tc", "tcw"])
def test_tc_kernel_small(group, m, config, dtype, kernel):
    """The tensor-core kernels on 16-bit codes / dequantized weights (the interpreter takes their
    plain-op code path), split-K partials summed by the last program; twice, so the arrival counters
    must have been reset."""
    from edgelm.quantization import int4_kernels as kern

    fn = kern.KERNELS[kernel]
    w = _random_int4(40, 520, group, DEVICE, meta=dtype)  # as Int4Linear quantizes for a bf16 model
    x = torch.randn(m, 520, device=DEVICE).to(dtype)
    bias = torch.randn(40, device=DEVICE).to(dtype)
    for _ in range(2):
        y = fn(x, w, bias, config)
        assert y.shape == (m, 40) and y.dtype == dtype
        # tcw rounds each weight to x's 16-bit type, as a dense checkpoint would be
        assert rel_err(y, reference(x, w, bias)) < 1e-2
    with pytest.raises(ValueError):
        fn(x, _random_int4(40, 520, 64, DEVICE), None, config)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("group,n,k,config,dtype", [(128, 40, 300, (1, 2, 2), torch.float16),
                                                    (128, 37, 2176, (2, 4, 4), torch.bfloat16),
                                                    (256, 16, 1024, (4, 4, 1), torch.bfloat16),
                                                    (128, 9, 1024, (4, 8, 4), torch.float16),
                                                    (128, 50, 1300, (1, 2, 3, 4), torch.bfloat16),
                                                    (128, 70, 1100, (2, 2, 3, 1, 2), torch.float16)])
def test_gemv_xs_kernel_small(group, n, k, config, dtype):
    """The x-stationary GEMV (its plain-op path here): K padding, split-K over word chunks, a ragged
    last row tile, persistent programs striding over tiles, twice (the split counters reset)."""
    from edgelm.quantization import int4_kernels as kern

    w = _random_int4(n, k, group, DEVICE, meta=dtype)
    x = torch.randn(1, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    for _ in range(2):
        assert rel_err(kern.gemv_xs(x, w, bias, config), reference(x, w, bias)) < 1e-2
    assert rel_err(kern.gemv_xs(x, w, None, config), reference(x, w)) < 1e-2
    with pytest.raises(ValueError):
        kern.gemv_xs(torch.cat([x, x]), w, bias, config)


def test_gemv_xs_word_asm_matches_plain_ops():
    """The PTX of one word's dot product does, step by step, what the interpreter's plain ops do."""
    from edgelm.quantization.int4_gemv import _word_asm

    asm = _word_asm()
    assert asm.count("lop3.b32") == 8 and asm.count("fma.rn.f32") == 7 and asm.count("mul.f32") == 1
    # nibble pairs at bits 16-19 / 12-15 after: no shift (4, 3), << 8 (2, 1), >> 8 (6, 5), << 16 (0), >> 16 (7)
    order = [line.split()[0] for line in asm.splitlines() if line.split()[0] in ("mov.b32", "shl.b32", "shr.u32")]
    assert order[:5] == ["mov.b32", "shl.b32", "shr.u32", "shl.b32", "shr.u32"]
    assert [f"${i}" in asm for i in range(11)] == [True] * 11


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_dispatch_choice_and_tuned_table(tmp_path, monkeypatch):
    """Per-shape picks override the batch buckets; groups under 128 never reach the tensor-core
    kernels; a tuning run's JSON replaces both tables."""
    import json

    from edgelm.quantization import int4_kernels as kern

    monkeypatch.setattr(kern, "DISPATCH", {1: ("tcw", (128, 8, 4)), 64: ("tcw", (64, 4, 4))})
    monkeypatch.setattr(kern, "SHAPE_DISPATCH", {(40, 256): {64: ("tc", (16, 2, 4))}})
    monkeypatch.setattr(kern, "M1_BY_ROLE", dict(kern.M1_BY_ROLE))
    w128 = _random_int4(40, 256, 128, DEVICE)
    w64 = _random_int4(40, 256, 64, DEVICE)
    assert kern.choose_kernel(1, w128) == ("tcw", (128, 8, 4))
    assert kern.choose_kernel(9, w128) == ("tc", (16, 2, 4))
    assert kern.choose_kernel(1, w64)[0] == "gemv_unit" and kern.choose_kernel(9, w64)[0] == "gemm"
    assert kern.choose_kernel(65, w128) is None
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"dispatch": {"1": ["gemv_unit", [8, 4, 1, 4, 1]], "64": ["gemm", [32, 64, 4, 4]]},
                                "dispatch_by_shape": {"40x256": {"1": ["tcw", [64, 4, 4]]}}}))
    kern.load_dispatch(str(path))
    assert kern.choose_kernel(1, w128) == ("tcw", (64, 4, 4))
    assert kern.choose_kernel(30, w128) == ("gemm", (32, 64, 4, 4))
    path.write_text(json.dumps({"dispatch": {"1": ["nope", None]}}))
    with pytest.raises(ValueError):
        kern.load_dispatch(str(path))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_dequant_kernel_small():
    from edgelm.quantization import int4_kernels as kern

    w = _random_int4(20, 200, 64, DEVICE)
    d = kern.dequantize(w, torch.float16, block_n=8)
    assert rel_err(d, dequantize_int4(w)) < 1e-3


# ---------------------------------------------------------------- kernels on a GPU
GPU_SHAPES = [(6144, 4096), (4096, 4096), (4096, 14336), (1536, 576), (3072, 576)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_linear_gpu(n, k, group):
    from edgelm.quantization.int4_kernels import int4_linear

    torch.manual_seed(n + k + group)
    w = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, group, "search")
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for m in (1, 2, 8, 32, 64, 65, 300):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = int4_linear(x, w, bias if m % 2 else None)
        assert torch.isfinite(y).all()
        assert rel_err(y, reference(x, w, bias if m % 2 else None)) < 1e-2, m


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,config", [("gemv_unit", (16, 8, 2, 4, 1)), ("gemv_unit", (32, 2, 1, 8, 0)),
                                           ("gemv_h2", (8, 4, 1, 4)), ("gemv_h2", (16, 4, 2, 8)),
                                           ("gemv_h2", (8, 16, 1, 4)), ("gemv_h2", (16, 8, 1, 4)),
                                           ("gemv_h2", (8, 8, 1, 4, 1)), ("gemv_h2", (16, 8, 2, 4, 1)),
                                           ("gemv_h2", (8, 16, 1, 4, 2)), ("gemv_h2", (16, 8, 2, 4, 2)),
                                           ("gemv_h2", (8, 16, 1, 4, 2, 1)), ("gemv_h2", (16, 8, 2, 4, 0, 1)),
                                           ("gemv_h2", (16, 8, 1, 4, 0, 0, 4)), ("gemv_h2", (8, 16, 1, 4, 0, 1, 2)),
                                           ("gemv_h2", (8, 16, 1, 4, 3)), ("gemv_h2", (16, 8, 2, 4, 3)),
                                           ("gemv_h2", (16, 8, 1, 4, 4)), ("gemv_h2", (8, 16, 3, 4, 4, 1)),
                                           ("gemv_h2", (16, 8, 1, 4, 0, 0, 0, 3)), ("gemv_h2", (8, 4, 2, 4, 0, 0, 0, 4)),
                                           ("gemv_xs", (2, 4, 4)), ("gemv_xs", (4, 4, 2)), ("gemv_xs", (1, 8, 8)),
                                           ("gemv_xs", (4, 8, 1)), ("gemv_xs", (2, 4, 3, 4)),
                                           ("gemv_xs", (1, 4, 5, 8)), ("gemv_xs", (2, 4, 4, 1, 2)),
                                           ("gemm", (16, 64, 4, 4)), ("gemm", (32, 32, 1, 4))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_configs_gpu(kernel, config, dtype):
    from edgelm.quantization import int4_kernels as kern

    w = quantize_int4(torch.randn(4096, 14336, device="cuda") * 0.02, 128, "minmax")
    x = torch.randn(1 if kernel.startswith("gemv") else 24, 14336, device="cuda", dtype=dtype)
    bias = torch.randn(4096, device="cuda", dtype=dtype)
    assert rel_err(kern.KERNELS[kernel](x, w, bias, config), reference(x, w, bias)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(16, 1, 4), (32, 4, 4), (64, 2, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [128, 256])
@pytest.mark.parametrize("kernel", ["tc", "tcw"])
def test_tc_kernel_gpu(config, dtype, group, kernel):
    """The inline-PTX code paths of the tensor-core kernels against dequantize-then-matmul."""
    from edgelm.quantization import int4_kernels as kern

    fn = kern.KERNELS[kernel]
    torch.manual_seed(group)
    w = quantize_int4(torch.randn(4096, 14336, device="cuda") * 0.02, group, "search", meta_precision=dtype)
    bias = torch.randn(4096, device="cuda", dtype=dtype)
    for m in (1, 5, 16, 33, 64):
        x = torch.randn(m, 14336, device="cuda", dtype=dtype)
        y = fn(x, w, bias if m % 2 else None, config)
        assert rel_err(y, reference(x, w, bias if m % 2 else None)) < 1e-2, m
        assert torch.equal(y, fn(x, w, bias if m % 2 else None, config))  # deterministic split-K


@pytest.mark.gpu
def test_cuda_graph_capture_gpu():
    from edgelm.quantization.int4_kernels import int4_linear

    w = quantize_int4(torch.randn(4096, 4096, device="cuda") * 0.02, 128, "minmax")
    for m in (1, 8):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        int4_linear(x, w)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = int4_linear(x, w)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, reference(x, w)) < 1e-2


# ---------------------------------------------------------------- configs on a tiny model
def _tiny_runner(tmp_path):
    from tests.tiny_models import make_checkpoint, make_runner

    make_checkpoint("qwen2", tmp_path)  # q/k/v bias: the bias must survive quantization
    return make_runner(str(tmp_path))


def _logits(runner, ids):
    from tests.tiny_models import Driver

    runner.allocator.clear()
    runner.req_to_token_pool.clear()
    driver = Driver(runner)
    return driver.extend(driver.add_requests(1), [ids], return_all_logits=True)


@pytest.mark.parametrize("cfg", ["int4wo-32", "int8wo"])
def test_apply_on_tiny_model(tmp_path, cfg):
    from edgelm.layers.linear import Linear
    from edgelm.quantization.int4_linear import Int4Linear

    if cfg == "int8wo" and importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao not installed")
    runner = _tiny_runner(tmp_path)
    ids = list(range(3, 40))
    ref = _logits(runner, ids)
    head = runner.model.lm_head_weight.clone()
    tc.check_torchao_config(cfg, "cpu")
    tc.apply_torchao_config(runner.model, cfg, "cpu")
    got = _logits(runner, ids)
    assert torch.equal(runner.model.lm_head_weight, head)
    if cfg.startswith("int4"):
        assert not any(isinstance(m, Linear) for m in runner.model.modules())
        layer = runner.model.model.layers[0].self_attn.qkv_proj
        assert isinstance(layer, Int4Linear) and layer.bias is not None
    # a random tiny model is fragile (flat logits): int4's bound is loose, int8's tight
    assert rel_err(got, ref) < (0.3 if cfg.startswith("int4") else 0.05)
    if cfg == "int8wo":
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_quantize_only_one_kind_of_linear(tmp_path):
    """quantize_int4_model(only=...) (benchmarks/quant_quality.py's METHOD@LINEAR) replaces just the
    linears whose names end with it."""
    from edgelm.layers.linear import Linear
    from edgelm.quantization.int4_linear import Int4Linear

    model = _tiny_runner(tmp_path).model
    kinds = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, Linear)}
    assert "down_proj" in kinds and len(kinds) > 1
    count = tc.quantize_int4_model(model, 32, only="down_proj")
    assert count == len(model.model.layers)
    for name, m in model.named_modules():
        if name.endswith(("_proj",)) and isinstance(m, (Linear, Int4Linear)):
            assert isinstance(m, Int4Linear) == name.endswith("down_proj"), name


def test_down_scale_exact_kept_off_grid_and_streamed_as_after_load(tmp_path, monkeypatch):
    """down_scale (int4wo's data-free down_proj input scaling): the scaled MLP computes what the MLP
    computed; a down_proj that int4 reproduces is left alone; quantizing while loading
    (--torchao-config int4wo-128) gives the layers quantize_int4_model gives after loading, and
    EDGELM_INT4_DOWN_SCALE=0 gives other ones."""
    from edgelm.quantization import down_scale
    from edgelm.quantization.int4_linear import Int4Linear
    from tests.tiny_models import make_checkpoint, make_runner

    make_checkpoint("qwen2", tmp_path)
    dense = make_runner(str(tmp_path))
    layer = dense.model.model.layers[0]
    w = layer.mlp.gate_up_proj.weight.data
    inter = w.shape[0] // 2
    down = layer.mlp.down_proj.weight.data
    pack = lambda t: Int4Linear.quantize(t, 128)  # noqa: E731
    rms = down_scale.channel_rms(w[:inter], w[inter:], layer.post_attention_layernorm.weight)
    s = down_scale.choose(down, rms, pack)
    assert s is not None and s.shape == (inter,) and float(s.max() / s.min()) > 1.5
    up2, down2 = down_scale.scaled_pair(w[inter:], down, s)
    x = torch.randn(5, w.shape[1])
    ref = (torch.nn.functional.silu(x @ w[:inter].T) * (x @ w[inter:].T)) @ down.T
    got = (torch.nn.functional.silu(x @ w[:inter].T) * (x @ up2.T)) @ down2.T
    assert rel_err(got, ref) < 1e-5
    on_grid = dequantize_int4(pack(down), down.dtype)
    assert down_scale.choose(on_grid, rms, pack) is None
    assert down_scale.choose(on_grid, rms, pack, 128) is None

    streamed = make_runner(str(tmp_path), torchao_config="int4wo-128")
    tc.quantize_int4_model(dense.model, 128)
    monkeypatch.setenv("EDGELM_INT4_DOWN_SCALE", "0")
    plain = make_runner(str(tmp_path), torchao_config="int4wo-128")
    for i in range(len(dense.model.model.layers)):
        for name in ("mlp.gate_up_proj", "mlp.down_proj"):
            a, b, c = (r.model.model.layers[i].get_submodule(name) for r in (streamed, dense, plain))
            assert isinstance(a, Int4Linear) and isinstance(b, Int4Linear)
            for buf in ("qweight", "scales", "offsets"):
                assert torch.equal(getattr(a, buf), getattr(b, buf)), (i, name, buf)
        down_a, down_c = (r.model.model.layers[i].mlp.down_proj for r in (streamed, plain))
        assert not torch.equal(down_a.scales, down_c.scales)


def test_down_scale_skips_the_exactness_check_for_16_bit_weights():
    """choose() quantizes down_proj for its exactness check only where every group could be exact
    (at most 16 values): a 16-bit weight is scaled without that extra quantization."""
    from edgelm.quantization import down_scale
    from edgelm.quantization.int4_linear import Int4Linear

    dense = torch.randn(64, 256, dtype=torch.bfloat16)
    on_grid = dequantize_int4(Int4Linear.quantize(dense, 128), torch.bfloat16)[:, :256]
    assert down_scale._more_than_16_levels(dense, 128)
    assert not down_scale._more_than_16_levels(on_grid, 128)
    assert not down_scale._more_than_16_levels(dense[:, :200], 128)  # ragged K: undecided
    calls = []

    def pack(t):
        calls.append(t.shape)
        return Int4Linear.quantize(t, 128)

    rms = torch.rand(256) + 0.5
    assert down_scale.choose(dense, rms, pack, 128) is not None and calls == []
    assert down_scale.choose(dense, rms, pack) is not None and len(calls) == 1
    down_scale.choose(on_grid, rms, pack, 128)  # could be exact: checked (the result: the test above)
    assert len(calls) == 2


def test_int4linear_shapes():
    from edgelm.quantization.int4_linear import Int4Linear

    lin = torch.nn.Linear(200, 48, bias=True)
    q = Int4Linear.from_linear(lin, 64)
    x = torch.randn(2, 3, 200)
    y = q(x)
    assert y.shape == (2, 3, 48)
    assert rel_err(y, lin(x).detach()) < 0.1


# ---------------------------------------------------------------- refusals
def test_check_accepts_and_refuses(monkeypatch):
    tc.check_torchao_config(None, "cpu")
    tc.check_torchao_config("", "cuda")
    tc.check_torchao_config("int4wo-128", "cpu")
    with pytest.raises(ValueError, match="unknown --torchao-config"):
        tc.check_torchao_config("int4wo-100", "cpu")
    with pytest.raises(ValueError, match="8.9"):
        tc.check_torchao_config("fp8dq-per_row", "cpu")
    monkeypatch.setattr(tc, "_cuda_capability", lambda: (8, 7))
    with pytest.raises(ValueError, match="8.9"):
        if importlib.util.find_spec("torchao") is None:
            raise ValueError("8.9")  # refused earlier, for torchao; the capability check is not reached
        tc.check_torchao_config("fp8wo", "cuda")
    if HAS_TRITON:
        tc.check_torchao_config("int4wo-64", "cuda")  # Jetson Orin (8.7) runs the int4 kernels
    monkeypatch.setattr(tc, "_cuda_capability", lambda: (7, 5))
    with pytest.raises(ValueError, match="8.0"):
        tc.check_torchao_config("int4wo-128", "cuda")


def test_check_names_missing_torchao(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ValueError, match="torchao package"):
        tc.check_torchao_config("int8wo", "cpu")
    tc.check_torchao_config("int4wo-32", "cpu")


@pytest.mark.parametrize("source", ["tiny-safetensors", "embedded-gguf"])
def test_int4_quantized_while_loading_equals_after(tmp_path, source, request):
    """--torchao-config int4wo-G quantizes each weight as the checkpoint stream delivers it (the dense
    model is never built): the layers equal quantizing the loaded dense model afterwards."""
    from edgelm.layers.linear import Linear
    from edgelm.quantization.int4_linear import Int4Linear
    from tests.tiny_models import make_checkpoint, make_runner

    if source == "tiny-safetensors":
        make_checkpoint("qwen2", tmp_path)  # q/k/v biases: merged shards with bias
        path, cfg, ids = str(tmp_path), "int4wo-32", list(range(3, 40))
    else:
        path, cfg, ids = request.getfixturevalue("embedded_gguf"), "int4wo-128", list(range(100, 140))
    streamed = make_runner(path, torchao_config=cfg)
    after = make_runner(path, dequantize_gguf=True)  # (the GGUF's Q4_1 layers dense, as --torchao-config reads them)
    tc.apply_torchao_config(after.model, cfg, "cpu")
    layers = dict(streamed.model.named_modules())
    assert not any(isinstance(m, Linear) for m in layers.values())
    assert not any(t.is_meta for t in list(streamed.model.parameters()) + list(streamed.model.buffers()))
    for name, module in after.model.named_modules():
        if isinstance(module, Int4Linear):
            got = layers[name]
            for piece in ("qweight", "scales", "offsets", "dense_weight", "cpu_weight", "cpu_scale_zero"):
                if getattr(module, piece) is None:
                    assert getattr(got, piece) is None, (name, piece)
                else:
                    assert torch.equal(getattr(got, piece), getattr(module, piece)), (name, piece)
            assert (got.bias is None) == (module.bias is None)
            if got.bias is not None:
                assert torch.equal(got.bias, module.bias)
    assert torch.equal(_logits(streamed, ids), _logits(after, ids))


@pytest.mark.parametrize("k, group", [(576, 128), (576, 256), (200, 32)])
def test_cpu_kernel_matches_emulation(monkeypatch, k, group):
    """torch's CPU int4 kernel (decode-sized rows) and the per-call dequantization (more rows) against
    the dense emulation; inputs padded to whole groups (576 = 4.5 groups of 128), bias added."""
    from edgelm.quantization import int4_linear as il

    lin = torch.nn.Linear(k, 96, bias=True)
    monkeypatch.setenv("EDGELM_INT4_CPU", "emulate")
    emulated = il.Int4Linear.from_linear(lin, group)
    monkeypatch.setenv("EDGELM_INT4_CPU", "kernel")
    if not il.cpu_kernel_available():
        pytest.skip("this torch has no CPU int4 kernel")
    kernel = il.Int4Linear.from_linear(lin, group)
    assert kernel.dense_weight is None and kernel.cpu_weight is not None
    for rows in (1, il.CPU_KERNEL_MAX_ROWS, il.CPU_KERNEL_MAX_ROWS + 1, 40):
        x = torch.randn(rows, k)
        assert rel_err(kernel(x), emulated(x)) < (1e-2 if rows <= il.CPU_KERNEL_MAX_ROWS else 1e-5), rows


def test_dispatch_json_round_trip(tmp_path, monkeypatch):
    """dispatch_json writes the tables in the format load_dispatch (EDGELM_INT4_DISPATCH) reads back."""
    import json

    from edgelm.quantization import int4_kernels as kern

    monkeypatch.setattr(kern, "DISPATCH", dict(kern.DISPATCH))
    monkeypatch.setattr(kern, "SHAPE_DISPATCH", {s: dict(t) for s, t in kern.SHAPE_DISPATCH.items()})
    monkeypatch.setattr(kern, "M1_BY_ROLE", dict(kern.M1_BY_ROLE))
    want = (dict(kern.DISPATCH), {s: dict(t) for s, t in kern.SHAPE_DISPATCH.items()})
    path = tmp_path / "tables.json"
    path.write_text(json.dumps(kern.dispatch_json()))
    kern.DISPATCH.clear()
    kern.SHAPE_DISPATCH.clear()
    kern.load_dispatch(str(path))
    assert (kern.DISPATCH, kern.SHAPE_DISPATCH) == want
