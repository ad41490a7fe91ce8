"""The embedded SmolLM2-135M GGUF: edgelm's greedy output equals transformers' on the same file
(both dequantize the Q4_1 weights to float32: --dequantize-gguf, where edgelm would serve them as int4)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.tiny_models import Driver, make_runner

pytestmark = pytest.mark.slow  # two GGUF loads: ~20-40 s on two shared cores

# SmolLM2's chat template applied to one user message each (the tokenizer is not needed here):
# "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
# "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
_SYSTEM = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
           8182, 2, 198, 1, 4093, 198]
_ASSISTANT = [2, 198, 1, 520, 9531, 198]
HAIKU = _SYSTEM + [19161, 253, 421, 30614, 563, 260, 3426, 30] + _ASSISTANT  # Write a haiku about the sea.
GRAVITY = _SYSTEM + [36971, 9354, 288, 253, 811, 281, 827, 8545, 30] + _ASSISTANT  # Explain gravity to a child...
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def hf_model(embedded_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(embedded_gguf),
                                                gguf_file=os.path.basename(embedded_gguf),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runner(embedded_gguf):
    # no --model-path: the embedded one, dequantized as transformers reads it
    return make_runner(None, max_total_tokens=512, context_length=1024, dequantize_gguf=True)


@pytest.fixture(scope="module")
def hf_greedy(hf_model):
    """Each prompt's greedy tokens and per-step logits from transformers, one prompt at a time."""
    refs = {}
    for name, prompt in (("haiku", HAIKU), ("gravity", GRAVITY)):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                                    return_dict_in_generate=True, output_logits=True)
        tokens = out.sequences[0, len(prompt):].tolist()
        assert len(tokens) == NEW_TOKENS, "the reference stopped early: pick a prompt with a longer answer"
        refs[name] = tokens, [lg[0] for lg in out.logits]
    return refs


def test_embedded_model_config(runner):
    assert runner.model_config.architecture == "LlamaForCausalLM"
    assert runner.dtype == torch.float32
    assert 2 in runner.model_config.eos_token_ids  # <|im_end|>


def test_greedy_chat_continuation_equals_transformers(runner, hf_greedy):
    """Two chat prompts of different lengths, prefilled and decoded in one batch, each equal to
    transformers' solo greedy output, token for token, with logits within 1e-3."""
    tokens, logits = Driver(runner).greedy([HAIKU, GRAVITY], NEW_TOKENS)
    for i, name in enumerate(("haiku", "gravity")):
        ref_tokens, ref_logits = hf_greedy[name]
        assert tokens[i] == ref_tokens, name
        for step, (ours, ref) in enumerate(zip(logits, ref_logits)):
            torch.testing.assert_close(ours[i], ref, atol=1e-3, rtol=0,
                                       msg=lambda m, s=step, n=name: f"{n} step {s}: {m}")


def test_int4wo_gguf_stream_scales_down_proj_as_after_load(embedded_gguf, runner):
    """--torchao-config int4wo-128 on the embedded GGUF: the loading stream (down_scale included)
    gives every layer's MLP the int4 weights that quantizing the loaded model gives (the numbers
    benchmarks/results/quant_quality.json measured), and down_proj is scaled (int4 at group 128 does
    not reproduce a Q4_1 model's weights)."""
    import copy

    from edgelm.quantization import torchao_config as tc

    streamed = make_runner(None, max_total_tokens=512, context_length=1024, torchao_config="int4wo-128")
    after = copy.deepcopy(runner.model)
    tc.quantize_int4_model(after, 128)
    for a, b, dense in zip(streamed.model.model.layers, after.model.layers, runner.model.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            x, y = getattr(a.mlp, name), getattr(b.mlp, name)
            assert torch.equal(x.qweight, y.qweight) and torch.equal(x.scales, y.scales)
            assert torch.equal(x.offsets, y.offsets)
        unscaled = type(a.mlp.down_proj).quantize(dense.mlp.down_proj.weight.data, 128)
        assert not torch.equal(unscaled.scales, a.mlp.down_proj.scales)
