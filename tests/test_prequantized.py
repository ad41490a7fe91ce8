"""Pre-quantized AWQ / GPTQ checkpoints: written here from tiny random models, loaded by edgelm into
its int4 layout, and compared with the same model whose dense weights are the checkpoint's
dequantized ones (edgelm and transformers on that dense checkpoint).

The packers below follow the formats as their tools write them (AutoAWQ's gemm layout, AutoGPTQ's
v1 and GPTQModel's v2), written out loop by loop, independently of edgelm's vectorised unpacking."""

from __future__ import annotations

import json
import os

import pytest
import torch

from edgelm.quantization import prequantized
from edgelm.quantization.int4_pack import dequantize_int4
from edgelm.quantization.prequantized import PrequantizedError, prequant_config
from edgelm.server_args import ServerArgs
from tests.tiny_models import Driver, make_runner, tiny_config

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.fixture(autouse=True)
def _emulated_int4(monkeypatch):
    """The int4 layers as the dense emulation (float32) so that they can equal the dequantized model;
    torch's CPU int4 kernel (bf16 activations) is compared in test_cpu_kernel_close_to_emulation."""
    monkeypatch.setenv("EDGELM_INT4_CPU", "emulate")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(w: torch.Tensor, group: int, g_idx: torch.Tensor):
    """Min/max asymmetric 4-bit codes of w [N, K] with groups given by g_idx [K]: q [N, K], z [G, N]
    (0..15), s [G, N] fp16, and the dequantized weight (q - z)·s in fp32."""
    n, k = w.shape
    num_groups = int(g_idx.max()) + 1
    q = torch.zeros(n, k, dtype=torch.int32)
    z = torch.zeros(num_groups, n, dtype=torch.int32)
    s = torch.zeros(num_groups, n, dtype=torch.float16)
    for g in range(num_groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols].float()
        lo, hi = wg.min(1).values.clamp(max=0), wg.max(1).values.clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-6).half()
        zero = (-lo / scale.float()).round().clamp(0, 15).int()
        q[:, cols] = (wg / scale.float().unsqueeze(1)).round().int().add(zero.unsqueeze(1)).clamp(0, 15)
        z[g], s[g] = zero, scale
    deq = (q - z[g_idx].t()).float() * s[g_idx].t().float()
    return q, z, s, deq


def pack_awq(q, z):
    """AutoAWQ gemm: qweight [K, N/8] and qzeros [G, N/8], word c nibble i = output 8c + ORDER[i]."""
    def pack(t):  # t [R, N]
        out = torch.zeros(t.shape[0], t.shape[1] // 8, dtype=torch.int32)
        for col in range(t.shape[1] // 8):
            for i in range(8):
                out[:, col] |= t[:, col * 8 + AWQ_PACK_ORDER[i]] << (i * 4)
        return out
    return pack(q.t().contiguous()), pack(z)


def pack_gptq(q, z, v1: bool):
    """AutoGPTQ: qweight [K/8, N] (row r nibble i = input 8r + i), qzeros [G, N/8] (word c nibble i =
    output 8c + i), zero points stored minus one in v1 (masked to 4 bits)."""
    qt = q.t().contiguous()
    k, n = qt.shape
    qweight = torch.zeros(k // 8, n, dtype=torch.int32)
    for row in range(k // 8):
        for i in range(8):
            qweight[row] |= qt[row * 8 + i] << (4 * i)
    zs = ((z - 1) & 0xF) if v1 else z
    qzeros = torch.zeros(z.shape[0], n // 8, dtype=torch.int32)
    for col in range(n // 8):
        for i in range(8):
            qzeros[:, col] |= zs[:, col * 8 + i] << (4 * i)
    return qweight, qzeros


def write_pair(family: str, root, method: str, group: int, *, v1: bool = True, desc_act: bool = False,
               config=None, seed: int = 0):
    """A quantized checkpoint (`root`/q) and the dense one with its dequantized weights (`root`/d)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = config or tiny_config(family)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    quant_sd, dense_sd, perms = {}, {}, {}
    for name, tensor in model.state_dict().items():
        prefix, _, piece = name.rpartition(".")
        if piece != "weight" or prefix.rpartition(".")[2] not in LINEARS:
            quant_sd[name] = dense_sd[name] = tensor.clone().contiguous()
            continue
        k = tensor.shape[1]
        g = k if group == -1 else group
        if desc_act:  # one order for the layers that read the same input (GPTQ sorts one Hessian's diagonal)
            parent, _, leaf = prefix.rpartition(".")
            key = (parent, leaf in ("q_proj", "k_proj", "v_proj"), leaf in ("gate_proj", "up_proj"), leaf)
            key = key[:3] if any(key[1:3]) else key
            if key not in perms:
                perms[key] = torch.randperm(k, generator=gen)
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perms[key]] = (torch.arange(k) // g).int()
        else:
            g_idx = (torch.arange(k) // g).int()
        q, z, s, deq = quantize(tensor, g, g_idx)
        dense_sd[name] = deq
        if method == "awq":
            qweight, qzeros = pack_awq(q, z)
        else:
            qweight, qzeros = pack_gptq(q, z, v1)
            quant_sd[f"{prefix}.g_idx"] = g_idx
            if f"{prefix}.bias" not in quant_sd:  # AutoGPTQ writes a zero bias for every layer
                quant_sd[f"{prefix}.bias"] = torch.zeros(tensor.shape[0], dtype=torch.float16)
        quant_sd[f"{prefix}.qweight"], quant_sd[f"{prefix}.qzeros"] = qweight, qzeros
        quant_sd[f"{prefix}.scales"] = s
    if method == "awq":
        qcfg = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    else:
        qcfg = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act, "sym": False,
                "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    for sub, sd, extra in (("q", quant_sd, {"quantization_config": qcfg}), ("d", dense_sd, {})):
        path = os.path.join(str(root), sub)
        os.makedirs(path, exist_ok=True)
        if cfg.tie_word_embeddings:
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        save_file(sd, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**cfg.to_dict(), **extra}, f)
    return os.path.join(str(root), "q"), os.path.join(str(root), "d")


def _greedy(path, prompts, steps, **overrides):
    runner = make_runner(path, **overrides)
    return runner, Driver(runner).greedy(prompts, steps)


CASES = {
    "awq-g32-llama3": ("llama3", "awq", 32, {}),
    "awq-g32-qwen2-bias": ("qwen2", "awq", 32, {}),
    "gptq-v1-g32": ("llama3", "gptq", 32, {}),
    "gptq-v2-per-channel": ("llama", "gptq", -1, {"v1": False}),
    "gptq-act-order-g32": ("llama3", "gptq", 32, {"desc_act": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_prequantized_equals_dense_dequantized(case, tmp_path):
    family, method, group, kw = CASES[case]
    qpath, dpath = write_pair(family, tmp_path, method, group, **kw)
    prompts = [[5, 17, 200, 3, 99, 41], [7, 7, 300, 12]]
    qrunner, (q_tokens, q_logits) = _greedy(qpath, prompts, 6)
    _, (d_tokens, d_logits) = _greedy(dpath, prompts, 6)
    assert qrunner.prequant.method == method
    from edgelm.quantization.int4_linear import Int4Linear

    layers = [m for m in qrunner.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 4 * qrunner.model_config.num_layers  # qkv, o, gate_up, down
    if kw.get("desc_act"):  # down_proj's permutation is folded into gate_up's rows: no gather of x
        assert all((m.input_perm is None) == name.endswith("down_proj")
                   for name, m in qrunner.model.named_modules() if isinstance(m, Int4Linear))
    # the only difference: offsets m = -z·s are stored in fp16
    for ql, dl in zip(q_logits, d_logits):
        torch.testing.assert_close(ql, dl, rtol=0, atol=2e-3 * float(dl.abs().max()))
    assert q_tokens == d_tokens


def test_prequantized_matches_transformers_on_dequantized(tmp_path):
    """GPTQ act-order against HF transformers running the dense dequantized checkpoint."""
    from transformers import AutoModelForCausalLM

    qpath, dpath = write_pair("llama3", tmp_path, "gptq", 32, desc_act=True, seed=3)
    prompt = [11, 250, 3, 3, 77, 120, 9, 300]
    drv = Driver(make_runner(qpath))
    logits = drv.extend(drv.add_requests(1), [prompt], return_all_logits=True)
    hf = AutoModelForCausalLM.from_pretrained(dpath, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, ref, rtol=0, atol=2e-3 * float(ref.abs().max()))


def test_conversion_reproduces_weights():
    """Unpacking + repacking into edgelm's layout gives back (q - z)·s for both formats, act-order included."""
    torch.manual_seed(0)
    w = torch.randn(24, 256)
    gen = torch.Generator().manual_seed(1)
    for method, group, desc_act in (("awq", 128, False), ("gptq", 64, True), ("gptq", 256, False),
                                    ("gptq", -1, False)):
        g = 256 if group == -1 else group
        g_idx = (torch.arange(256) // g).int()
        if desc_act:
            g_idx = g_idx[torch.randperm(256, generator=gen)]
        q, z, s, deq = quantize(w, g, g_idx)
        if method == "awq":
            codes, zeros = prequantized.unpack_awq(*pack_awq(q, z))
        else:
            codes, zeros = prequantized.unpack_gptq(*pack_gptq(q, z, v1=True), zero_offset=1)
        assert torch.equal(codes, q) and torch.equal(zeros, z)
        pcfg = prequantized.PrequantConfig(method, group, 1, desc_act)
        packed, perm = prequantized.to_int4_weight(codes, zeros, s, group, pcfg.kernel_group(256),
                                                   g_idx if desc_act else None)
        got = dequantize_int4(packed)
        if desc_act:
            assert perm is not None
            deq = deq[:, perm]
        else:
            assert perm is None
        bound = (z[g_idx].t().float() * s[g_idx].t().float()).abs() * 2.0**-11 + 1e-7
        bound = bound[:, perm] if perm is not None else bound
        assert bool(((got - deq).abs() <= bound).all()), method


def test_cpu_kernel_close_to_emulation(tmp_path, monkeypatch):
    """torch's CPU int4 kernel on an act-order GPTQ checkpoint (x permuted, then the kernel) against
    the float32 emulation: the same tokens where the model is not at a near tie, logits within bf16."""
    from edgelm.quantization.int4_linear import cpu_kernel_available

    qpath, _ = write_pair("llama3", tmp_path, "gptq", 32, desc_act=True, seed=5)
    prompts = [[5, 17, 200, 3, 99, 41]]
    _, (_, emulated) = _greedy(qpath, prompts, 4)
    monkeypatch.setenv("EDGELM_INT4_CPU", "kernel")
    if not cpu_kernel_available():
        pytest.skip("this torch has no CPU int4 kernel")
    runner, (_, kernel) = _greedy(qpath, prompts, 4)
    layer = runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.cpu_weight is not None and layer.dense_weight is None
    for k, e in zip(kernel, emulated):
        torch.testing.assert_close(k, e, rtol=0, atol=3e-2 * float(e.abs().max()))


@pytest.mark.parametrize("case", ["awq-g128", "gptq-act-order-g128"])
def test_triton_kernel_path_on_the_interpreter(case, tmp_path, monkeypatch):
    """The GPU path of a pre-quantized model without a GPU: fp16, the int4 layers through
    int4_linear's dispatch (tcw for the 6-token prefill, gemv_h2 for each decode step: their plain-op
    paths under TRITON_INTERPRET), the
    act-order gathers and the folded down_proj rows, against the dense emulation."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (the suite sets it)")
    from transformers import LlamaConfig

    from edgelm.quantization.int4_kernels import choose_kernel
    from edgelm.quantization.int4_linear import Int4Linear

    cfg = LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.05, tie_word_embeddings=True)
    method = "awq" if case.startswith("awq") else "gptq"
    qpath, _ = write_pair("llama3", tmp_path, method, 128, desc_act=method == "gptq", config=cfg)
    prompts = [[5, 17, 200, 3, 99, 41]]
    _, (_, emulated) = _greedy(qpath, prompts, 2, dtype="float16")
    monkeypatch.setenv("EDGELM_INT4_CPU", "triton")
    runner, (_, kernels) = _greedy(qpath, prompts, 2, dtype="float16")
    layer = runner.model.model.layers[0].mlp.gate_up_proj
    assert isinstance(layer, Int4Linear) and layer.dense_weight is None and layer.cpu_weight is None
    assert choose_kernel(6, layer.packed)[0] == "tcw" and choose_kernel(1, layer.packed)[0] == "gemv_h2"
    for k, e in zip(kernels, emulated):
        torch.testing.assert_close(k.float(), e.float(), rtol=0, atol=2e-2 * float(e.float().abs().max()))


def test_gptq_v1_zero_of_zero_means_sixteen():
    """AutoGPTQ v1 stores z - 1 in 4 bits: z = 0 is stored as 15 and read back as 16, as its kernels do."""
    qzeros = torch.tensor([[0x0000000F]], dtype=torch.int32)  # output 0: stored 15
    qweight = torch.zeros(1, 8, dtype=torch.int32)
    _, zeros = prequantized.unpack_gptq(qweight, qzeros, zero_offset=1)
    assert zeros[0, 0].item() == 16 and zeros[0, 1].item() == 1


def test_dummy_weights_with_a_prequantized_config(tmp_path):
    qpath, _ = write_pair("llama3", tmp_path, "awq", 32)
    drv = Driver(make_runner(qpath, load_format="dummy"))
    logits = drv.extend(drv.add_requests(1), [[1, 2, 3]])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("legacy", ["quantize_config.json", "quant_config.json"])
def test_legacy_settings_file(tmp_path, legacy):
    """Older AutoGPTQ (quantize_config.json) and AutoAWQ (quant_config.json) checkpoints keep their
    settings beside config.json, without quant_method."""
    method = "gptq" if legacy == "quantize_config.json" else "awq"
    qpath, _ = write_pair("llama3", tmp_path, method, 32)
    with open(os.path.join(qpath, "config.json")) as f:
        cfg = json.load(f)
    qcfg = cfg.pop("quantization_config")
    with open(os.path.join(qpath, "config.json"), "w") as f:
        json.dump(cfg, f)
    legacy_cfg = ({"bits": 4, "group_size": 32, "desc_act": False, "sym": False} if method == "gptq" else
                  {"w_bit": 4, "q_group_size": 32, "zero_point": True, "version": "GEMM"})
    with open(os.path.join(qpath, legacy), "w") as f:
        json.dump(legacy_cfg, f)
    assert prequant_config({}, None, qpath).method == method
    runner = make_runner(qpath)
    assert runner.prequant is not None and runner.prequant.group_size == qcfg["group_size"]
    from edgelm.model_executor.weight_bytes import estimate_weight_bytes

    # the memory estimate reads the legacy file's settings: int4 weights, not float32 ones
    hf = runner.model_config.hf_config
    assert hf.quantization_config["quant_method"] == method
    with_q = estimate_weight_bytes(hf, "float32", "", "cuda")
    hf_plain = type(hf).from_dict({k: v for k, v in hf.to_dict().items() if k != "quantization_config"})
    assert with_q < estimate_weight_bytes(hf_plain, "float32", "", "cuda")


def test_config_detection_and_refusals():
    base = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}
    cfg = prequant_config({"quantization_config": base})
    assert (cfg.method, cfg.group_size, cfg.zero_offset, cfg.desc_act) == ("gptq", 128, 1, True)
    assert prequant_config({"quantization_config": {**base, "checkpoint_format": "gptq_v2"}}).zero_offset == 0
    assert prequant_config({"quantization_config": base}, "gptq_marlin").method == "gptq"
    assert prequant_config({}) is None
    awq = prequant_config({"quantization_config": {"quant_method": "awq", "w_bit": 4, "q_group_size": 64,
                                                   "version": "GEMM", "modules_to_not_convert": ["visual"]}})
    assert (awq.method, awq.group_size, awq.skips("model.visual.proj"), awq.skips("model.layers.0.mlp")) == \
        ("awq", 64, True, False)
    assert awq.kernel_group(4096) == 64
    assert prequant_config({"quantization_config": {**base, "group_size": 512}}).kernel_group(4096) == 128
    assert prequant_config({"quantization_config": {**base, "group_size": -1}}).kernel_group(4096) == 128
    refused = [
        ({"quantization_config": {**base, "bits": 8}}, None, "4-bit"),
        ({"quantization_config": {**base, "lm_head": True}}, None, "lm head"),
        ({"quantization_config": {**base, "is_marlin_format": True}}, None, "Marlin"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemv"}}, None, "gemm"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, None, "cannot load"),
        ({"quantization_config": base}, "awq", "checkpoint is gptq"),
        ({}, "gptq", "no quantization_config"),
    ]
    for hf, requested, words in refused:
        with pytest.raises(PrequantizedError, match=words):
            prequant_config(hf, requested)
    with pytest.raises(PrequantizedError, match="group size 96"):
        prequant_config({"quantization_config": {**base, "group_size": 96}}).kernel_group(4096)


def test_torchao_config_refused_on_prequantized(tmp_path):
    qpath, _ = write_pair("llama3", tmp_path, "awq", 32)
    with pytest.raises(ValueError, match="already AWQ-quantized"):
        make_runner(qpath, torchao_config="int4wo-128")


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["awq-g32-llama3", "gptq-act-order-g32"])
def test_prequantized_on_cuda_equals_dense(case, tmp_path):
    """On the GPU the int4 kernels run the repacked weights: compare with the dense dequantized model."""
    from edgelm.model_config import ModelConfig
    from edgelm.model_executor.model_runner import ModelRunner
    from edgelm.model_loader.resolve import resolve_model

    family, method, group, kw = CASES[case]
    qpath, dpath = write_pair(family, tmp_path, method, group, **kw)
    outs = []
    for path in (qpath, dpath):
        args = ServerArgs(model_path=path, device="cuda", dtype="float16", max_total_tokens=2048,
                          max_running_requests=8, disable_cuda_graph=True)
        config = ModelConfig.load(resolve_model(path), args.dtype, "cuda", args.context_length)
        runner = ModelRunner(args, config, "cuda")
        outs.append(_cuda_logits(runner, [5, 17, 200, 3, 99, 41]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=2e-2 * float(outs[1].abs().max()))


def _cuda_logits(runner, prompt):
    from edgelm.model_executor.forward_batch import ForwardBatch

    slot = runner.req_to_token_pool.alloc()
    kv = runner.allocator.alloc(len(prompt))
    runner.req_to_token_pool.write(slot, 0, kv)
    batch = ForwardBatch.for_extend(prompt, [slot], [0], [len(prompt)], kv, "cuda", return_all_logits=True)
    return runner.forward(batch).float()


def test_server_streams_from_a_gptq_checkpoint_of_the_embedded_model(embedded_gguf, tmp_path):
    """The embedded SmolLM2 written as an act-order GPTQ checkpoint (scales with 7 significant bits, so
    that -z·s is exact in fp16 and the int4 layers equal the dense dequantized ones bit for bit) is
    served from its directory; greedy text streamed through the openai client equals the dense
    dequantized model's greedy tokens run in-process."""
    import openai
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from edgelm.model_loader.gguf_loader import iterate_gguf_weights
    from tests.server_fixture import ServerProcess

    directory, name = os.path.split(embedded_gguf)
    hf_config = AutoConfig.from_pretrained(directory, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    quant_sd, dense_sd, perms = {}, {}, {}
    gen = torch.Generator().manual_seed(0)
    for key, tensor in iterate_gguf_weights(embedded_gguf, hf_config.num_attention_heads,
                                            hf_config.num_key_value_heads):
        prefix, _, leaf = key.rpartition(".")
        layer = prefix.rpartition(".")[2]
        if leaf != "weight" or layer not in LINEARS:
            quant_sd[key] = dense_sd[key] = tensor.float().contiguous()
            continue
        w = tensor.float()
        k = w.shape[1]
        shared = (prefix.rpartition(".")[0], "qkv" if layer in ("q_proj", "k_proj", "v_proj") else
                  "gate_up" if layer in ("gate_proj", "up_proj") else layer)
        if shared not in perms:
            perms[shared] = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perms[shared]] = (torch.arange(k) // 64).int()
        q, z, s, _ = quantize(w, 64, g_idx)
        s = s.to(torch.bfloat16).half()  # 8 significant bits; z (4 bits) · s fits fp16's 11
        dense_sd[key] = (q - z[g_idx].t()).float() * s[g_idx].t().float()
        quant_sd[f"{prefix}.qweight"], quant_sd[f"{prefix}.qzeros"] = pack_gptq(q, z, v1=True)
        quant_sd[f"{prefix}.scales"], quant_sd[f"{prefix}.g_idx"] = s, g_idx
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": False}
    paths = {}
    for sub, sd, extra in (("gptq", quant_sd, {"quantization_config": qcfg}), ("dense", dense_sd, {})):
        path = paths[sub] = str(tmp_path / sub)
        os.makedirs(path)
        save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"], **extra}, f)
        tokenizer.save_pretrained(path)

    prompt = "The capital of France is"
    ids = tokenizer(prompt)["input_ids"]
    tokens, _ = Driver(make_runner(paths["dense"])).greedy([ids], 12)
    eos = tokenizer.eos_token_id
    expected = tokenizer.decode(tokens[0][: tokens[0].index(eos)] if eos in tokens[0] else tokens[0])

    server = ServerProcess("--model-path", paths["gptq"], "--quantization", "gptq")
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        log = server.read_log()
    finally:
        server.stop()
    assert "GPTQ checkpoint (group 64)" in log and "gptq int4" in log
    assert text == expected and text.strip()
