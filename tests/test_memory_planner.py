"""Memory plans on Jetson Orin (unified memory), a discrete GPU and the CPU; weight-size estimates."""

import logging

import pytest

from edgelm.model_executor.memory_planner import (
    GB,
    MemoryPlan,
    NotEnoughMemoryError,
    default_mem_fraction,
    default_os_reserve,
    device_memory,
    estimate_activation_bytes,
    estimate_cuda_graph_bytes,
    plan_kv_pool,
    preflight_check,
)
from edgelm.model_executor.weight_bytes import (
    count_parameters,
    estimate_weight_bytes,
    kv_bytes_per_token,
    weight_breakdown,
)
from edgelm.platform import GpuInfo, PlatformFacts

KB = 1024
LLAMA_31_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
LLAMA_31_70B = {**LLAMA_31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                "num_attention_heads": 64}


def orin(mem_total_kb: int, mem_available_kb: int, sms: int) -> PlatformFacts:
    """Facts as detect_platform returns them on an Orin module (see tests/test_platform.py)."""
    return PlatformFacts(arch="aarch64", is_jetson=True, l4t_version="36.4.3", jetpack_version="6.2",
                         gpu=GpuInfo("Orin", (8, 7), mem_total_kb * KB, sms, True), unified_memory=True,
                         mem_total_bytes=mem_total_kb * KB, mem_available_bytes=mem_available_kb * KB)


AGX_64 = orin(64335836, 60123548, 16)  # idle, headless
AGX_32 = orin(31919604, 28854164, 14)  # idle, headless
AGX_32_BUSY = orin(31919604, 16777216, 14)  # desktop + a camera pipeline hold ~14 GB


# ---------------------------------------------------------------------------- weight bytes
def test_llama_31_8b_sizes():
    assert count_parameters(LLAMA_31_8B).total == 8_030_261_248  # the published parameter count
    assert estimate_weight_bytes(LLAMA_31_8B, "half") == 16_060_522_496
    b = weight_breakdown(LLAMA_31_8B, "half", "int4wo-128")
    linear_numel = 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336)
    assert b.linear == linear_numel // 2 + linear_numel // 128 * 4  # int4 + bf16 scale & zero per group
    assert b.embedding == b.lm_head == 128256 * 4096 * 2  # not quantized
    assert b.total == 5_809_643_520
    assert estimate_weight_bytes(LLAMA_31_8B, "half", "int4wo-32") > b.total
    assert estimate_weight_bytes(LLAMA_31_8B, "half", "int8wo") == pytest.approx(8.46 * GB, rel=1e-3)
    assert estimate_weight_bytes(LLAMA_31_8B, "auto", device="cpu") == 2 * 16_060_522_496  # float32
    assert kv_bytes_per_token(LLAMA_31_8B) == 128 * KB


def test_prequantized_awq_config():
    cfg = {**LLAMA_31_8B, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    assert 5.0 * GB < estimate_weight_bytes(cfg, "half") < 5.6 * GB


@pytest.mark.parametrize("arch,extra", [
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"tie_word_embeddings": False, "head_dim": 32}),
])
def test_parameter_count_matches_transformers(arch, extra):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[arch]
    config = cls(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert count_parameters(config).total == expected
    assert count_parameters(config.to_dict()).total == expected


# ---------------------------------------------------------------------------- Jetson plans
def _preflight(facts, config, torchao="", **kw):
    return preflight_check(facts, estimate_weight_bytes(config, "half", torchao), kv_bytes_per_token(config),
                           8192, kw.pop("mem_fraction_static", 0.8), **kw)


def test_agx_orin_64gb_llama_8b_fp16_and_int4():
    fp16 = _preflight(AGX_64, LLAMA_31_8B)
    int4 = _preflight(AGX_64, LLAMA_31_8B, "int4wo-128")
    assert fp16.unified_memory and fp16.givable_bytes == 60123548 * KB
    # static = 0.8 × what the OS can give; KV = static − weights
    expected_kv = int(0.8 * 60123548 * KB) - 16_060_522_496
    assert fp16.max_total_tokens == pytest.approx(expected_kv / (128 * KB), abs=2)
    assert int4.max_total_tokens > fp16.max_total_tokens + (16_060_522_496 - 5_809_643_520) // (128 * KB) - 2
    text = fp16.summary()
    assert "unified memory" in text and "14.96 GB" in text and "GB" in text.splitlines()[-1]
    assert len(text.splitlines()) == 4


def test_agx_orin_64gb_llama_70b_fp16_refused_int4_fits():
    int4_bytes = estimate_weight_bytes(LLAMA_31_70B, "half", "int4wo-128")
    with pytest.raises(NotEnoughMemoryError) as err:
        _preflight(AGX_64, LLAMA_31_70B, alternatives={"int4wo-128": int4_bytes})
    msg = str(err.value)
    assert "the weights take 131.42 GB" in msg and "57.34 GB" in msg and "61.36 GB" in msg
    assert "It would fit with --torchao-config int4wo-128 (37.78 GB of weights" in msg
    plan = _preflight(AGX_64, LLAMA_31_70B, "int4wo-128")
    assert plan.max_total_tokens > 8192


def test_agx_orin_32gb_llama_8b():
    fp16 = _preflight(AGX_32, LLAMA_31_8B)
    assert fp16.max_total_tokens > 8192  # 0.8 × 27.5 GB − 14.96 GB ≈ 7.1 GB of KV
    int4_bytes = estimate_weight_bytes(LLAMA_31_8B, "half", "int4wo-128")
    with pytest.raises(NotEnoughMemoryError) as err:  # only 16 GB free: 12.8 GB static < 14.96 GB
        _preflight(AGX_32_BUSY, LLAMA_31_8B, alternatives={"int4wo-128": int4_bytes, "int8wo": 13 * GB})
    msg = str(err.value)
    assert "the OS can give 16.00 GB of the 30.44 GB" in msg and "the weights take 14.96 GB" in msg
    assert "--torchao-config int4wo-128 (5.41 GB" in msg and "int8wo" not in msg
    assert "multi-user.target" in msg
    busy_int4 = _preflight(AGX_32_BUSY, LLAMA_31_8B, "int4wo-128")
    assert busy_int4.max_total_tokens > 40_000


def test_unified_headroom_covers_graphs_activations_os():
    graphs = estimate_cuda_graph_bytes(24, 9, 4096, 14336, 128256)
    acts = estimate_activation_bytes(4096, 14336, 128256, 4096, 1024, 2048, 24)
    assert 0.05 * GB < graphs < 1 * GB and 0.1 * GB < acts < 2 * GB
    roomy = _preflight(AGX_32, LLAMA_31_8B, cuda_graph_bytes=graphs, activation_bytes=acts)
    assert not roomy.notes  # 20% of 27.5 GB covers them
    tight = _preflight(AGX_32, LLAMA_31_8B, mem_fraction_static=0.95, cuda_graph_bytes=graphs,
                       activation_bytes=acts)
    assert tight.notes and tight.headroom_bytes >= graphs + acts + default_os_reserve(AGX_32.mem_total_bytes) - 128 * KB
    assert default_os_reserve(8 * GB) == GB // 2 and default_os_reserve(64 * GB) == 2 * GB


def test_plan_after_loading_matches_preflight():
    """The runner calls plan_kv_pool with MemAvailable read after loading: same pool as preflight."""
    weights = estimate_weight_bytes(LLAMA_31_8B, "half")
    pre = _preflight(AGX_64, LLAMA_31_8B)
    post = plan_kv_pool("cuda", AGX_64.mem_total_bytes, AGX_64.mem_available_bytes - weights, weights,
                        128 * KB, 0.8, None, 8192, unified_memory=True)
    assert post.max_total_tokens == pre.max_total_tokens


# ---------------------------------------------------------------------------- discrete GPU and CPU
def test_discrete_gpu_formula_unchanged():
    plan = plan_kv_pool("cuda", 80 * GB, 60 * GB, 16 * GB, 128 * KB, 0.85, None, 8192, unified_memory=False)
    assert plan.max_total_tokens == int(60 * GB - 80 * GB * 0.15) // (128 * KB)
    assert not plan.unified_memory and "static" in plan.summary()
    h100 = PlatformFacts(arch="x86_64", gpu=GpuInfo("H100", (9, 0), 80 * GB, 132, False, free_memory=79 * GB))
    assert preflight_check(h100, 16 * GB, 128 * KB, 8192).max_total_tokens > 300_000


def test_max_total_tokens_cap_and_short_pool_warning(caplog):
    with caplog.at_level(logging.WARNING):
        plan = plan_kv_pool("cuda", 80 * GB, 60 * GB, 16 * GB, 128 * KB, 0.85, 1000, 8192, unified_memory=False)
    assert plan.max_total_tokens == 1000 and "smaller than the context length" in caplog.text


def test_cpu_path():
    available, total = device_memory("cpu")
    assert 0 < available <= total
    assert default_mem_fraction("cpu") == 0.3 and default_mem_fraction("cuda", unified_memory=True) == 0.8
    plan = plan_kv_pool("cpu", 20 * GB, 19 * GB, GB, 16 * KB, None, None, 2048)
    assert isinstance(plan, MemoryPlan) and plan.max_total_tokens == int(19 * GB - 20 * GB * 0.7) // (16 * KB)
    cpu = PlatformFacts(arch="x86_64", mem_total_bytes=24 * GB, mem_available_bytes=20 * GB)
    assert preflight_check(cpu, GB, 16 * KB, 2048).device == "cpu"
    with pytest.raises(NotEnoughMemoryError, match="raise --mem-fraction-static"):
        preflight_check(cpu, 8 * GB, 16 * KB, 2048)


def test_gguf_refusal_names_int4wo_32_first():
    """A GGUF that does not fit with some linears dense (a Q4_K_M's Q6_K v / down): the refusal names
    --torchao-config int4wo-32 first (its 4-bit layers stay as stored, only the dense ones are quantized, group 32),
    then int4wo-128 (every layer requantized), each with its size."""
    from types import SimpleNamespace

    import torch

    from edgelm.model_executor.model_runner import ModelRunner
    from edgelm.model_loader.gguf_int4 import GGUFInt4Plan, int4_bytes

    layers, h, inter = 32, 4096, 14336
    qkv, o, gate_up, down = 6144 * h, h * h, 2 * inter * h, h * inter
    dense = layers * qkv + layers // 2 * down  # q ‖ k ‖ v dense (v in Q6_K), half the down projections in Q6_K
    plan = GGUFInt4Plan(int4_modules=frozenset({"o_proj", "gate_up_proj", "down_proj"}),
                        dense_modules=frozenset({"qkv_proj", "down_proj"}), dense_types=("Q6_K",),
                        int4_weights=layers * (o + gate_up) + layers // 2 * down, dense_weights=dense)
    runner = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=LLAMA_31_8B, context_len=8192),
        server_args=SimpleNamespace(torchao_config="", quantize_lm_head="none", mem_fraction_static=None,
                                    max_total_tokens=None),
        dtype=torch.float16, device="cuda", gguf_plan=plan, prequant=None)
    runner._quantize_hint = lambda: ModelRunner._quantize_hint(runner)
    with pytest.raises(NotEnoughMemoryError) as err:  # a 9 GB discrete GPU: 8.25 GB of weights as loaded
        ModelRunner._preflight(runner, int(8.5 * GB), 9 * GB, kv_bytes_per_token(LLAMA_31_8B), 0, 0)
    msg = str(err.value)
    loaded = estimate_weight_bytes(LLAMA_31_8B, "half") - plan.int4_weights * 2 + int4_bytes(plan.int4_weights)
    int4wo_32 = loaded - dense * 2 + int4_bytes(dense)
    assert f"the weights take {loaded / GB:.2f} GB" in msg
    assert f"--torchao-config int4wo-32 ({int4wo_32 / GB:.2f} GB of weights" in msg
    assert msg.index("int4wo-32") < msg.index("int4wo-128 (")
    assert "Quantize (--torchao-config int4wo-32)" in msg  # the general advice names the same one
    plan_all_int4 = GGUFInt4Plan(plan.int4_modules, frozenset(), (), plan.int4_weights + dense)
    runner.gguf_plan = plan_all_int4  # nothing dense: int4wo-32 would change nothing, so it is not named
    with pytest.raises(NotEnoughMemoryError) as err:
        ModelRunner._preflight(runner, int(6.5 * GB), 7 * GB, kv_bytes_per_token(LLAMA_31_8B), 0, 0)
    assert "It would fit with --torchao-config int4wo-128" in str(err.value) and "int4wo-32" not in str(err.value)
    # quantized already (--torchao-config, or an AWQ/GPTQ checkpoint): no --torchao-config is suggested at all
    for args, prequant in ((dict(torchao_config="int4wo-128"), None), ({}, SimpleNamespace(method="awq"))):
        runner.server_args = SimpleNamespace(**{**vars(runner.server_args), **args})
        runner.prequant, runner.gguf_plan = prequant, None
        with pytest.raises(NotEnoughMemoryError) as err:
            ModelRunner._preflight(runner, 2 * GB, 3 * GB, kv_bytes_per_token(LLAMA_31_8B), 0, 0)
        assert "--torchao-config" not in str(err.value) and "Pick a smaller model" in str(err.value)
        runner.server_args.torchao_config = ""
