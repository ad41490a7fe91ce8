"""The hand-written CUDA batch-1 int4 GEMV `cuda_w4` (edgelm.quantization.int4_cuda): its source compiles for
Orin (SM 8.7), Ampere and Hopper without spilling; calls it cannot take run gemv_h2; on a GPU it matches
dequantize-then-matmul (and gemv_h2) on the Llama-3.1-8B shapes and odd ones, inside CUDA graphs with PDL, and
in a model's graph decode."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from edgelm.quantization.int4_pack import quantize_int4
from tests.test_int4 import DEVICE, HAS_TRITON, _random_int4, reference, rel_err


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit) to compile the source")
@pytest.mark.parametrize("arch,k,config,f16,bias,pdl,xf16,silu", [
    ("87", 4096, (2, 2, 8), True, False, False, False, False),
    ("87", 4096, (2, 2, 8), True, True, False, True, False),
    ("80", 14336, (2, 4, 4), False, True, False, False, False),
    ("90", 4096, (1, 4, 8), True, True, True, False, False),
    ("90", 20480, (2, 2, 8), True, False, True, True, False),
    ("90", 4096, (2, 4, 4, 1), True, False, True, False, False),
    ("87", 14336, (2, 2, 8, 0, 4, 1), True, False, False, False, True),
    ("90", 14336, (2, 4, 4, 1, 4, 1), True, True, True, True, True),
    ("80", 4096, (1, 4, 8, 0, 2), False, True, False, False, False)])
def test_cuda_w4_source_compiles(tmp_path, arch, k, config, f16, bias, pdl, xf16, silu):
    """The source as gemv_w4 generates it compiles for SM 8.0 / 8.7 / 9.0 (PDL's instructions only from 9.0),
    split K and the SiLU·mul staging included, with no local-memory spills, and its static shared memory fits the
    48 KB a launch gets without opting in."""
    from edgelm.quantization.int4_cuda import source

    cu = tmp_path / "k.cu"
    cu.write_text(source(k, config, f16, bias, pdl, xf16, silu))
    out = subprocess.run(["nvcc", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(cu)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0 bytes spill stores" in out.stderr
    smem = int(re.search(r"(\d+) bytes smem", out.stderr).group(1))
    assert smem <= 48 * 1024


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit) to compile the source")
@pytest.mark.parametrize("arch,k,config,kw", [
    ("87", 4096, (2, 2, 8, 0, 1, 0, 1), {"norm": 2}),
    ("90", 4096, (2, 2, 8, 0, 1, 0, 1), {"norm": 1, "f16_x": True, "pdl_on": True}),
    ("87", 4096, (2, 2, 8), {"rope": (128, 4096, 1024), "norm": 2}),
    ("80", 4096, (2, 4, 4, 1, 1, 0, 0, 1), {"glu": True}),
    ("90", 4096, (4, 2, 8, 1, 1, 0, 1, 1), {"glu": True, "norm": 2, "has_bias": True, "pdl_on": True}),
    ("87", 4096, (2, 4, 4, 1, 1, 0, 1, 1), {"glu": True, "norm": 2, "f16_x": True}),
    ("87", 4096, (2, 4, 4, 1, 1, 0, 0, 1, 4), {"glu": True, "persist": True}),
    ("90", 14336, (2, 7, 4, 1, 1, 0, 0, 0, 3), {"persist": True, "pdl_on": True, "has_bias": True}),
    ("80", 14336, (1, 7, 4, 0, 1, 0, 0, 0, 4), {"persist": True, "f16_x": True}),
    # round 30's one-wave qkv_proj: 16 warps × 3 rows and 12 × 4, the whole K in flight (S = 4), with the norm
    ("90", 4096, (3, 4, 16, 0, 1, 0, 1), {"norm": 2, "pdl_on": True}),
    ("87", 4096, (4, 4, 12, 0, 1, 0, 1), {"norm": 2, "has_bias": True})])
def test_cuda_w4_feature_sources_compile(tmp_path, arch, k, config, kw):
    """The norm staging (with the residual add or alone), the rotary epilogue, the SiLU·mul epilogue (glu, with
    the norm too) and the persistent form compile for SM 8.0 / 8.7 / 9.0 without spills, within the static shared memory."""
    from edgelm.quantization.int4_cuda import source

    args = {"f16_scales": True, "has_bias": False, "pdl_on": False} | kw
    cu = tmp_path / "k.cu"
    cu.write_text(source(k, config, **args))
    out = subprocess.run(["nvcc", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(cu)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0 bytes spill stores" in out.stderr
    assert int(re.search(r"(\d+) bytes smem", out.stderr).group(1)) <= 48 * 1024


def test_cuda_w4_persistent_configs():
    """config[8] asks for the persistent form: taken where K's chunks of 1024 inputs are a multiple of S and K is not
    split; the launch grid is then capped at that many programs an SM."""
    from edgelm.quantization.int4_cuda_source import persistent, source

    assert persistent(4096, (2, 4, 4, 1, 1, 0, 0, 1, 4)) == 4  # 4 chunks, S 4
    assert persistent(4096, (2, 4, 4, 1, 1, 0, 0, 1)) == 0  # not asked
    assert persistent(14336, (2, 7, 4, 1, 1, 0, 0, 0, 3)) == 3  # 14 chunks, S 7
    assert persistent(14336, (2, 4, 4, 1, 1, 0, 0, 0, 3)) == 0  # 14 chunks, S 4: the ring would not line up
    assert persistent(4096, (2, 7, 4, 1, 1, 0, 0, 0, 3)) == 0  # S beyond the chunks
    assert persistent(4096, (2, 2, 4, 1, 2, 0, 0, 0, 3)) == 0  # split K
    assert "#define PERSIST 1" in source(4096, (2, 4, 4), True, False, False, persist=True)
    from edgelm.quantization.int4_cuda import persistent_grid

    # gate_up (14336 row pairs, one a warp), 4 programs of 4 warps on 132 SMs: 7 rounds, 512 programs, none idle
    assert persistent_grid(14336, 1, 4, 4, 132) == 512
    # down_proj rows one a warp, 3 an SM: 3 rounds of 1584 warp slots; 342 programs take them (the last 8 rows short)
    assert persistent_grid(4096, 1, 4, 3, 132) == 342
    assert persistent_grid(40, 2, 4, 4, 132) == 5  # fewer groups than warps: one round
    assert "#define PERSIST 0" in source(4096, (2, 4, 4), True, False, False)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_cuda_w4_falls_back_to_gemv_h2():
    """A call cuda_w4 cannot take (here: not on a CUDA device; on a GPU: fp16 x, groups of 64, K not a multiple of
    128) runs gemv_h2 with the config batch 1 would run otherwise: the very same numbers."""
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization.int4_cuda import gemv_w4, supported

    w = _random_int4(24, 384, 128, DEVICE, meta=torch.bfloat16)
    x = torch.randn(1, 384, device=DEVICE).to(torch.bfloat16)
    if DEVICE == "cpu":
        assert not supported(x, w)
    plain = kern.gemv_h2(x, w, None, kern.m1_unswept(24, 384)[1])
    assert torch.equal(gemv_w4(x, w, None, (2, 2, 8)), plain)
    assert rel_err(plain, reference(x, w, None)) < 1e-2


def test_cuda_w4_splits_and_silu_flag():
    """config[4] splits K over programs (down to a count dividing K's blocks of 128); config[5] hands down_proj
    gate ‖ up."""
    from edgelm.quantization.int4_cuda import splits, takes_silu

    assert splits(14336, (2, 2, 8)) == 1 and splits(14336, (2, 2, 8, 0, 4)) == 4
    assert splits(14336, (2, 2, 8, 0, 3)) == 2  # 112 blocks: 3 does not divide them
    assert splits(4096, (2, 2, 8, 1, 0)) == 1 and splits(384, (1, 2, 4, 0, 8)) == 3
    assert takes_silu((2, 2, 8, 0, 4, 1)) and not takes_silu((2, 2, 8, 0, 4)) and not takes_silu(None)
    from edgelm.quantization.int4_cuda import takes_glu

    assert takes_glu((2, 4, 4, 1, 1, 0, 0, 1)) and not takes_glu((2, 4, 4, 1, 1, 0, 1)) and not takes_glu(None)


def test_cuda_w4_calls_reach_the_kernel(monkeypatch):
    """Split K, the SiLU·mul staging and the norm staging each compile and launch cuda_w4 (no silent fallback);
    the norm with split K or with SiLU·mul, which the kernel does not take, falls back."""
    from edgelm.quantization import int4_cuda

    keys, launched = [], []
    monkeypatch.setattr(int4_cuda, "supported", lambda x, w: True)
    monkeypatch.setattr(int4_cuda, "_function", lambda device_index, key: keys.append(key) or object())
    monkeypatch.setattr(int4_cuda, "_launch", lambda *a, **kw: launched.append(a[5]))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    import edgelm.layers.triton_ops.pdl as pdl

    monkeypatch.setattr(pdl, "mode", lambda *a, **kw: 0)
    w = _random_int4(24, 512, 128, "cpu", meta=torch.bfloat16)
    x = torch.zeros(1, 512, dtype=torch.bfloat16)
    norm = int4_cuda.NormIn(torch.ones(512, dtype=torch.bfloat16), 1e-5, torch.zeros(1, 512, dtype=torch.bfloat16),
                            torch.zeros(1, 512, dtype=torch.bfloat16))
    int4_cuda.gemv_w4(x, w, None, (2, 2, 8, 0, 4))
    int4_cuda.gemv_w4(torch.zeros(1, 1024, dtype=torch.bfloat16), w, None, (2, 2, 8, 0, 2, 1), silu=True)
    int4_cuda.gemv_w4(x, w, None, (2, 2, 8, 0, 1, 0, 1), norm=norm)
    y = int4_cuda.gemv_w4(x, w, None, (2, 4, 4, 1, 1, 0, 1, 1), norm=norm, glu=True)
    assert y.shape == (1, 12)  # silu(gate) · up: half the rows
    assert [(k[1], k[6], k[8], k[9]) for k in keys] == [((2, 2, 8, 0, 4), False, 0, False),
                                                        ((2, 2, 8, 0, 2), True, 0, False),
                                                        ((2, 2, 8, 0, 1), False, 2, False),
                                                        ((2, 4, 4, 1, 1), False, 2, True)]
    assert len(launched) == 4
    monkeypatch.setattr(int4_cuda, "apply_norm", lambda x, n: x)  # (the fallback's norm: not what is tested)
    monkeypatch.setattr(int4_cuda, "supported", lambda x, w: False)  # gemv_h2 for the fallback below
    before = len(keys)
    monkeypatch.setattr(int4_cuda, "_kernel", lambda *a, **kw: keys.append("kernel") or None)
    if HAS_TRITON:
        int4_cuda.gemv_w4(x, w, None, (2, 2, 8, 0, 4, 0, 1), norm=norm)  # split K with the norm: not the kernel
        assert len(keys) == before


def test_apply_norm_matches_rmsnorm():
    """The norm done apart (where cuda_w4 cannot make it) gives RMSNorm's numbers and writes the residual sum."""
    from edgelm.layers.layernorm import RMSNorm
    from edgelm.quantization.int4_cuda import NormIn, apply_norm

    torch.manual_seed(3)
    norm = RMSNorm(256, 1e-5).to(torch.bfloat16)
    norm.weight.data = (1 + 0.1 * torch.randn(256)).to(torch.bfloat16)
    x, r = torch.randn(1, 256, dtype=torch.bfloat16), torch.randn(1, 256, dtype=torch.bfloat16)
    out = torch.empty_like(r)
    want, s = norm(x, r)
    assert torch.equal(apply_norm(x, NormIn(norm.weight, 1e-5, r, out)), want) and torch.equal(out, s)
    assert torch.equal(apply_norm(x, NormIn(norm.weight, 1e-5, None, None)), norm(x))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_cuda_w4_silu_fallback():
    """Where cuda_w4 cannot run, its SiLU·mul form runs torch's SiLU·mul, then gemv_h2: the numbers of the layer
    by layer path."""
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization.int4_cuda import gemv_w4

    w = _random_int4(24, 384, 128, DEVICE, meta=torch.bfloat16)
    gate_up = torch.randn(1, 768, device=DEVICE).to(torch.bfloat16)
    act = torch.nn.functional.silu(gate_up[:, :384]) * gate_up[:, 384:]
    plain = kern.gemv_h2(act, w, None, kern.m1_unswept(24, 384)[1])
    assert torch.equal(gemv_w4(gate_up, w, None, (2, 2, 8, 0, 3, 1), silu=True), plain)


def test_mlp_hands_gate_up_only_to_a_silu_kernel(monkeypatch):
    """LlamaMLP gives down_proj gate ‖ up only where down_proj takes it (an int4 batch-1 cuda_w4 with SILU on a
    GPU); on the CPU, or with another config, it runs SiLU·mul and the layer."""
    from edgelm.models.llama import LlamaMLP
    from edgelm.quantization.int4_linear import Int4Linear

    torch.manual_seed(0)
    mlp = LlamaMLP(256, 384)
    x = torch.randn(1, 256)
    ref = mlp.down_proj(mlp.act_fn(mlp.gate_up_proj(x)))
    assert torch.equal(mlp(x), ref)
    seen = []
    monkeypatch.setattr(Int4Linear, "forward_silu", lambda self, gu: seen.append(gu.shape) or torch.ones(1, 256))
    mlp.down_proj.__class__ = Int4Linear  # only forward_silu is reached before the result comes back
    assert torch.equal(mlp(x), torch.ones(1, 256)) and seen == [(1, 768)]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_cuda_w4_glu_fallback():
    """Where cuda_w4 cannot run (or the config has an odd R or split K), its glu form runs gemv_h2 on gate ‖ up,
    then torch's SiLU·mul: the numbers of the layer-by-layer path."""
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization.int4_cuda import gemv_w4, glu_runs

    w = _random_int4(48, 384, 128, DEVICE, meta=torch.bfloat16)
    x = torch.randn(1, 384, device=DEVICE).to(torch.bfloat16)
    gate_up = kern.gemv_h2(x, w, None, kern.m1_unswept(48, 384)[1])
    want = torch.nn.functional.silu(gate_up[:, :24]) * gate_up[:, 24:]
    for config in ((2, 4, 4, 1, 1, 0, 0, 1), (1, 4, 8, 0, 1, 0, 0, 1), (2, 2, 8, 0, 3, 0, 0, 1)):
        assert torch.equal(gemv_w4(x, w, None, config, glu=True), want)
    if DEVICE == "cpu":
        assert not glu_runs(x, w, (2, 4, 4, 1, 1, 0, 0, 1))


def test_mlp_takes_silu_from_a_glu_gate_up():
    """LlamaMLP runs down_proj straight on gate_up_proj's forward_glu where that returns silu(gate) · up (an int4
    batch-1 cuda_w4 with GLU on a GPU); where it returns None, the layer, SiLU·mul and down_proj as before."""
    from edgelm.models.llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(256, 384)
    x = torch.randn(1, 256)
    ref = mlp.down_proj(mlp.act_fn(mlp.gate_up_proj(x)))
    seen = []
    mlp.gate_up_proj.forward_glu = lambda x, norm_in=None: seen.append(x.shape) or None  # says no: the plain path
    assert torch.equal(mlp(x), ref) and seen == [(1, 256)]
    h = torch.randn(1, 384)
    mlp.gate_up_proj.forward_glu = lambda x, norm_in=None: seen.append(x.shape) or h
    assert torch.equal(mlp(x), mlp.down_proj(h))
    assert mlp(torch.randn(3, 256)).shape == (3, 256) and len(seen) == 2  # more rows: never asked


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_cuda_w4_fallback_under_a_loaded_dispatch(monkeypatch):
    """With a dispatch file loaded whose batch-1 bucket names another kernel (the role table emptied), the fallback
    runs gemv_h2 with its own default config, not the other kernel's."""
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization.int4_cuda import gemv_w4

    monkeypatch.setattr(kern, "DISPATCH", {1: ("tcw", (64, 4, 4))})
    monkeypatch.setattr(kern, "M1_BY_ROLE", {})
    w = _random_int4(24, 384, 128, DEVICE, meta=torch.bfloat16)
    x = torch.randn(1, 384, device=DEVICE).to(torch.bfloat16)
    assert torch.equal(gemv_w4(x, w, None, (2, 2, 8)), kern.gemv_h2(x, w, None, None))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_cuda_w4_compile_failure_falls_back(monkeypatch, caplog):
    """Where NVRTC or the driver refuses the kernel, the call runs gemv_h2, says so once, and the next call does
    not try again."""
    from edgelm.quantization import int4_cuda
    from edgelm.quantization import int4_kernels as kern

    calls = []

    def refuse(device_index, key):
        calls.append(key)
        raise RuntimeError("nvrtc: no")

    monkeypatch.setattr(int4_cuda, "supported", lambda x, w: True)
    monkeypatch.setattr(int4_cuda, "_function", refuse)
    monkeypatch.setattr(int4_cuda, "_BROKEN", set())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    w = _random_int4(24, 384, 128, DEVICE, meta=torch.bfloat16)
    x = torch.randn(1, 384, device=DEVICE).to(torch.bfloat16)
    plain = kern.gemv_h2(x, w, None, kern.m1_unswept(24, 384)[1])
    with caplog.at_level("WARNING"):
        assert torch.equal(int4_cuda.gemv_w4(x, w, None, (2, 2, 8)), plain)
        assert torch.equal(int4_cuda.gemv_w4(x, w, None, (2, 2, 8)), plain)
    assert len(calls) == 1 and "cuda_w4 (2, 2, 8) unavailable" in caplog.text


def _gpu():
    from edgelm.quantization.int4_cuda import supported

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    w = _random_int4(8, 128, 128, "cuda", meta=torch.bfloat16)
    if not supported(torch.zeros(1, 128, device="cuda", dtype=torch.bfloat16), w):
        pytest.skip("cuda_w4 not available here (torch without NVRTC, or a GPU before SM 8.0)")


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (40, 1024), (2048, 1536)])
@pytest.mark.parametrize("config", [(2, 2, 8), (1, 4, 8), (2, 4, 4), (4, 2, 4), (1, 2, 8, 1), (2, 2, 8, 0, 4),
                                    (2, 4, 4, 1, 2), (1, 2, 8, 0, 7),
                                    # persistent (config[8]; K = 1024 and, for S = 7, all but K = 14336 run one tile
                                    # a program)
                                    (1, 2, 4, 0, 1, 0, 0, 0, 2), (2, 7, 4, 1, 1, 0, 0, 0, 3), (4, 2, 4, 1, 1, 0, 0, 0, 1)])
def test_cuda_w4_matches_reference_gpu(n, k, config):
    """Against dequantize-then-matmul and gemv_h2, bf16 and fp16 activations, with and without bias, fp16 and bf16
    scales (rows not a multiple of a program's included)."""
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization.int4_cuda import gemv_w4

    _gpu()
    torch.manual_seed(n + k)
    for dtype, meta in ((torch.bfloat16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)):
        w = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, 128, "minmax", meta_precision=meta)
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        for bias in (None, torch.randn(n, device="cuda", dtype=dtype)):
            y = gemv_w4(x, w, bias, config)
            h2 = kern.gemv_h2(x, w, bias, kern.m1_unswept(n, k)[1])
            ref = reference(x, w, bias)
            assert y.dtype == dtype
            # the same per-word arithmetic as gemv_h2 (16-bit sums of four products): as close to the reference
            # as gemv_h2 is (on the H100 one (40, 1024) bf16 case of random data came to 0.0109)
            assert rel_err(y, ref) < max(1e-2, 1.5 * rel_err(h2, ref)), (dtype, meta, bias is not None)
            assert rel_err(y, h2) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,config", [(4096, 14336, (2, 2, 8, 0, 4, 1)), (4096, 14336, (2, 4, 4, 1, 1, 1)),
                                        (256, 512, (1, 2, 8, 0, 2, 1)), (40, 1024, (2, 2, 4, 0, 8, 1))])
def test_cuda_w4_silu_gpu(n, k, config):
    """down_proj on gate ‖ up: the same numbers as the SiLU·mul kernel then cuda_w4 on its output (within a
    rounding of SiLU's exponential), bf16 and fp16, with and without bias."""
    from edgelm.layers.triton_ops.silu_mul import silu_and_mul
    from edgelm.quantization.int4_cuda import gemv_w4

    _gpu()
    torch.manual_seed(n + k)
    for dtype in (torch.bfloat16, torch.float16):
        w = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, 128, "minmax")
        gate_up = torch.randn(1, 2 * k, device="cuda", dtype=dtype) * 2
        for bias in (None, torch.randn(n, device="cuda", dtype=dtype)):
            act = silu_and_mul(gate_up)
            y = gemv_w4(gate_up, w, bias, config, silu=True)
            two = gemv_w4(act, w, bias, config)
            assert rel_err(y, two) < 2e-3, (dtype, bias is not None)
            assert rel_err(y, reference(act, w, bias)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,config", [(28672, 4096, (2, 4, 4, 1, 1, 0, 0, 1)), (28672, 4096, (4, 2, 8, 1, 1, 0, 0, 1)),
                                        (1024, 256, (2, 2, 8, 0, 1, 0, 0, 1)), (1000, 384, (6, 2, 4, 0, 1, 0, 0, 1)),
                                        (28672, 4096, (2, 4, 4, 1, 1, 0, 0, 1, 4)), (1000, 384, (6, 1, 4, 0, 1, 0, 0, 1, 1)),
                                        (28672, 4096, (2, 4, 8, 1, 1, 0, 0, 1, 2))])
def test_cuda_w4_glu_gpu(n, k, config):
    """gate_up_proj with the SiLU·mul in its epilogue: silu(gate) · up [N / 2], the numbers of cuda_w4's plain output
    then the SiLU·mul kernel (within a rounding of SiLU's exponential), bf16 and fp16, with and without bias, rows
    not a multiple of a program's included; with the norm staging as well."""
    from edgelm.layers.layernorm import RMSNorm
    from edgelm.layers.triton_ops.silu_mul import silu_and_mul
    from edgelm.quantization.int4_cuda import NormIn, gemv_w4

    _gpu()
    torch.manual_seed(n + k)
    plain_cfg = config[:5]
    for dtype in (torch.bfloat16, torch.float16):
        w = quantize_int4(torch.randn(n, k, device="cuda") * 0.05, 128, "minmax")
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        for bias in (None, torch.randn(n, device="cuda", dtype=dtype)):
            y = gemv_w4(x, w, bias, config, glu=True)
            want = silu_and_mul(gemv_w4(x, w, bias, plain_cfg))
            assert y.shape == (1, n // 2) and y.dtype == dtype
            assert rel_err(y, want) < 2e-3, (dtype, bias is not None)
        norm = RMSNorm(k, 1e-5).to("cuda", dtype)
        norm.weight.data = (1 + 0.1 * torch.randn(k, device="cuda")).to(dtype)
        residual = torch.randn(1, k, device="cuda", dtype=dtype)
        normed, s = norm(x, residual)
        res_out = torch.empty_like(residual)
        y = gemv_w4(x, w, None, config[:6] + (1, 1) + config[8:], norm=NormIn(norm.weight, 1e-5, residual, res_out),
                    glu=True)
        assert torch.equal(res_out, s)
        assert rel_err(y, silu_and_mul(gemv_w4(normed, w, None, plain_cfg))) < 3e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (4, 2, 64)])
def test_cuda_w4_rope_gpu(dtype, heads, kv_heads, head_dim):
    """qkv_proj with the rotary and the KV write at its end: q comes back rotated, k rotated and v as it is land in
    the pool's row of the slot (nothing else written), as cuda_w4's plain output rotated in float32 gives them."""
    from edgelm.quantization.int4_cuda import gemv_w4, gemv_w4_rope
    from edgelm.quantization.int4_fused import RopeStore

    _gpu()
    torch.manual_seed(heads)
    qs, kvs, half = heads * head_dim, kv_heads * head_dim, head_dim // 2
    n, k = qs + 2 * kvs, 1024
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim)
    freqs = torch.outer(torch.arange(64, device="cuda").float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()
    w = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, 128, "minmax")
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    for bias in (None, torch.randn(n, device="cuda", dtype=dtype)):
        k_buf = torch.zeros(16, kv_heads, head_dim, device="cuda", dtype=dtype)
        v_buf = torch.zeros_like(k_buf)
        rope = RopeStore(torch.tensor([37], device="cuda"), cos_sin, head_dim, qs, kvs, k_buf, v_buf,
                         torch.tensor([5], device="cuda"))
        q = gemv_w4_rope(x, w, bias, (2, 2, 8), rope)
        assert q is not None and q.shape == (1, qs)
        plain = gemv_w4(x, w, bias, (2, 2, 8)).float()
        c, sn = cos_sin[37, :half], cos_sin[37, half:]

        def rotate(t, c=c, sn=sn):  # [heads, head_dim]
            x1, x2 = t[:, :half], t[:, half:]
            return torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn], dim=-1)

        want_q = rotate(plain[0, :qs].view(heads, head_dim)).to(dtype).view(1, qs)
        want_k = rotate(plain[0, qs:qs + kvs].view(kv_heads, head_dim)).to(dtype)
        assert rel_err(q, want_q) < 2e-3 and rel_err(k_buf[5], want_k) < 2e-3
        assert torch.equal(v_buf[5], plain[0, qs + kvs:].to(dtype).view(kv_heads, head_dim))
        others = [i for i in range(16) if i != 5]
        assert not k_buf[others].any() and not v_buf[others].any()
    assert gemv_w4_rope(x, w, None, (1, 2, 8), rope) is None  # a warp must hold a row pair
    assert gemv_w4_rope(x, w, None, (2, 2, 8, 0, 2), rope) is None  # no split K


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [(2, 2, 8, 0, 1, 0, 1), (2, 4, 4, 1, 1, 0, 1), (2, 2, 8, 0, 1, 0, 1, 0, 2)])
def test_cuda_w4_norm_gpu(dtype, config):
    """The RMSNorm (after the residual add, or alone) made while x is staged: the numbers of the add+RMSNorm kernel
    then cuda_w4 (within the norm's float32 reduction order), the residual sum written out exactly; with the
    rotary epilogue as well."""
    from edgelm.layers.layernorm import RMSNorm
    from edgelm.quantization.int4_cuda import NormIn, gemv_w4, gemv_w4_rope
    from edgelm.quantization.int4_fused import RopeStore

    _gpu()
    torch.manual_seed(1)
    n, k = 1536, 4096
    w = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, 128, "minmax")
    norm = RMSNorm(k, 1e-5).to("cuda", dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(k, device="cuda")).to(dtype)
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    residual = torch.randn(1, k, device="cuda", dtype=dtype) * 4
    normed, s = norm(x, residual)
    res_out = torch.empty_like(residual)
    y = gemv_w4(x, w, None, config, norm=NormIn(norm.weight, 1e-5, residual, res_out))
    assert torch.equal(res_out, s)
    assert rel_err(y, gemv_w4(normed, w, None, config)) < 2e-3
    y1 = gemv_w4(x, w, None, config, norm=NormIn(norm.weight, 1e-5, None, None))  # no residual: the norm alone
    assert rel_err(y1, gemv_w4(norm(x), w, None, config)) < 2e-3
    # qkv_proj's rotary epilogue on the normalised input
    heads, kv_heads, hd = 8, 2, 128
    cos_sin = torch.cat([torch.ones(8, hd // 2), torch.zeros(8, hd // 2)], dim=-1).to("cuda")  # angle 0
    k_buf = torch.zeros(4, kv_heads, hd, device="cuda", dtype=dtype)
    v_buf = torch.zeros_like(k_buf)
    rope = RopeStore(torch.tensor([3], device="cuda"), cos_sin, hd, heads * hd, kv_heads * hd, k_buf, v_buf,
                     torch.tensor([1], device="cuda"))
    res_out2 = torch.empty_like(residual)
    q = gemv_w4_rope(x, w, None, config, rope, norm=NormIn(norm.weight, 1e-5, residual, res_out2))
    assert q is not None and torch.equal(res_out2, s)
    plain = gemv_w4(normed, w, None, config)
    assert rel_err(q, plain[:, :heads * hd]) < 2e-3 and rel_err(k_buf[1].flatten(), plain[0, heads * hd:1280]) < 2e-3


@pytest.mark.gpu
def test_cuda_w4_split_k_in_cuda_graph_gpu():
    """Split K's counters are set back by the kernel: many replays of a graph holding two split launches of one
    shape (sharing their scratch) in a row, with PDL where the GPU has it, give the eager numbers every time."""
    from edgelm.quantization.int4_cuda import gemv_w4

    _gpu()
    w1 = quantize_int4(torch.randn(4096, 4096, device="cuda") * 0.02, 128, "minmax")
    w2 = quantize_int4(torch.randn(4096, 4096, device="cuda") * 0.02, 128, "minmax")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = (2, 2, 8, 0, 4)
    eager = gemv_w4(gemv_w4(x, w1, None, cfg), w2, None, cfg)
    assert rel_err(eager, reference(gemv_w4(x, w1, None, (2, 2, 8)), w2, None)) < 2e-2
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gemv_w4(gemv_w4(x, w1, None, cfg), w2, None, cfg)
        with torch.cuda.graph(graph, stream=stream):
            out = gemv_w4(gemv_w4(x, w1, None, cfg), w2, None, cfg)
    for _ in range(20):
        out.zero_()
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert torch.equal(gemv_w4(gemv_w4(x, w1, None, cfg), w2, None, cfg), eager)  # deterministic (split order)


@pytest.mark.gpu
def test_cuda_w4_fallback_gpu():
    """On the GPU, K not a multiple of 128 and x not 16-byte aligned go to gemv_h2's numbers; groups of 64 never
    reach cuda_w4."""
    from edgelm.quantization import int4_kernels as kern
    from edgelm.quantization.int4_cuda import gemv_w4, supported

    _gpu()
    w = quantize_int4(torch.randn(256, 1000, device="cuda") * 0.02, 128, "minmax")
    x = torch.randn(1, 1000, device="cuda", dtype=torch.bfloat16)
    assert not supported(x, w)
    assert torch.equal(gemv_w4(x, w, None, (2, 2, 8)), kern.gemv_h2(x, w, None, kern.m1_unswept(256, 1000)[1]))
    w = quantize_int4(torch.randn(256, 1024, device="cuda") * 0.02, 128, "minmax")
    x_off = torch.randn(1, 1025, device="cuda", dtype=torch.bfloat16)[:, 1:]  # 2 bytes past an aligned start
    assert not supported(x_off, w)
    assert torch.equal(gemv_w4(x_off, w, None, (2, 2, 8)), kern.gemv_h2(x_off, w, None, kern.m1_unswept(256, 1024)[1]))
    w64 = quantize_int4(torch.randn(6144, 4096, device="cuda") * 0.02, 64, "minmax")
    assert kern.choose_kernel(1, w64)[0] == "gemv_unit"  # (6144, 4096) names cuda_w4 for groups of 128


@pytest.mark.gpu
def test_cuda_w4_in_cuda_graph_gpu():
    """Two chained launches (the second reads the first's output) captured in a CUDA graph, with PDL where the
    GPU has it: the replay gives the eager numbers (the second waits for the first)."""
    from edgelm.quantization.int4_cuda import gemv_w4

    _gpu()
    w1 = quantize_int4(torch.randn(4096, 4096, device="cuda") * 0.02, 128, "minmax")
    w2 = quantize_int4(torch.randn(2048, 4096, device="cuda") * 0.02, 128, "minmax")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = gemv_w4(gemv_w4(x, w1, None, (2, 2, 8)), w2, None, (1, 4, 8, 1))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gemv_w4(gemv_w4(x, w1, None, (2, 2, 8)), w2, None, (1, 4, 8, 1))  # compiled before the capture
        with torch.cuda.graph(graph, stream=stream):
            out = gemv_w4(gemv_w4(x, w1, None, (2, 2, 8)), w2, None, (1, 4, 8, 1))
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_w4_model_decode_gpu(monkeypatch, dtype):
    """A tiny int4wo-128 Llama whose batch-1 linears all dispatch to cuda_w4 (down_proj split over K and taking
    gate ‖ up, qkv_proj and gate_up_proj making their RMSNorm and residual add, fp16's gate_up_proj the SiLU·mul in
    its epilogue): its graph decode's logits stay within the int4 kernels' rounding of gemv_h2's, step by step on the same tokens."""
    from edgelm.quantization import int4_kernels as kern
    from tests.test_cuda_graph import _greedy, _runner

    _gpu()
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.05, tie_word_embeddings=False)
    import tempfile

    path = tempfile.mkdtemp()
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    prompt = torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(7)).tolist()
    plain = _runner(path, "triton", dtype, torchao_config="int4wo-128")
    tokens_p, logits_p = _greedy(plain, [prompt], 8)
    table = {s: {1: ("cuda_w4", (2, 2, 8))} for s in [(512, 256), (256, 256), (1024, 256)]}
    table[(256, 512)] = {1: ("cuda_w4", (1, 2, 8, 0, 2, 1))}  # down_proj: split K, SiLU·mul made while staging
    table[(512, 256)] = {1: ("cuda_w4", (2, 2, 8, 0, 1, 0, 1))}  # qkv_proj, gate_up_proj: the RMSNorm while staging
    # gate_up_proj: fp16 also makes the SiLU·mul in its epilogue (then down_proj runs on its output, split K)
    table[(1024, 256)] = {1: ("cuda_w4", (2, 2, 8, 1, 1, 0, 1) + ((1,) if dtype == "float16" else ()))}
    monkeypatch.setattr(kern, "SHAPE_DISPATCH", table)
    cw = _runner(path, "triton", dtype, torchao_config="int4wo-128")
    lin = cw.model.model.layers[0].mlp.down_proj
    assert kern.choose_kernel(1, lin.packed) == ("cuda_w4", (1, 2, 8, 0, 2, 1))
    gate_up = torch.randn(1, 1024, device="cuda", dtype=getattr(torch, dtype))
    assert lin.forward_silu(gate_up) is not None  # the MLP hands down_proj gate ‖ up (bf16; fp16: GLU first)
    gu = cw.model.model.layers[0].mlp.gate_up_proj
    assert (gu.forward_glu(torch.randn(1, 256, device="cuda", dtype=getattr(torch, dtype))) is not None) == (
        dtype == "float16")
    tokens_c, logits_c = _greedy(cw, [prompt], 8, forced=tokens_p)
    for a, b in zip(logits_c, logits_p):
        assert rel_err(a, b) < 2e-2
    assert sum(int(a.argmax() == b.argmax()) for a, b in zip(logits_c, logits_p)) >= 7
