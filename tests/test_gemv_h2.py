"""The batch-1 int4 GEMV gemv_h2 (edgelm.quantization.int4_ptx): its launch configs, the shapes shipped in
SHAPE_DISPATCH beyond Llama-3.1-8B's, and the paired scales/offsets (int4_meta_pairs), against
dequantize-then-matmul (plain-op path under TRITON_INTERPRET on the CPU, inline PTX on a GPU)."""

from __future__ import annotations

import pytest
import torch

from edgelm.quantization.int4_pack import quantize_int4
from tests.test_int4 import DEVICE, HAS_TRITON, _random_int4, reference, rel_err


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("group,k,config,dtype", [(128, 300, (8, 2, 1, 4), torch.float16),
                                                  (128, 520, (16, 1, 3, 4), torch.bfloat16),
                                                  (256, 512, (8, 4, 2, 4), torch.float16),
                                                  (128, 2200, (16, 16, 1, 4), torch.bfloat16),
                                                  (128, 300, (8, 2, 1, 4, 1), torch.bfloat16),
                                                  (128, 1000, (16, 2, 3, 4, 1), torch.float16),
                                                  (256, 2200, (8, 4, 1, 4, 1), torch.bfloat16),
                                                  (128, 1000, (8, 2, 3, 4, 2), torch.bfloat16),
                                                  (128, 300, (16, 4, 1, 4, 2), torch.float16),
                                                  (128, 1000, (8, 4, 1, 4, 1, 1), torch.bfloat16),
                                                  (128, 1000, (8, 2, 1, 4, 0, 0, 1), torch.bfloat16),
                                                  (256, 300, (16, 1, 1, 4, 0, 1, 1), torch.float16),
                                                  (128, 1000, (8, 2, 3, 4, 3), torch.bfloat16),
                                                  (128, 2200, (16, 4, 1, 4, 3), torch.float16),
                                                  (256, 1000, (8, 2, 2, 4, 4), torch.bfloat16),
                                                  (128, 300, (16, 1, 1, 4, 4, 1), torch.float16),
                                                  (128, 2200, (8, 2, 1, 4, 0, 0, 0, 3), torch.bfloat16),
                                                  (256, 1000, (16, 1, 2, 4, 0, 0, 0, 2), torch.float16)])
def test_gemv_h2_kernel_small(group, k, config, dtype):
    """The packed-16-bit CUDA-core GEMV (its plain-op path here), split-K, the weight prefetch
    (config[4]; 3 and 4: x a tile ahead too), the late release (config[5]), the persistent kernel
    (config[6]: here 2 "SMs", so a program sums several of the 40 rows' tiles) and the pipelined K loop
    (config[7]) included, twice."""
    from edgelm.quantization import int4_kernels as kern

    w = _random_int4(40, k, group, DEVICE, meta=dtype)
    x = torch.randn(1, k, device=DEVICE).to(dtype)
    bias = torch.randn(40, device=DEVICE).to(dtype)
    for _ in range(2):
        assert rel_err(kern.gemv_h2(x, w, bias, config), reference(x, w, bias)) < 1e-2
    with pytest.raises(ValueError):
        kern.gemv_h2(torch.cat([x, x]), w, bias, config)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("n,k", [(16, 3584), (16, 18944)])
def test_gemv_h2_qwen_shapes_small(n, k):
    """The batch-1 configs shipped for Qwen2.5-7B (SHAPE_DISPATCH) on its K (3584: 28 blocks, a partial last
    tile; 18944: 148) with few rows, through int4_linear's dispatch (plain-op path here)."""
    from edgelm.quantization import int4_kernels as kern

    w = _random_int4(n, k, 128, DEVICE, meta=torch.bfloat16)
    x = torch.randn(1, k, device=DEVICE).to(torch.bfloat16)
    shapes = [s for s in kern.SHAPE_DISPATCH if s[1] == k]
    assert shapes
    for shape in shapes:
        config = kern.SHAPE_DISPATCH[shape][1][1]
        assert rel_err(kern.gemv_h2(x, w, None, config), reference(x, w, None)) < 1e-2, config


# the decoder linears (qkv, o, gate_up, down) of models no sweep has timed: their batch-1 config is their role's
UNSWEPT = {"llama-3.2-3b": [(5120, 3072), (3072, 3072), (16384, 3072), (3072, 8192)],
           "qwen2.5-1.5b": [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]}


@pytest.mark.parametrize("name", sorted(UNSWEPT))
def test_unswept_shapes_are_the_shipped_configs(name):
    """UNSWEPT's shapes are those of the configs shipped in edgelm/configs (what int4_variants.py loads)."""
    from transformers import AutoConfig

    from edgelm.bench_one_batch import shipped_config_dir

    cfg = AutoConfig.from_pretrained(shipped_config_dir(name))
    h, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    assert UNSWEPT[name] == [((heads + 2 * kv) * hd, h), (h, heads * hd), (2 * cfg.intermediate_size, h),
                             (h, cfg.intermediate_size)]


def test_m1_role_defaults(monkeypatch, tmp_path):
    """A batch-1 shape without a SHAPE_DISPATCH entry gets the shipped config of the linear it looks like; a shape
    with one keeps it; a loaded dispatch file (measured on its own GPU) empties the role table, and its batch-1
    bucket holds."""
    import json
    from types import SimpleNamespace

    from edgelm.quantization import int4_kernels as kern

    monkeypatch.setattr(kern, "DISPATCH", dict(kern.DISPATCH))
    monkeypatch.setattr(kern, "SHAPE_DISPATCH", {s: dict(t) for s, t in kern.SHAPE_DISPATCH.items()})
    monkeypatch.setattr(kern, "M1_BY_ROLE", dict(kern.M1_BY_ROLE))

    def weight(n, k):  # choose_kernel reads the shape and the group size only
        return SimpleNamespace(out_features=n, in_features=k, group_size=128)

    # Llama-3.1-8B's gemv_h2 configs (its qkv_proj and gate_up_proj run cuda_w4 since round 15, down_proj since round
    # 27, gemv_h2 with these where cuda_w4 cannot run)
    gemv_h2_8b = {"qkv": (8, 16, 1, 4, 2), "o": (8, 16, 1, 4, 1), "gate_up": (16, 8, 1, 4), "down": (8, 16, 1, 4, 3)}
    assert kern.SHAPE_DISPATCH[(4096, 4096)][1] == ("gemv_h2", gemv_h2_8b["o"])
    assert kern.SHAPE_DISPATCH[(4096, 14336)][1][0] == "cuda_w4"
    for shapes in UNSWEPT.values():
        for (n, k), role in zip(shapes, ["qkv", "o", "gate_up", "down"]):
            assert kern.m1_role(n, k) == role
            assert kern.m1_unswept(n, k) == kern.M1_BY_ROLE[role] == ("gemv_h2", gemv_h2_8b[role])
            kern.SHAPE_DISPATCH.pop((n, k), None)  # (a measured entry would win, as below)
            assert kern.choose_kernel(1, weight(n, k)) == kern.M1_BY_ROLE[role]
            assert kern.choose_kernel(2, weight(n, k)) == kern.DISPATCH[16]  # only batch 1 has role defaults
    assert kern.m1_role(2560, 4096) == "down"  # an o_proj with heads wider than the hidden size (Qwen3-4B)
    kern.SHAPE_DISPATCH[(1536, 1536)] = {1: ("gemv_h2", (4, 8, 1, 2))}
    assert kern.choose_kernel(1, weight(1536, 1536)) == ("gemv_h2", (4, 8, 1, 2))
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"dispatch": {"1": ["gemv_h2", [4, 8, 1, 4]], "16": ["tcw", [64, 4, 4]]}}))
    kern.load_dispatch(str(path))
    assert kern.M1_BY_ROLE == {} and kern.choose_kernel(1, weight(3072, 8192)) == ("gemv_h2", (4, 8, 1, 4))
    kern.DISPATCH.clear()  # a table without a batch-1 bucket: gemv_h2's own default config
    assert kern.m1_unswept(3072, 8192) == ("gemv_h2", None)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("k", [3072, 8192, 1536, 8960])
def test_gemv_h2_unswept_shapes_small(k):
    """The configs that batch 1 runs on Llama-3.2-3B's and Qwen2.5-1.5B's K (8960: 70 blocks, a partial last
    tile), with few rows (plain-op path here); config None is gemv_h2's own default."""
    from edgelm.quantization import int4_kernels as kern

    w = _random_int4(16, k, 128, DEVICE, meta=torch.bfloat16)
    x = torch.randn(1, k, device=DEVICE).to(torch.bfloat16)
    for n, kk in (s for shapes in UNSWEPT.values() for s in shapes):
        if kk == k:  # the role's config, and the shape's own where round 12 found one faster
            for kernel, config in {kern.m1_unswept(n, k), kern.SHAPE_DISPATCH.get((n, k), {}).get(1, ("gemv_h2", None))}:
                assert kernel == "gemv_h2"
                assert rel_err(kern.gemv_h2(x, w, None, config), reference(x, w, None)) < 1e-2, config


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]
                         + [s for shapes in UNSWEPT.values() for s in shapes])
def test_int4_linear_qwen_shapes_gpu(n, k):
    """Batch 1 through int4_linear against the reference on the Qwen2.5-7B shapes (their SHAPE_DISPATCH entries) and
    on Llama-3.2-3B's and Qwen2.5-1.5B's (their roles' configs)."""
    from edgelm.quantization.int4_kernels import choose_kernel, int4_linear

    w = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, 128, "minmax")
    assert choose_kernel(1, w)[0] == "gemv_h2"
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    assert rel_err(int4_linear(x, w, bias), reference(x, w, bias)) < 1e-2


def _check_meta_pairs(n, k, config, dtype, meta, device):
    """gemv_h2 reading Int4Weight.meta (triton_ops "int4_meta_pairs") gives the very numbers it gives from the
    scales and offsets, and matches the reference."""
    from edgelm.layers import triton_ops
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization.int4_pack import meta_pairs

    w = _random_int4(n, k, 128, device, meta=meta)
    x = torch.randn(1, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    plain = kern.gemv_h2(x, w, bias, config)
    w.meta = meta_pairs(w.scales, w.offsets)
    assert w.meta.dtype == torch.int32 and w.meta.shape == w.scales.shape
    old = triton_ops.set_enabled(",".join(sorted(triton_ops.DEFAULT_ON | {"int4_meta_pairs"})))
    try:
        paired = kern.gemv_h2(x, w, bias, config)
    finally:
        triton_ops.set_enabled(",".join(sorted(old)) or "0")
    assert torch.equal(paired, plain)
    assert rel_err(paired, reference(x, w, bias)) < 1e-2


def test_meta_pairs_layout():
    """meta_pairs: each group's scale bits low, offset bits high."""
    from edgelm.quantization.int4_pack import meta_pairs

    s = torch.tensor([[1.5, -2.0]], dtype=torch.float16)
    m = torch.tensor([[-0.25, 3.0]], dtype=torch.float16)
    got = meta_pairs(s, m)
    assert torch.equal((got & 0xFFFF).to(torch.int16).view(torch.float16), s)
    assert torch.equal((got >> 16).to(torch.int16).view(torch.float16), m)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("config,dtype,meta", [((8, 2, 1, 4), torch.bfloat16, torch.float16),
                                               ((16, 4, 2, 4, 3), torch.float16, torch.float16),
                                               ((8, 2, 1, 4, 4), torch.bfloat16, torch.bfloat16)])
def test_gemv_h2_meta_pairs_small(config, dtype, meta):
    _check_meta_pairs(40, 1000, config, dtype, meta, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(8, 16, 1, 4, 1), (16, 8, 1, 4), (8, 16, 1, 4, 3), (8, 16, 2, 4, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_h2_meta_pairs_gpu(config, dtype):
    _check_meta_pairs(4096, 14336, config, dtype, dtype, "cuda")
