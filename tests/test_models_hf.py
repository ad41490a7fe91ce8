"""edgelm's models against transformers on tiny random checkpoints, float32 on the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import Driver, make_checkpoint, make_runner

FAMILIES = ["llama3", "llama", "qwen2", "qwen3"]
PROMPTS = [[5, 17, 200, 31, 9, 250, 11], [3, 101, 42], [60, 61, 62, 63, 64]]
NEW_TOKENS = 10
ATOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(HF model, edgelm runner) on the same tiny checkpoint."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(request.param, directory)
    return hf, make_runner(str(directory))


def test_loaded_architecture(pair):
    hf, runner = pair
    assert type(runner.model).__name__ == type(hf).__name__
    assert runner.dtype == torch.float32  # --dtype auto on the CPU
    rope = getattr(hf.config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "llama3":  # the scaled table differs from the plain one
        from edgelm.layers.rotary import RotaryEmbedding

        table = runner.model.model.layers[0].self_attn.rotary_emb.cos_sin_cache
        plain = RotaryEmbedding(table.shape[1], table.shape[0], rope["rope_theta"]).cos_sin_cache
        assert not torch.allclose(table, plain)


def test_prefill_logits_every_position(pair):
    hf, runner = pair
    driver = Driver(runner)
    reqs = driver.add_requests(len(PROMPTS))
    logits = driver.extend(reqs, PROMPTS, return_all_logits=True)
    assert logits.dtype == torch.float32
    assert logits.shape == (sum(map(len, PROMPTS)), hf.config.vocab_size)
    start = 0
    for prompt in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits[start:start + len(prompt)], ref, atol=ATOL, rtol=0)
        start += len(prompt)


def test_prefill_then_decode_matches_generate(pair):
    hf, runner = pair
    tokens, step_logits = Driver(runner).greedy(PROMPTS, NEW_TOKENS)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                              return_dict_in_generate=True, output_logits=True)
        assert tokens[i] == ref.sequences[0, len(prompt):].tolist()
        for step, hf_logits in enumerate(ref.logits):
            torch.testing.assert_close(step_logits[step][i], hf_logits[0], atol=ATOL, rtol=0,
                                       msg=lambda m, i=i, step=step: f"request {i} step {step}: {m}")



@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_bfloat16_close_to_transformers_bfloat16(family, tmp_path):
    hf = make_checkpoint(family, tmp_path).to(torch.bfloat16)
    runner = make_runner(str(tmp_path), dtype="bfloat16")
    assert runner.dtype == torch.bfloat16
    tokens, step_logits = Driver(runner).greedy(PROMPTS[:2], 6)
    for i, prompt in enumerate(PROMPTS[:2]):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
        assert tokens[i] == ref.sequences[0, len(prompt):].tolist()
        for step, hf_logits in enumerate(ref.logits):
            torch.testing.assert_close(step_logits[step][i], hf_logits[0].float(), atol=0.1, rtol=0)
