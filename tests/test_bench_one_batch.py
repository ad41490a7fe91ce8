"""bench_one_batch on the CPU: a tiny config with dummy weights runs and writes valid JSON."""

import json
import os

import pytest
import torch

from edgelm import bench_one_batch
from edgelm.bench_one_batch import decode_weight_bytes, prefill_flops, shipped_config_dir


def _tiny_config_dir(path, tie: bool):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=tie).save_pretrained(str(path))
    return str(path)


def test_bench_writes_json(tmp_path):
    model_dir = _tiny_config_dir(tmp_path / "tiny", tie=False)
    result_file = tmp_path / "out" / "result.json"
    report = bench_one_batch.main(["--model-path", model_dir, "--load-format", "dummy", "--device", "cpu",
                                   "--batch-size", "1", "3", "--input-len", "16", "--output-len", "5",
                                   "--result-file", str(result_file)])
    data = json.loads(result_file.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["command"].startswith("python -m edgelm.bench_one_batch --model-path")
    for key in ("device", "date", "versions", "dtype", "attention_backend", "weight_bytes", "peaks"):
        assert data[key] is not None, key
    assert data["versions"]["torch"] == torch.__version__
    assert data["peaks"]["bandwidth_gbps"] > 0 and data["peaks"]["matmul_tflops"] > 0
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in data["results"]] == [(1, 16, 5), (3, 16, 5)]
    for r in data["results"]:
        assert not r["cuda_graph"]
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["decode_median_latency_s"] > 0
        assert 0 < r["decode_roofline_ratio"] and 0 < r["prefill_matmul_fraction"]
        kv_per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, float32
        assert r["decode_kv_bytes_per_step"] == pytest.approx(r["batch_size"] * (16 + 1 + 1.5) * kv_per_token)


def test_shipped_llama_config():
    from transformers import AutoConfig

    path = shipped_config_dir("llama-3.1-8b")
    assert path is not None and shipped_config_dir("no-such-model") is None
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.max_position_embeddings == 131072 and cfg.num_key_value_heads == 8
    rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0


@pytest.mark.parametrize("tie", [False, True])
def test_model_arithmetic(tmp_path, tie):
    from edgelm.model_config import ModelConfig
    from edgelm.model_loader.loader import load_model
    from edgelm.model_loader.resolve import resolve_model

    config = ModelConfig.load(resolve_model(_tiny_config_dir(tmp_path, tie)), "float32", "cpu", None)
    model = load_model(config, "cpu", "dummy")
    embed = 256 * 64 * 4
    layers = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 2 * 64 * 128 + 128 * 64)  # qkv, o, gate_up, down
    norms = (2 * 2 + 1) * 64
    # the head is read once per step; an untied embedding table is not read
    assert decode_weight_bytes(model) == (layers + norms) * 4 + embed
    flops = prefill_flops(model, config, batch_size=2, input_len=8)
    # matmuls on 16 tokens, the LM head on the 2 last ones, causal attention over 8·9/2 pairs each
    assert flops == 2 * layers * 16 + 2 * 256 * 64 * 2 + 4 * 4 * 16 * 2 * 2 * 8 * 9 / 2


def test_bench_side_by_side_backends(tmp_path):
    """--attention-backends runs every case once per backend on one loaded model (on the CPU only
    torch_native runs, so it is swapped for itself: the swap path and the report's shape)."""
    model_dir = _tiny_config_dir(tmp_path / "tiny", tie=False)
    report = bench_one_batch.main(["--model-path", model_dir, "--load-format", "dummy", "--device", "cpu",
                                   "--batch-size", "2", "--input-len", "8", "--output-len", "3", "--skip-peaks",
                                   "--attention-backends", "torch_native", "torch_native", "--repeat", "2"])
    rows = [(r["attention_backend"], r["batch_size"]) for r in report["results"]]
    assert rows == [("torch_native", 2), ("torch_native", 2)]
    assert list(report["attention_backends"]) == ["torch_native"]
    for r in report["results"]:
        assert len(r["prefill_latencies_s"]) == 2 and r["decode_median_latency_s"] > 0
    assert "flashinfer" in report["versions"]
    assert "attention" in bench_one_batch.format_table(report).splitlines()[1]


def test_overlapped_decode_loop_same_tokens(tmp_path):
    """The overlapped loop (next step launched on the device's samples before the host reads them)
    decodes the same greedy tokens as the plain loop, one latency per decode step."""
    from edgelm.model_config import ModelConfig
    from edgelm.model_executor.model_runner import ModelRunner
    from edgelm.model_loader.resolve import resolve_model

    model_dir = _tiny_config_dir(tmp_path / "tiny", tie=False)
    server_args, _, _ = bench_one_batch.prepare_args(["--model-path", model_dir, "--load-format", "dummy",
                                                      "--device", "cpu", "--batch-size", "3", "--input-len", "8",
                                                      "--output-len", "6"])
    config = ModelConfig.load(resolve_model(model_dir), server_args.dtype, "cpu", server_args.context_length)
    runner = ModelRunner(server_args, config, "cpu")
    plain = bench_one_batch.run_once(runner, 3, 8, 6, seed=1, overlap=False)
    overlapped = bench_one_batch.run_once(runner, 3, 8, 6, seed=1, overlap=True)
    assert len(plain["tokens"]) == len(overlapped["tokens"]) == 6
    assert all(len(t) == 3 for t in plain["tokens"])
    assert overlapped["tokens"] == plain["tokens"]
    assert len(plain["decode_s"]) == len(overlapped["decode_s"]) == 5
    assert all(t > 0 for t in overlapped["decode_s"])
    # and the tokens are a real greedy decode: the steps do not all repeat the first token
    assert len({tuple(t) for t in plain["tokens"]}) > 1


def _int4_variants(tmp_path):
    """benchmarks/gpu/int4_variants.py as a module, and a one-layer Llama config written under tmp_path / "m"."""
    import importlib.util
    from pathlib import Path

    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128).save_pretrained(str(tmp_path / "m"))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "int4_variants.py"
    spec = importlib.util.spec_from_file_location("int4_variants", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_int4_variants_script(tmp_path, monkeypatch):
    """benchmarks/gpu/int4_variants.py on the CPU: the sweep runs over the loaded model's own int4
    shapes and writes tables that EDGELM_INT4_DISPATCH's loader takes."""
    from edgelm.quantization import int4_kernels

    mod = _int4_variants(tmp_path)
    monkeypatch.setattr(mod, "ROUND1", {"down": [("gemv_h2", (8, 8, 1, 4))]})
    monkeypatch.setattr(mod, "CANDIDATES", {"qkv": [("gemv_h2", (8, 16, 1, 4))], "o": [("gemv_h2", (8, 8, 1, 4))]})
    monkeypatch.setattr(mod, "ROUND3", {"o": [("gemv_h2", (4, 8, 1, 4, 1))]})
    for name in [n for n in vars(mod) if n.startswith("ROUND") and n[5:].isdigit() and int(n[5:]) >= 4]:
        monkeypatch.setattr(mod, name, {})  # rounds 4 and later: none
    assert list(mod.candidates("round2,round3")) == ["qkv", "o"] and len(mod.candidates("round2,round3")["o"]) == 2
    with pytest.raises(SystemExit):
        mod.candidates("round99")
    shipped = {k: dict(v) for k, v in int4_kernels.SHAPE_DISPATCH.items()}
    report = mod.main(["--model-path", str(tmp_path / "m"), "--load-format", "dummy", "--device", "cpu",
                       "--torchao-config", "int4wo-128", "--batch-size", "1", "--input-len", "8", "--output-len", "3",
                       "--out", str(tmp_path / "v.json"), "--dispatch-out", str(tmp_path / "d.json"),
                       "--candidates", "all", "--ablate-gemv"])
    assert int4_kernels.SHAPE_DISPATCH == shipped  # put back after the sweep
    assert report["shapes"] == {"qkv": [512, 256], "o": [256, 256], "gate_up": [1024, 256], "down": [256, 512]}
    labels = [r["label"] for r in report["results"]]
    assert labels[:7] == ["shipped", "down gemv_h2 (8, 8, 1, 4)", "qkv gemv_h2 (8, 16, 1, 4)", "o gemv_h2 (8, 8, 1, 4)",
                          "o gemv_h2 (4, 8, 1, 4, 1)", "shipped", "shipped"]
    assert all(r["itl_us"] > 0 for r in report["results"])
    assert report["results"][-1].get("ablation") and not any(r.get("ablation") for r in report["results"][:-1])
    assert int4_kernels.KERNELS["gemv_h2"].__name__ == "gemv_h2"  # put back after the ablation
    monkeypatch.setattr(int4_kernels, "DISPATCH", dict(int4_kernels.DISPATCH))
    monkeypatch.setattr(int4_kernels, "SHAPE_DISPATCH", dict(int4_kernels.SHAPE_DISPATCH))
    monkeypatch.setattr(int4_kernels, "M1_BY_ROLE", dict(int4_kernels.M1_BY_ROLE))
    tables = json.loads((tmp_path / "d.json").read_text())
    # every shape's batch-1 choice is written, its role's default where the sweep found nothing better
    assert {tuple(s) for s in report["shapes"].values()} <= {
        tuple(int(v) for v in shape.split("x")) for shape, t in tables["dispatch_by_shape"].items() if "1" in t}
    int4_kernels.load_dispatch(str(tmp_path / "d.json"))
    for shape, table in tables["dispatch_by_shape"].items():
        n, k = (int(v) for v in shape.split("x"))
        assert int4_kernels.SHAPE_DISPATCH[(n, k)] == {int(m): (kern, tuple(c)) for m, (kern, c) in table.items()}
    assert tables["combo"] == report["combo"]


def test_int4_variants_ablate_ops(tmp_path):
    """--ablate-ops: one run with each small kernel launching nothing, then all of them, each followed by a shipped
    run; the layers' own code is back afterwards; an unknown name stops before the model loads."""
    import importlib

    from edgelm.layers.activation import SiluAndMul
    from edgelm.layers.layernorm import RMSNorm

    decode_attention = importlib.import_module("edgelm.layers.attention.triton_ops.decode_attention")
    mod = _int4_variants(tmp_path)
    from edgelm.layers.vocab_embedding import VocabEmbedding

    before = (RMSNorm.forward, SiluAndMul.forward, decode_attention._decode_merge_kernel, VocabEmbedding.forward)
    args = ["--model-path", str(tmp_path / "m"), "--load-format", "dummy", "--device", "cpu", "--torchao-config",
            "int4wo-128", "--batch-size", "1", "--input-len", "8", "--output-len", "3", "--candidates", "none"]
    report = mod.main(args + ["--ablate-ops", "rmsnorm,silu,merge"])
    labels = [r["label"] for r in report["results"]]
    assert labels[:2] == ["shipped", "shipped"]  # the sweep's first and last baselines (no candidates)
    assert labels[2::2] == [f"shipped, {op} replaced by nothing (ablation)"
                            for op in ("rmsnorm", "silu", "merge", "rmsnorm+silu+merge")]
    assert labels[3::2] == ["shipped (ablation baseline)"] * 4
    assert [r["ablation"] for r in report["results"][2:]] == [True, False] * 4
    assert (RMSNorm.forward, SiluAndMul.forward, decode_attention._decode_merge_kernel, VocabEmbedding.forward) == before
    with pytest.raises(SystemExit):
        mod.main(args + ["--ablate-ops", "nothing"])


def test_int4_variants_env_ab(tmp_path, monkeypatch):
    """--env-ab: each setting on, off, on around the shipped step (set while that step runs), the variable back as
    it was afterwards; a setting without "=" stops before the model loads."""
    mod = _int4_variants(tmp_path)
    monkeypatch.delenv("EDGELM_DECODE_CONFIG", raising=False)
    seen = []
    real = mod.bench_one_batch.run_once
    monkeypatch.setattr(mod.bench_one_batch, "run_once",
                        lambda *a, **k: seen.append(os.environ.get("EDGELM_DECODE_CONFIG")) or real(*a, **k))
    args = ["--model-path", str(tmp_path / "m"), "--load-format", "dummy", "--device", "cpu", "--torchao-config",
            "int4wo-128", "--batch-size", "1", "--input-len", "8", "--output-len", "3", "--candidates", "none"]
    report = mod.main(args + ["--env-ab", "EDGELM_DECODE_CONFIG=min_split_len=128;EDGELM_DECODE_CONFIG=max_splits=2"])
    labels = [r["label"] for r in report["results"]][2:]
    assert labels == ["shipped + EDGELM_DECODE_CONFIG=min_split_len=128", "shipped (env A/B baseline)",
                      "shipped + EDGELM_DECODE_CONFIG=min_split_len=128", "shipped + EDGELM_DECODE_CONFIG=max_splits=2",
                      "shipped (env A/B baseline)", "shipped + EDGELM_DECODE_CONFIG=max_splits=2"]
    # four runs a measurement (a warm-up, three timed): two shipped baselines, then the A/B
    assert seen[8:] == [v for x in ("min_split_len=128", None, "min_split_len=128", "max_splits=2", None, "max_splits=2")
                        for v in [x] * 4]
    assert "EDGELM_DECODE_CONFIG" not in os.environ
    with pytest.raises(SystemExit):
        mod.main(args + ["--env-ab", "NOVALUE"])


def test_result_header_and_write_json(tmp_path):
    from edgelm.bench_utils import result_header, write_json

    head = result_header("probe", "benchmarks/gpu/x.py", ["--out", "o.json"])
    assert head["command"] == "python benchmarks/gpu/x.py --out o.json" and head["benchmark"] == "probe"
    assert head["date"][:4].isdigit() and head["device"]
    write_json(str(tmp_path / "sub" / "r.json"), {**head, "rows": [1]})
    text = (tmp_path / "sub" / "r.json").read_text()
    assert text.endswith("\n") and json.loads(text)["rows"] == [1]


def test_decode_profile_kernel_table(tmp_path):
    """decode_profile.kernel_table: the last step of a trace (steps split at host gaps), kernels grouped by name, and
    one decoder layer's window with each kernel's increment (its end minus the previous kernel's end: with PDL a
    kernel starts before its predecessor ends, so its own duration overstates its share of the step)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("decode_profile", "benchmarks/gpu/decode_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # two "layers" of three kernels; the second and third start before the one before them ends (PDL overlap)
    step = [("norm", 0.0, 2.0), ("gemv", 1.0, 10.0), ("attn", 9.0, 4.0)] * 2
    events, t = [{"cat": "kernel", "name": "prefill", "ts": 0.0, "dur": 5.0}], 1000.0
    for i, (name, start, dur) in enumerate(step):
        events.append({"cat": "kernel", "name": name, "ts": t + start + (13.0 if i >= 3 else 0.0), "dur": dur})
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    table = mod.kernel_table(str(path), num_layers=2)
    assert table["steps_seen"] == 2 and table["kernels_in_step"] == 6
    window = table["one_layer_window"]
    assert [r["kernel"] for r in window] == ["norm", "gemv", "attn"]
    # norm (second layer) starts when attn (first) ends: 0 gap; gemv ends at 11, 9 after norm's end at 2; attn 2 after
    assert [r["inc_us"] for r in window] == [2.0, 9.0, 2.0]
    assert sum(r["inc_us"] for r in window) == 13.0  # one layer's span
    by = {r["kernel"]: r for r in table["by_kernel"]}
    assert by["gemv"]["count"] == 2 and by["gemv"]["median_gap_before_us"] == -1.0
