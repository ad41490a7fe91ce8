"""The batch-1 int4 GEMV on prepared x (triton_ops "int4_xprep"; int4_ptx.x_prep and gemv_h2's PREP
form): the prep kernel's pairs, block sums and scales exactly, and the GEMV against
dequantize-then-matmul (plain-op twin under TRITON_INTERPRET on the CPU, the PTX on a GPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from edgelm.quantization.int4_pack import dequantize_int4, quantize_int4

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def reference(x: torch.Tensor, w, bias=None) -> torch.Tensor:
    y = x.double() @ dequantize_int4(w, torch.float64).T
    return y + bias.double() if bias is not None else y


@pytest.fixture
def xprep_on():
    from edgelm.layers import triton_ops

    old = triton_ops.set_enabled(",".join(sorted(triton_ops.DEFAULT_ON | {"int4_xprep"})))
    yield
    triton_ops.set_enabled(",".join(sorted(old)))


def _x(k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Random x [1, k] with a large outlier, a block of zeros and a block of tiny values."""
    x = torch.randn(1, k) * 3
    x[0, 5] = 3000.0  # would overflow an unscaled fp16 sum of four q·x
    if k > 256:
        x[0, 128:256] = 0.0
    if k > 384:
        x[0, 256:384] *= 1e-6
    return x.to(dtype).to(device)


@needs_triton
@pytest.mark.parametrize("k,dtype", [(300, torch.bfloat16), (1024, torch.float16), (2200, torch.bfloat16)])
def test_x_prep_exact(k, dtype):
    """Each pair holds x·up (odd 16-blocks also ·1/16) exactly in fp16, up a power of two with the block's
    largest |x|·up in [2^14, 2^15); xs the block sums; xd·up = 2^24; inputs past K are zero."""
    from edgelm.layers.triton_ops.xprep import x_prep

    x = _x(k, dtype, DEVICE)
    xp, xs, xd = (t.cpu() for t in x_prep(x))
    nb = -(-k // 128)
    xf = torch.nn.functional.pad(x.float().cpu()[0], (0, nb * 128 - k)).view(nb, 2, 64)
    halves = xp[:nb * 64].view(nb, 64)
    lo = (halves & 0xFFFF).to(torch.int16).view(torch.float16).float()
    hi = ((halves >> 16) & 0xFFFF).to(torch.int16).view(torch.float16).float()
    up = 2.0 ** 24 / xd.double()
    f = torch.where((torch.arange(64) // 16) % 2 == 1, 1 / 16, 1.0).double()
    for b in range(nb):
        amax = xf[b].abs().max().item()
        if amax > 0:
            assert 2 ** 14 <= amax * up[b] < 2 ** 15, b
        assert torch.equal(up[b].log2(), up[b].log2().round())  # a power of two
        want_lo = (xf[b, 0].double() * up[b] * f).to(torch.float16).float()
        want_hi = (xf[b, 1].double() * up[b] * f).to(torch.float16).float()
        assert torch.equal(lo[b], want_lo) and torch.equal(hi[b], want_hi), b
        if amax > 0:  # exact: the scaling only moved exponents
            assert torch.equal(want_lo.double(), xf[b, 0].double() * up[b] * f), b
    assert torch.allclose(xs.double(), xf.double().sum(dim=(1, 2)), rtol=1e-6, atol=1e-3)


@needs_triton
@pytest.mark.parametrize("group,k,config,dtype", [(128, 300, (8, 2, 1, 4), torch.float16),
                                                  (128, 520, (16, 1, 3, 4), torch.bfloat16),
                                                  (256, 1024, (8, 4, 2, 4, 1), torch.float16),
                                                  (128, 1000, (8, 2, 3, 4, 2), torch.bfloat16),
                                                  (128, 2200, (16, 4, 1, 4, 1, 1), torch.bfloat16)])
@pytest.mark.parametrize("form", [1, 2])
def test_gemv_h2_prep_small(group, k, config, dtype, form, xprep_on, monkeypatch):
    """gemv_h2 on prepared x, the pairs loaded either way (PREP_FORM): ragged K, split K, prefetch and late
    release, group 256, an outlier of 3000, zero and tiny blocks; against dequantize-then-matmul, twice (the
    scratch buffers are reused)."""
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization import int4_ptx

    monkeypatch.setattr(int4_ptx, "PREP_FORM", form)

    w = quantize_int4(torch.randn(40, k, device=DEVICE) * 0.05, group, "minmax", meta_precision=dtype)
    bias = torch.randn(40, device=DEVICE).to(dtype)
    for seed in range(2):
        torch.manual_seed(seed)
        x = _x(k, dtype, DEVICE)
        assert rel_err(kern.gemv_h2(x, w, bias, config), reference(x, w, bias)) < 1e-2


@needs_triton
def test_gemv_h2_prep_is_switched(monkeypatch, xprep_on):
    """With int4_xprep on, gemv_h2 launches the prep kernel (and not without)."""
    from edgelm.layers import triton_ops
    from edgelm.layers.triton_ops import xprep
    from edgelm.quantization import int4_ptx

    calls = []
    real = xprep.x_prep
    monkeypatch.setattr(xprep, "x_prep", lambda x: calls.append(x.shape) or real(x))
    w = quantize_int4(torch.randn(16, 256, device=DEVICE) * 0.05, 128, "minmax")
    x = torch.randn(1, 256, device=DEVICE).half()
    int4_ptx.gemv_h2(x, w, None, (8, 2, 1, 4))
    assert calls == [(1, 256)]
    triton_ops.set_enabled(",".join(sorted(triton_ops.DEFAULT_ON)))
    int4_ptx.gemv_h2(x, w, None, (8, 2, 1, 4))
    assert calls == [(1, 256)]


@needs_triton
def test_xprep_qkv_only_where_offered(monkeypatch):
    """int4_xprep_qkv: only the input norm (site "qkv") writes x prepared, and gemv_h2 runs the prepared form
    only on an offered x; no prep kernel of its own anywhere. int4_xprep: every marked site."""
    from edgelm.layers import triton_ops
    from edgelm.layers.triton_ops import xprep
    from edgelm.layers.triton_ops.rmsnorm import rms_norm
    from edgelm.quantization import int4_ptx

    old = triton_ops.set_enabled(",".join(sorted(triton_ops.DEFAULT_ON | {"int4_xprep_qkv"})))
    try:
        assert [xprep.wanted(s) for s in ("qkv", "gate_up", "down", False)] == [True, False, False, False]
        calls, preps = [], []
        monkeypatch.setattr(xprep, "x_prep", lambda x: calls.append(x.shape))
        real_for = xprep.for_gemv
        monkeypatch.setattr(xprep, "for_gemv", lambda x: (lambda r: preps.append(r is not None) or r)(real_for(x)))
        torch.manual_seed(0)
        w = quantize_int4(torch.randn(16, 256, device=DEVICE) * 0.05, 128, "minmax")
        x = torch.randn(1, 256, device=DEVICE).half()
        plain = int4_ptx.gemv_h2(x, w, None, (8, 2, 1, 4))  # nothing offered: x as it is
        xn = rms_norm(x, torch.ones(256, dtype=x.dtype, device=DEVICE), 1e-5, None, prep=xprep.wanted("qkv"))
        y = int4_ptx.gemv_h2(xn, w, None, (8, 2, 1, 4))  # offered by the norm: prepared
        assert preps == [False, True] and calls == []
        assert rel_err(y, reference(xn, w)) < 1e-2 and rel_err(plain, reference(x, w)) < 1e-2
        triton_ops.set_enabled(",".join(sorted(triton_ops.DEFAULT_ON | {"int4_xprep"})))
        assert [xprep.wanted(s) for s in ("qkv", "gate_up", "down", False)] == [True, True, True, False]
    finally:
        triton_ops.set_enabled(",".join(sorted(old)))


@needs_triton
@pytest.mark.parametrize("producer,n", [("rmsnorm", 520), ("add_rmsnorm", 1024), ("silu_and_mul", 2200)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_producers_write_the_prepared_form(producer, n, dtype):
    """RMSNorm, add+RMSNorm and SiLU·mul told that an int4 GEMV comes next write x's prepared form in
    their own kernel, bit for bit what x_prep makes of their output, and offer it for that output only."""
    from edgelm.layers.triton_ops import xprep
    from edgelm.layers.triton_ops.rmsnorm import rms_norm
    from edgelm.layers.triton_ops.silu_mul import silu_and_mul

    torch.manual_seed(n)
    x = _x(2 * n if producer == "silu_and_mul" else n, dtype, DEVICE)
    if producer == "silu_and_mul":
        out = silu_and_mul(x, prep=True)
    else:
        w = (torch.rand(n) + 0.5).to(dtype).to(DEVICE)
        res = torch.randn(1, n).to(dtype).to(DEVICE) if producer == "add_rmsnorm" else None
        out = rms_norm(x, w, 1e-5, res, prep=True)
        out = out[0] if res is not None else out
    got = xprep.take(out)
    assert got is not None and xprep.take(out) is None  # offered once, for this tensor
    got = tuple(t.clone() for t in got)
    want = xprep.x_prep(out)
    nb = want[1].numel()
    assert torch.equal(got[0][:nb * 64], want[0][:nb * 64])
    assert torch.equal(got[2], want[2])
    assert torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-3)  # block sums: another summation order


def test_take_only_the_offered_unchanged_tensor():
    from edgelm.layers.triton_ops import xprep

    a, b = torch.zeros(1, 256), torch.zeros(1, 256)
    xprep.offer(a, "bufs")
    assert xprep.take(b) is None and xprep.take(a) is None  # any take clears the offer
    xprep.offer(a, "bufs")
    assert xprep.take(a.view(256)[None]) == "bufs"  # a view of the same tensor
    xprep.offer(a, "bufs")
    a.add_(1)  # changed since it was offered
    assert xprep.take(a) is None


def test_mark_int4_producers():
    """The norms and SiLU·mul of a decoder layer are marked where their consumer is an int4 linear reading x
    as it is (no act-order permutation, groups of 128 or more, on the GPU kernels)."""
    from torch import nn

    from edgelm.layers.activation import SiluAndMul
    from edgelm.layers.layernorm import RMSNorm
    from edgelm.quantization.int4_linear import Int4Linear, mark_int4_producers

    def layer(group, perm=False):
        lin = {k: Int4Linear.from_linear(nn.Linear(256, 256), group) for k in ("qkv", "gu", "down")}
        for v in lin.values():
            v.cpu_weight = None  # as on the GPU
        if perm:
            lin["qkv"].input_perm = torch.arange(256)
        m = nn.Module()
        m.input_layernorm, m.post_attention_layernorm = RMSNorm(256), RMSNorm(256)
        m.self_attn, m.mlp = nn.Module(), nn.Module()
        m.self_attn.qkv_proj, m.mlp.gate_up_proj, m.mlp.down_proj, m.mlp.act_fn = lin["qkv"], lin["gu"], lin["down"], SiluAndMul()
        return m

    model = nn.ModuleList([layer(128), layer(128, perm=True), layer(64)])
    assert mark_int4_producers(model) == 5
    assert [(m.input_layernorm.int4_prep, m.post_attention_layernorm.int4_prep, m.mlp.act_fn.int4_prep)
            for m in model] == [("qkv", "gate_up", "down"), (False, "gate_up", "down"), (False, False, False)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k,config", [(6144, 4096, (8, 16, 1, 4, 2)), (4096, 4096, (8, 16, 1, 4, 1)),
                                        (28672, 4096, (16, 8, 1, 4)), (4096, 14336, (8, 16, 1, 4, 1)),
                                        (4096, 14336, (16, 8, 4, 4))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", [1, 2])
def test_gemv_h2_prep_gpu(n, k, config, dtype, form, xprep_on, monkeypatch):
    """The PTX of the prepared-x GEMV on the Llama-3.1-8B shapes: as close to dequantize-then-matmul as
    the plain gemv_h2 is (bf16: closer, its products carry 11 bits, not 8), an outlier included, and
    bit-identical run to run."""
    from edgelm.layers import triton_ops
    from edgelm.quantization import int4_ptx

    monkeypatch.setattr(int4_ptx, "PREP_FORM", form)
    torch.manual_seed(n + k)
    w = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, 128, "search", meta_precision=dtype)
    x = _x(k, dtype, "cuda")
    ref = reference(x, w)
    y = int4_ptx.gemv_h2(x, w, None, config)
    assert torch.equal(y, int4_ptx.gemv_h2(x, w, None, config))
    triton_ops.set_enabled(",".join(sorted(triton_ops.DEFAULT_ON)))
    plain = int4_ptx.gemv_h2(x, w, None, config)
    assert rel_err(y, ref) < 1e-2
    assert rel_err(y, ref) <= 1.5 * rel_err(plain, ref) + 1e-4, (rel_err(y, ref), rel_err(plain, ref))


@needs_triton
def test_model_decode_with_xprep_on_cpu(tmp_path, monkeypatch):
    """A qwen2 (q/k/v bias) int4wo-128 model decoding with int4_xprep on (every batch-1 GEMV on prepared x:
    on the CPU the prep kernel makes it, the plain-op twins compute) against int4_xprep off, fed the same
    tokens: decode logits within fp16 rounding, the same greedy tokens."""
    from edgelm.layers.triton_ops import xprep
    from tests.tiny_models import forced_decode_runs, int4_cpu_runner

    preps = []
    plain_prep = xprep.x_prep
    monkeypatch.setattr(xprep, "x_prep", lambda x: preps.append(x.shape[1]) or plain_prep(x))
    runs = forced_decode_runs(int4_cpu_runner(tmp_path, monkeypatch), ("0", "int4_xprep"))
    assert len(preps) >= 4 * 4  # four decode steps, every layer's GEMVs on prepared x
    for got, want in zip(runs[1][0][1:], runs[0][0][1:]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        assert int(got.argmax(-1)) == int(want.argmax(-1))
