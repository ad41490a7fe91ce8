"""A GGUF's 4-bit linear weights loaded as stored (model_loader.gguf_int4): the block formats' codes, scales and
offsets unpacked against the gguf package's own dequantizer, the per-layer int4 / dense plan, and the embedded
Q4_1 model served that way by default (the same weights as dequantizing it, about half the bytes); the blocks
through the int4 kernels (the interpreter on a CPU; the GPU dispatch on a GPU)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from edgelm.model_loader import gguf_int4
from edgelm.quantization.int4_pack import dequantize_int4

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def _dense(codes, s, m):
    g = codes.shape[1] // s.shape[1]
    return codes.astype(np.float32) * np.repeat(s, g, axis=1) + np.repeat(m, g, axis=1)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
def test_q4_0_q4_1_unpack_equals_gguf_dequantize(qtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 320)) * 0.05 + rng.standard_normal((6, 1)) * 0.01).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    codes, s, m = gguf_int4.unpack(raw, qtype, 320)
    ref = gguf.quants.dequantize(raw, qtype).reshape(6, 320)
    assert codes.shape == (6, 320) and s.shape == (6, 10) and codes.max() <= 15
    np.testing.assert_array_equal(_dense(codes, s, m), ref)
    # into edgelm's layout (fp16 scale and offset: the file's own fp16 d and m, kept exactly; K padded to 384)
    packed = gguf_int4.to_int4_weight(codes, s, m, "cpu")
    assert packed.group_size == 32 and packed.in_features == 320 and packed.qweight.shape == (6, 384 // 8)
    torch.testing.assert_close(dequantize_int4(packed, torch.float32), torch.from_numpy(ref), atol=0, rtol=0)


def _q4_k_blocks(rows: int, supers: int, seed: int = 0) -> np.ndarray:
    """Random Q4_K super-blocks: fp16 d and dmin of a realistic size, random 6-bit scales / mins and codes."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(rows, supers, 144), dtype=np.uint8)
    b[..., 0:2] = np.float16(rng.uniform(1e-4, 3e-3, (rows, supers))).reshape(rows, supers, 1).view(np.uint8)
    b[..., 2:4] = np.float16(rng.uniform(1e-4, 3e-3, (rows, supers))).reshape(rows, supers, 1).view(np.uint8)
    return b.reshape(rows, supers * 144)


def test_q4_k_unpack_equals_gguf_dequantize():
    raw = _q4_k_blocks(5, 3)
    codes, s, m = gguf_int4.unpack(raw, T.Q4_K, 768)
    assert codes.shape == (5, 768) and s.shape == (5, 24) and m.shape == (5, 24)
    ref = gguf.quants.dequantize(raw, T.Q4_K).reshape(5, 768)
    np.testing.assert_allclose(_dense(codes, s, m), ref, rtol=1e-6, atol=1e-7)
    # every sub-block scale and min are used (not a constant), the codes span 0..15
    assert len(np.unique(s)) > 50 and codes.min() == 0 and codes.max() == 15
    # stored with fp16 scales and offsets: within half an fp16 ulp of each, times the code
    packed = gguf_int4.to_int4_weight(codes, s, m, "cpu")
    err = (dequantize_int4(packed, torch.float32) - torch.from_numpy(ref)).abs()
    bound = torch.from_numpy(np.repeat(np.abs(s) * 15 + np.abs(m), 32, axis=1)) * 2.0**-11
    assert bool((err <= bound + 1e-9).all())


def _write_gguf(path, tensors: dict[str, tuple[np.ndarray, object]]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        if qtype in (T.F32, T.F16):
            w.add_tensor(name, data.astype(np.float32 if qtype == T.F32 else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_plan_splits_layers_by_their_tensors_formats(tmp_path):
    """A layer is int4 only where every tensor merged into it is 4-bit: here v is Q8_0 (qkv_proj stays dense,
    as a Q4_K_M file's Q6_K v would keep it) and down is F16; o and gate ‖ up are int4."""
    rng = np.random.default_rng(1)
    w = lambda n, k: rng.standard_normal((n, k)).astype(np.float32) * 0.02  # noqa: E731
    path = tmp_path / "mixed.gguf"
    _write_gguf(path, {
        "token_embd.weight": (w(64, 128), T.Q8_0),
        "blk.0.attn_norm.weight": (np.ones(128, np.float32), T.F32),
        "blk.0.attn_q.weight": (w(128, 128), T.Q4_0), "blk.0.attn_k.weight": (w(64, 128), T.Q4_0),
        "blk.0.attn_v.weight": (w(64, 128), T.Q8_0), "blk.0.attn_output.weight": (w(128, 128), T.Q4_1),
        "blk.0.ffn_gate.weight": (w(256, 128), T.Q4_1), "blk.0.ffn_up.weight": (w(256, 128), T.Q4_0),
        "blk.0.ffn_down.weight": (w(128, 256), T.F16),
    })
    p = gguf_int4.plan(str(path))
    assert p.int4_modules == {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_up_proj"}
    assert p.dense_modules == {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.down_proj"}
    assert p.dense_types == ("F16", "Q8_0")
    assert p.int4_weights == 128 * 128 + 2 * 256 * 128
    int4_bytes, dense_bytes = p.loaded_bytes(2)
    assert int4_bytes == p.int4_weights // 2 + p.int4_weights // 32 * 4 and dense_bytes == 2 * p.int4_weights
    assert p.dense_weights == 128 * 128 + 2 * 64 * 128 + 128 * 256


def test_plan_log_points_at_int4wo_32_for_dense_layers(caplog):
    """Where a GGUF keeps layers dense (a Q4_K_M's Q6_K v / down), the start-up log says what
    --torchao-config int4wo-32 would save on them, unless a --torchao-config was given."""
    p = gguf_int4.GGUFInt4Plan(frozenset({"a"}), frozenset({"b"}), ("Q6_K",), 4096, 1024 * 1024)
    with caplog.at_level("INFO", logger="edgelm.model_loader.gguf_int4"):
        gguf_int4.log_plan(p, torch.float16)
    hint = [r.getMessage() for r in caplog.records if "int4wo-32" in r.getMessage()]
    saved = 2 * 1024 * 1024 - (1024 * 1024 // 2 + 1024 * 1024 // 32 * 4)
    assert hint == [f"GGUF: --torchao-config int4wo-32 would load those as int4 too (re-quantized from Q6_K, "
                    f"a small quality cost): {saved / 1e6:.0f} MB less"]
    caplog.clear()
    with caplog.at_level("INFO", logger="edgelm.model_loader.gguf_int4"):
        gguf_int4.log_plan(p, torch.float16, requantize_hint=False)
    assert not any("int4wo-32" in r.getMessage() for r in caplog.records)


def test_model_linear_names():
    assert gguf_int4.model_linear("model.layers.3.self_attn.k_proj.weight") == "model.layers.3.self_attn.qkv_proj"
    assert gguf_int4.model_linear("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.gate_up_proj"
    assert gguf_int4.model_linear("model.layers.3.mlp.down_proj.weight") == "model.layers.3.mlp.down_proj"
    assert gguf_int4.model_linear("model.layers.3.self_attn.q_proj.bias") is None
    assert gguf_int4.model_linear("model.embed_tokens.weight") is None


@pytest.mark.slow
def test_embedded_gguf_serves_its_q4_1_layers_as_stored(embedded_gguf):
    """By default the embedded Q4_1 model's 120 linear layers are int4 as stored: exactly the weights that
    dequantizing gives (--dequantize-gguf), at a fraction of the bytes; the prompt's logits agree with the
    dense run's (torch's CPU int4 kernel takes bf16 activations: close, not equal) and so do greedy tokens."""
    from edgelm.layers.linear import Linear
    from edgelm.quantization.int4_linear import Int4Linear
    from tests.tiny_models import Driver, make_runner

    int4 = make_runner(None, max_total_tokens=512, context_length=1024)
    dense = make_runner(None, max_total_tokens=512, context_length=1024, dequantize_gguf=True)
    assert int4.prequant is not None and int4.prequant.method == "gguf" and dense.prequant is None
    layers = {n: m for n, m in int4.model.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 120 and all(m.group_size == 32 for m in layers.values())
    assert not any(isinstance(m, Linear) for m in int4.model.modules())
    dense_layers = dict(dense.model.named_modules())
    for name, m in layers.items():
        assert torch.equal(dequantize_int4(m.packed, torch.float32), dense_layers[name].weight.float()), name
    assert int4.weight_bytes < 0.55 * dense.weight_bytes
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 2, 198, 1, 4093, 198, 19161, 253, 421,
              30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198]
    (t_int4,), l_int4 = Driver(int4).greedy([prompt], 12)
    (t_dense,), l_dense = Driver(dense).greedy([prompt], 12)
    assert t_int4 == t_dense
    for a, b in zip(l_int4, l_dense):
        assert (a[0] - b[0]).abs().max().item() < 1.0  # (0.15-0.4 measured, logits up to ~25)


def test_quantization_gguf_flag_checks(tmp_path):
    from edgelm.server_args import ServerArgs, ServerArgsError
    from tests.tiny_models import make_checkpoint, make_runner

    with pytest.raises(ServerArgsError, match="dequantize-gguf"):
        ServerArgs(quantization="gguf", dequantize_gguf=True)
    make_checkpoint("llama", tmp_path)
    with pytest.raises(ValueError, match="needs a .gguf"):
        make_runner(str(tmp_path), quantization="gguf")


def _q4_weight(qtype, n: int, k: int, device):
    rng = np.random.default_rng(n + k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    raw = _q4_k_blocks(n, k // 256) if qtype == T.Q4_K else gguf.quants.quantize(w, qtype)
    packed = gguf_int4.to_int4_weight(*gguf_int4.unpack(raw, qtype, k), device)
    return packed, torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k)).double()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_q4_blocks_through_the_int4_gemv_small(qtype):
    """A GGUF layer's repacked blocks through the batch-1 int4 kernel (group 32; the interpreter on a CPU) equal
    x times the gguf package's dequantized weight."""
    from edgelm.quantization import int4_kernels as kern

    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed, ref_w = _q4_weight(qtype, 24, 512, device)
    x = torch.randn(1, 512, device=device).to(torch.float16)
    y = kern.gemv_unit(x, packed, None, (16, 1, 3, 4, 0))
    ref = x.double().cpu() @ ref_w.T
    assert float((y.double().cpu() - ref).norm() / ref.norm()) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_q4_blocks_through_the_int4_kernels_gpu(qtype, dtype):
    """The same through the GPU dispatch (int4_linear: every row count's kernel), Llama-3.1-8B's o_proj shape."""
    from edgelm.quantization.int4_kernels import int4_linear

    packed, ref_w = _q4_weight(qtype, 4096, 4096, "cuda")
    for m in (1, 2, 8, 32, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=dtype)
        y = int4_linear(x, packed, None)
        ref = x.double().cpu() @ ref_w.T
        assert float((y.double().cpu() - ref).norm() / ref.norm()) < 1e-2, m


def _mixed_gguf(src: str, path) -> str:
    """The embedded model cut to its first two layers, with layer 0's attn_v re-encoded as Q8_0 and layer 1's
    ffn_down as F16 (what a Q4_K_M file's Q6_K v / down do to edgelm: those layers cannot load as stored)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(src)
    writer = gguf.GGUFWriter(str(path), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = 2 if field.name == "llama.block_count" else field.contents()
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= 2:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        if t.name in ("blk.0.attn_v.weight", "blk.1.ffn_down.weight"):
            dense = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            if t.name == "blk.0.attn_v.weight":
                writer.add_tensor(t.name, gguf.quants.quantize(dense, T.Q8_0), raw_dtype=T.Q8_0)
            else:
                writer.add_tensor(t.name, dense.astype(np.float16))
        elif t.tensor_type in (T.F32, T.F16):
            writer.add_tensor(t.name, np.asarray(t.data).reshape(shape))
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.mark.slow
def test_mixed_gguf_layers_as_stored_dense_or_quantized(embedded_gguf, tmp_path):
    """A GGUF whose layer-0 v is Q8_0 and layer-1 down F16: by default those two layers load dequantized and the
    rest as stored; with --torchao-config int4wo-32 every layer is int4, the 4-bit ones still as stored (the same
    tensors as by default) and only those two quantized as they load. Each run's greedy tokens and logits agree
    with the all-dequantized run's."""
    from edgelm.layers.linear import Linear
    from edgelm.quantization.int4_linear import Int4Linear
    from tests.tiny_models import Driver, make_runner

    path = _mixed_gguf(embedded_gguf, tmp_path / "mixed.gguf")
    kw = {"max_total_tokens": 512, "context_length": 512}
    default = make_runner(path, **kw)
    dense = make_runner(path, dequantize_gguf=True, **kw)
    int4wo = make_runner(path, torchao_config="int4wo-32", **kw)
    kept = {"model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"}
    mods = dict(default.model.named_modules())
    assert {n for n, m in mods.items() if isinstance(m, Linear)} == kept
    assert len([m for m in mods.values() if isinstance(m, Int4Linear)]) == 6
    assert default.prequant.stored_int4 == {n for n, m in mods.items() if isinstance(m, Int4Linear)}
    q_mods = dict(int4wo.model.named_modules())
    assert not any(isinstance(m, Linear) for m in q_mods.values())
    for name in default.prequant.stored_int4:
        for piece in ("qweight", "scales", "offsets"):
            assert torch.equal(getattr(q_mods[name], piece), getattr(mods[name], piece)), (name, piece)
    prompt = list(range(200, 230))
    (ref,), ref_logits = Driver(dense).greedy([prompt], 8)
    for runner in (default, int4wo):
        (tokens,), logits = Driver(runner).greedy([prompt], 8)
        assert tokens == ref
        assert max((a[0] - b[0]).abs().max().item() for a, b in zip(logits, ref_logits)) < 0.75  # (0.07-0.24 seen)
