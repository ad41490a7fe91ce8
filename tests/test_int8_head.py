"""--quantize-lm-head int8 (edgelm.quantization.int8_head): the quantizer, the Triton kernel (under TRITON_INTERPRET
on the CPU, on the GPU where there is one), torch's CPU path, the model wiring and the memory arithmetic."""

from __future__ import annotations

import os

import pytest
import torch

from edgelm.quantization import int8_head
from edgelm.quantization.int8_head import HeadConfig, Int8Head, int8_head_matmul, quantize_rows
from tests.tiny_models import Driver, make_checkpoint, make_runner

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="the Triton kernel on the CPU needs TRITON_INTERPRET=1")


def _ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.double() @ (q.double() * scale.double()[:, None]).t()


def test_quantize_rows_round_trip():
    torch.manual_seed(0)
    w = torch.randn(37, 50) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different sizes
    w[5] = 0  # an all-zero row
    q, scale = quantize_rows(w, chunk=8)  # several chunks, the last one short
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
    assert int(q.abs().max()) == 127 and scale[5] == 1 and not q[5].any()
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5)).all())  # round to nearest: half a step at most
    assert bool((q.abs().amax(dim=1)[torch.arange(37) != 5] == 127).all())  # each row uses its full range


def test_head_config_parse_and_override(monkeypatch):
    cfg = HeadConfig.parse("reduce_n8_k2048_w4_s3")
    assert cfg == HeadConfig(8, 2048, 4, 3, "reduce") and cfg.name == "reduce_n8_k2048_w4_s3"
    with pytest.raises(ValueError):
        HeadConfig.parse("tile_n8_k2048_w4_s3")
    monkeypatch.setenv("EDGELM_INT8_HEAD_CONFIG", "reduce_n4_k4096_w4_s2,dot_n32_k256_w4_s4")
    assert int8_head.head_config(1, torch.device("cuda")).name == "reduce_n4_k4096_w4_s2"
    assert int8_head.head_config(8, torch.device("cuda")).name == "dot_n32_k256_w4_s4"
    monkeypatch.delenv("EDGELM_INT8_HEAD_CONFIG")
    assert not int8_head.head_config(1, torch.device("cuda")).use_dot
    assert int8_head.head_config(32, torch.device("cuda")).use_dot


@needs_interpreter
@pytest.mark.parametrize("m,n,k,cfg", [
    (1, 100, 96, None),  # the CPU default tiles: N and K not multiples of them
    (3, 70, 130, None),  # several rows, the dot form
    (1, 64, 256, HeadConfig(8, 128, 1, 1, "reduce")),  # even K, two tiles (the next one loaded ahead)
    (1, 64, 256, HeadConfig(8, 64, 1, 1, "acc")),  # the elementwise accumulator
    (1, 50, 200, HeadConfig(8, 64, 1, 1, "acc")),  # ... with a K tail
    (1, 64, 256, HeadConfig(8, 64, 1, 1, "magic")),  # bytes made floats by bit operations, several word tiles
    (1, 33, 132, HeadConfig(16, 64, 1, 1, "magic")),  # ... with a word tail and an N tail
    (1, 20, 130, HeadConfig(16, 64, 1, 1, "magic")),  # K not a multiple of 4: falls back to acc
    (5, 48, 200, HeadConfig(16, 64, 1, 1, "reduce")),  # reduce form over several rows
    (3, 48, 200, HeadConfig(16, 64, 1, 1, "magic")),  # one-row forms with several rows: reduce
    (40, 40, 64, HeadConfig(16, 32, 1, 1, "dot")),  # more rows than one M tile (the grid's second axis)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_dequantized_matmul_interpreted(m, n, k, cfg, dtype):
    torch.manual_seed(n + m)
    q, scale = quantize_rows(torch.randn(n, k))
    q[0, :4] = torch.tensor([-127, 127, 0, -1], dtype=torch.int8)  # the extremes of the magic conversion
    x = torch.randn(m, k).to(dtype)
    out = int8_head_matmul(x, q, scale, cfg)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    ref = _ref(x, q, scale)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_int8_head_cpu_path_close_to_dense():
    """torch's _weight_int8pack_mm on bf16 inputs: within bf16 rounding of the float32 product."""
    torch.manual_seed(1)
    w = torch.randn(300, 64) * 0.05
    head = Int8Head(w)
    x = torch.randn(2, 3, 64)
    out = head(x)
    assert out.shape == (2, 3, 300) and out.dtype == torch.float32
    ref = _ref(x.reshape(-1, 64), head.qweight, head.scale).view(2, 3, 300)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
    assert float((head.dequantized() - w).abs().max()) <= float(head.scale.max()) / 2 * 1.001


@pytest.mark.parametrize("family", ["llama", "llama3"])  # untied head; tied to the embedding
def test_model_with_int8_head(tmp_path, family):
    """The runner quantizes the head after loading: greedy tokens equal the unquantized model's on a tiny
    checkpoint, logits close; an untied 16-bit head is freed, a tied embedding kept for the lookups."""
    from edgelm.bench_one_batch import decode_weight_bytes
    from edgelm.model_executor.weight_bytes import estimate_weight_bytes

    make_checkpoint(family, tmp_path)
    plain = make_runner(str(tmp_path))
    quant = make_runner(str(tmp_path), quantize_lm_head="int8")
    head = quant.model.head_quant
    assert isinstance(head, Int8Head) and head.qweight.shape == (384, 64)
    if family == "llama":  # untied: the 16-bit head freed, the embedding kept
        assert quant.model.lm_head is None and plain.model.lm_head is not None
        assert torch.equal(quant.model.model.embed_tokens.weight, plain.model.model.embed_tokens.weight)
    else:  # tied: the embedding reads the int8 table, its 16-bit one freed
        assert isinstance(quant.model.model.embed_tokens, int8_head.Int8Embedding)
        assert not any(p.dim() == 2 and p.shape[0] == 384 for p in quant.model.parameters())
        ids = torch.tensor([0, 5, 383, 5])
        rows = quant.model.model.embed_tokens(ids)
        assert rows.dtype == plain.model.model.embed_tokens.weight.dtype
        assert torch.allclose(rows, plain.model.model.embed_tokens(ids), atol=float(head.scale.max()) / 2 * 1.001)
    with pytest.raises(RuntimeError, match="quantized"):
        _ = quant.model.lm_head_weight
    prompts = [[5, 17, 99, 3, 250, 11, 42, 7, 300, 1], [7, 8, 9, 120, 64]]
    drivers = Driver(plain), Driver(quant)
    logits_p, logits_q = (d.extend(d.add_requests(2), prompts, return_all_logits=True) for d in drivers)
    assert logits_q.shape == (15, 384) and logits_q.dtype == torch.float32
    assert float((logits_p - logits_q).norm() / logits_p.norm()) < 2e-2
    assert float((logits_p.argmax(-1) == logits_q.argmax(-1)).float().mean()) >= 0.9  # a random model's close calls
    step_p, step_q = (d.decode([0, 1], [3, 4]) for d in drivers)  # a decode step takes the same head
    assert float((step_p - step_q).norm() / step_p.norm()) < 2e-2
    # what a decode step reads: the int8 head (+ its scales) instead of the 16-bit one, no embedding table
    vocab, hidden = 384, 64
    elem = plain.model.model.embed_tokens.weight.element_size()
    assert decode_weight_bytes(plain.model) - decode_weight_bytes(quant.model) == vocab * hidden * (elem - 1) - vocab * 4
    # the memory estimate the planner uses matches what was loaded
    cfg = quant.model_config.hf_config
    est_p = estimate_weight_bytes(cfg, "float32", "", "cpu")
    est_q = estimate_weight_bytes(cfg, "float32", "", "cpu", "int8")
    extra = vocab * hidden + vocab * 4 - vocab * hidden * 4  # int8 + scales in place of a float32 table
    assert est_q - est_p == extra
    assert quant.weight_bytes - plain.weight_bytes == extra


def test_refused_values():
    int8_head.check_lm_head_quant("none", "cpu")
    int8_head.check_lm_head_quant("int8", "cpu")
    with pytest.raises(ValueError, match="int4"):
        int8_head.check_lm_head_quant("int4", "cpu")


def test_server_flag():
    from edgelm.server_args import ServerArgs, prepare_server_args

    assert ServerArgs().quantize_lm_head == "none"
    assert prepare_server_args(["--quantize-lm-head", "int8"]).quantize_lm_head == "int8"
    with pytest.raises(SystemExit):
        prepare_server_args(["--quantize-lm-head", "int4"])


def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 8, 32, 100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_gpu(m, dtype):
    """The shipped configs (and every candidate at M = 1 / the dot ones above) on a 128256 × 4096 head's slice."""
    _gpu()
    torch.manual_seed(m)
    n, k = 20000, 4096
    q, scale = quantize_rows(torch.randn(n, k, device="cuda", dtype=dtype) * 0.02)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = _ref(x, q, scale)
    configs = [None] + ([c for c in int8_head.CANDIDATES if m == 1 or c.use_dot or m <= 4] if m <= 32 else [])
    for cfg in configs:
        out = int8_head_matmul(x, q, scale, cfg)
        assert bool(torch.isfinite(out).all()), cfg
        assert float((out.double() - ref).norm() / ref.norm()) < 2e-3, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,family", [("bfloat16", "llama"), ("float16", "llama"), ("bfloat16", "llama3")])
def test_graph_decode_with_int8_head_gpu(tmp_path, dtype, family):
    """A tiny model's CUDA-graph decode (batch 1 with PDL where the GPU has it, batch 3) with the int8 head (llama3:
    tied, the embedding read from the int8 table too): greedy tokens mostly those of the 16-bit head's run on forced
    inputs, logits close."""
    from tests.test_cuda_graph import _greedy, _runner

    _gpu()
    make_checkpoint(family, tmp_path)
    for prompts in ([[5, 17, 99, 3, 250]], [[5, 17, 99], [1, 2, 3, 4], [300]]):
        plain = _runner(str(tmp_path), "triton", dtype)
        tokens_p, logits_p = _greedy(plain, prompts, 6)
        quant = _runner(str(tmp_path), "triton", dtype, quantize_lm_head="int8")
        assert quant.cuda_graph_runner is not None and quant.model.head_quant is not None
        tokens_q, logits_q = _greedy(quant, prompts, 6, forced=tokens_p)
        for a, b in zip(logits_p, logits_q):
            assert float((a.float() - b).norm() / a.float().norm()) < 3e-2
        agree = sum(x == y for p, q in zip(tokens_p, tokens_q) for x, y in zip(p, q))
        assert agree >= 0.9 * sum(len(p) for p in tokens_p)
