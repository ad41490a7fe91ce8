"""The fused forms of the int4 GEMV (edgelm.quantization.int4_fused, triton_ops "fused_int4" and
"int4_rope") against the unfused ops they replace: the kernel's plain-op path under TRITON_INTERPRET on
the CPU, its inline-PTX path on the Llama-3.1-8B shapes on a GPU, and the batch-1 decoder layer of a
tiny model end to end on the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.test_int4 import DEVICE, HAS_TRITON, _random_int4, reference, rel_err


def _check_gemv_h2_fused(n, k, group, config, dtype, device):
    """gemv_h2_fused's three forms against the unfused ops: RMSNorm then the GEMV; the GEMV added to
    a residual in place; RMSNorm, gate ‖ up, then SiLU·mul (the fused decoder layer's gate_up)."""
    from edgelm.layers.layernorm import rms_norm_ref
    from edgelm.quantization.int4_fused import gemv_h2_fused

    torch.manual_seed(0)
    w = _random_int4(n, k, group, device, meta=dtype)
    bias = torch.randn(n, device=device).to(dtype)
    residual = (3 * torch.randn(1, k, device=device)).to(dtype)
    nw = (1 + 0.3 * torch.randn(k, device=device)).to(dtype)
    normed = rms_norm_ref(residual, nw, 1e-5)
    expect = reference(normed, w, bias)
    for _ in range(2):
        assert rel_err(gemv_h2_fused(residual, w, bias, config, norm=(nw, 1e-5)), expect) < 1e-2
    x = torch.randn(1, k, device=device).to(dtype)
    y = reference(x, w, bias).to(dtype)
    stream = (0.5 * torch.randn(1, n, device=device)).to(dtype)
    out = stream.clone()
    assert gemv_h2_fused(x, w, bias, config, out=out) is out
    assert rel_err(out.double() - stream.double(), ((y.double() + stream.double()).to(dtype).double()
                                                     - stream.double())) < 1e-2
    gate, up = expect.to(dtype).float().chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate).to(dtype).float() * up).to(dtype)
    got = gemv_h2_fused(residual, w, bias, config, norm=(nw, 1e-5), silu_pairs=True)
    # (silu(g)·u near g = 0 or u = 0 magnifies the kernel's rounding: a looser bound; 30 seeds: at most 0.024)
    assert got.shape == (1, n // 2) and rel_err(got, act) < 4e-2
    with pytest.raises(ValueError):
        gemv_h2_fused(residual, w, bias, config, norm=(nw, 1e-5), out=residual)


def _check_gemv_h2_rope(heads, kv_heads, head_dim, k, config, dtype, device, norm=True):
    """gemv_h2_fused's q ‖ k ‖ v epilogue (RMSNorm in where `norm`, rotary and KV write out) against the
    unfused ops: the GEMV, the rotary (torch path), k and v stored at the token's slot, no other slot touched."""
    from edgelm.layers.layernorm import rms_norm_ref
    from edgelm.layers.rotary import RotaryEmbedding
    from edgelm.quantization.int4_fused import RopeStore, gemv_h2_fused

    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    torch.manual_seed(0)
    w = _random_int4(q_size + 2 * kv_size, k, 128, device, meta=dtype)
    bias = torch.randn(q_size + 2 * kv_size, device=device).to(dtype)
    residual = (3 * torch.randn(1, k, device=device)).to(dtype)
    nw = (1 + 0.3 * torch.randn(k, device=device)).to(dtype)
    qkv = reference(rms_norm_ref(residual, nw, 1e-5) if norm else residual, w, bias).to(dtype)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0).to(device)
    positions = torch.tensor([37], device=device)
    q_ref, k_ref = rotary.forward_native(positions, *qkv[:, :q_size + kv_size].split([q_size, kv_size], dim=-1))
    k_buf = torch.zeros(6, kv_heads, head_dim, device=device, dtype=dtype)
    v_buf = torch.zeros_like(k_buf)
    slots = torch.tensor([4], device=device)
    rope = RopeStore(positions, rotary.cos_sin_cache, head_dim, q_size, kv_size, k_buf, v_buf, slots)
    q = gemv_h2_fused(residual, w, bias, config, norm=(nw, 1e-5) if norm else None, rope=rope)
    assert q.shape == (1, q_size)
    assert rel_err(q, q_ref) < 1e-2
    assert rel_err(k_buf[4].reshape(1, -1), k_ref) < 1e-2
    assert rel_err(v_buf[4].reshape(1, -1), qkv[:, q_size + kv_size:]) < 1e-2
    assert not k_buf[:4].any() and not v_buf[5:].any()


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("heads,kv_heads,head_dim,config,dtype,norm", [(3, 1, 16, (8, 2, 1, 4), torch.bfloat16, True),
                                                                       (2, 1, 12, (16, 2, 1, 4, 2), torch.float16, True),
                                                                       (3, 1, 16, (8, 2, 1, 4, 1), torch.float16, False),
                                                                       (3, 1, 16, (8, 2, 1, 4, 4), torch.bfloat16, True)])
def test_gemv_h2_rope_small(heads, kv_heads, head_dim, config, dtype, norm):
    """The fused qkv_proj's rotary + KV-write epilogue (plain-op path): pairs of a head across row
    tiles, a tile past the last pair, head_dim / 2 not a power of two, with and without the norm."""
    _check_gemv_h2_rope(heads, kv_heads, head_dim, 300, config, dtype, DEVICE, norm)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("group,n,k,config,dtype", [(128, 40, 300, (8, 2, 1, 4), torch.bfloat16),
                                                    (128, 44, 2200, (8, 4, 1, 4, 2), torch.float16),
                                                    (256, 40, 1000, (16, 2, 1, 4, 1), torch.bfloat16),
                                                    (128, 44, 2200, (8, 4, 1, 4, 3), torch.bfloat16)])
def test_gemv_h2_fused_small(group, n, k, config, dtype):
    """The fused decoder layer's int4 GEMV (its plain-op path here): row tiles past N, K not a
    multiple of the tile, each weight-prefetch mode."""
    _check_gemv_h2_fused(n, k, group, config, dtype, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
def test_gemv_h2_rope_gpu(dtype, norm):
    """The rotary + KV-write epilogue's inline-PTX path on Llama-3.1-8B's qkv_proj (32 + 8 + 8 heads of 128)."""
    _check_gemv_h2_rope(32, 8, 128, 4096, (8, 16, 1, 4, 2), dtype, "cuda", norm)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,config", [(6144, 4096, (8, 16, 1, 4, 2)), (4096, 4096, (8, 16, 1, 4, 1, 1)),
                                        (28672, 4096, (16, 8, 1, 4)), (4096, 14336, (8, 16, 1, 4, 1)),
                                        (6144, 4096, (8, 16, 1, 4, 4)), (4096, 14336, (8, 16, 1, 4, 3))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_h2_fused_gpu(n, k, config, dtype):
    """gemv_h2_fused's inline-PTX path on the Llama-3.1-8B shapes and shipped configs."""
    _check_gemv_h2_fused(n, k, 128, config, dtype, "cuda")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("op", ["fused_int4", "int4_rope"])
def test_fused_int4_layer_matches_unfused_on_cpu(tmp_path, monkeypatch, op):
    """The batch-1 decoder layer with its norms, SiLU·mul, residual adds and rotary + KV write inside
    its four gemv_h2 launches (triton_ops "fused_int4"), or only the rotary + KV write in qkv_proj's
    ("int4_rope"), the kernels' plain-op path on the CPU (EDGELM_INT4_CPU=triton, torch_native
    attention), against the layer-by-layer path: decode logits of a qwen2 (q/k/v bias) int4wo-128
    model, fed the same tokens, are the same to the bit (fp16: the interpreter rounds to bf16 otherwise
    than torch)."""
    from edgelm.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from tests.tiny_models import forced_decode_runs, int4_cpu_runner

    backend_writes = []  # decode steps whose K/V the attention backend wrote (not qkv_proj's kernel)
    plain_decode = TorchNativeAttnBackend.forward_decode
    monkeypatch.setattr(TorchNativeAttnBackend, "forward_decode",
                        lambda self, q, *a: backend_writes.append(q.shape[0]) or plain_decode(self, q, *a))

    runner = int4_cpu_runner(tmp_path, monkeypatch)
    runs = forced_decode_runs(runner, ("0", op), before_run=backend_writes.clear)
    plans = runner.model.model._fused_plans
    if op == "fused_int4":
        assert any(k[0] == 1 and k[-1] and v is not None and v.int4 for k, v in plans.items()), plans
    assert all(v is None for k, v in plans.items() if not k[-1])
    assert backend_writes == []  # the op's run: qkv_proj's kernel wrote every decode step's K/V
    for got, want in zip(runs[1][0][1:], runs[0][0][1:]):
        assert torch.equal(got, want)
