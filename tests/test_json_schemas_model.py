"""Constrained greedy decoding on the embedded model: for each of 20 JSON schemas, edgelm's own
ModelRunner decodes under the xgrammar mask, and the output parses and validates."""

import json
import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from edgelm.constrained import allocate_vocab_mask, apply_vocab_mask, create_grammar_backend, fill_vocab_masks  # noqa: E402
from edgelm.model_config import ModelConfig  # noqa: E402
from edgelm.model_executor.forward_batch import ForwardBatch  # noqa: E402
from edgelm.model_executor.model_runner import ModelRunner  # noqa: E402
from edgelm.model_loader.resolve import resolve_model  # noqa: E402
from edgelm.server_args import ServerArgs  # noqa: E402

SCHEMAS = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
MAX_NEW_TOKENS = 64  # the longest output here takes ~35 tokens


@pytest.fixture(scope="module")
def model(embedded_gguf):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(embedded_gguf),
                                              gguf_file=os.path.basename(embedded_gguf))
    args = ServerArgs(model_path=embedded_gguf, device="cpu", max_total_tokens=4096, max_running_requests=32)
    config = ModelConfig.load(resolve_model(embedded_gguf), "auto", "cpu", 2048)
    return tokenizer, config, ModelRunner(args, config, "cpu")


def _prompt_ids(tokenizer, case) -> list[int]:
    # short prompts: on two shared CPU cores the prefill dominates; the grammar supplies the keys
    messages = [{"role": "system", "content": "Reply in JSON."}, {"role": "user", "content": case["prompt"]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _common_prefix_len(prompts: list[list[int]]) -> int:
    n = min(map(len, prompts)) - 1  # every request keeps at least one token to extend
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return n


def constrained_greedy(runner: ModelRunner, prompts: list[list[int]], grammars, max_new_tokens: int):
    """Prefill the prompts' shared prefix once and the rest in one batch, then decode the
    unfinished requests step by step, each step's logits masked by the requests' grammars.
    Returns each request's output token ids."""
    batch = len(prompts)
    pool = runner.req_to_token_pool
    shared = _common_prefix_len(prompts)
    prefix_slot, prefix_kv = pool.alloc(), runner.allocator.alloc(shared)
    pool.write(prefix_slot, 0, prefix_kv)
    runner.forward(ForwardBatch.for_extend(prompts[0][:shared], [prefix_slot], [0], [shared], prefix_kv,
                                           runner.device))
    slots = [pool.alloc() for _ in prompts]
    kv = runner.allocator.alloc(sum(len(ids) - shared for ids in prompts))
    start = 0
    for slot, ids in zip(slots, prompts):
        pool.write(slot, 0, prefix_kv)
        pool.write(slot, shared, kv[start : start + len(ids) - shared])
        start += len(ids) - shared
    fb = ForwardBatch.for_extend([t for ids in prompts for t in ids[shared:]], slots, [shared] * batch,
                                 [len(ids) - shared for ids in prompts], kv, runner.device)
    logits = runner.forward(fb)
    bitmask = allocate_vocab_mask(logits.shape[-1], batch, pin_memory=False)
    outputs = [[] for _ in prompts]
    seq_lens = [len(ids) for ids in prompts]
    active = list(range(batch))
    while True:
        rows = fill_vocab_masks([grammars[i] for i in active], bitmask)
        apply_vocab_mask(logits, bitmask, rows)
        next_ids = logits.argmax(dim=-1).tolist()
        still = []
        for i, token in zip(active, next_ids):
            assert grammars[i].accept_token(token), f"request {i}: the mask let through token {token}"
            outputs[i].append(token)
            if not grammars[i].is_terminated() and len(outputs[i]) < max_new_tokens:
                still.append(i)
        active = still
        if not active:
            break
        kv = runner.allocator.alloc(len(active))
        for j, i in enumerate(active):
            pool.write(slots[i], seq_lens[i], kv[j : j + 1])
            seq_lens[i] += 1
        fb = ForwardBatch.for_decode([outputs[i][-1] for i in active], [slots[i] for i in active],
                                     [seq_lens[i] for i in active], kv, runner.device)
        logits = runner.forward(fb)
    for slot in slots + [prefix_slot]:
        pool.free(slot)
    runner.allocator.clear()
    return outputs


@pytest.mark.slow
def test_twenty_schemas_decode_to_valid_json(model):
    tokenizer, config, runner = model
    eos = sorted(config.eos_token_ids)
    backend = create_grammar_backend("xgrammar", tokenizer, config.vocab_size, eos, any_whitespace=False)
    try:
        futures = [backend.get_future(("json", json.dumps(case["schema"]))) for case in SCHEMAS]
        grammars = [f.result(timeout=120) for f in futures]
        prompts = [_prompt_ids(tokenizer, case) for case in SCHEMAS]
        started = time.perf_counter()
        with torch.inference_mode():
            outputs = constrained_greedy(runner, prompts, grammars, MAX_NEW_TOKENS)
        elapsed = time.perf_counter() - started
    finally:
        backend.shutdown()
    failures = []
    for case, ids, grammar in zip(SCHEMAS, outputs, grammars):
        text = tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)
        try:
            jsonschema.validate(json.loads(text), case["schema"])
            assert grammar.is_terminated(), "ran out of tokens"
        except Exception as exc:  # collect every schema's result before failing
            failures.append(f"{case['name']}: {type(exc).__name__} {str(exc)[:200]} in {text!r}")
    for case, ids in zip(SCHEMAS, outputs):
        print(f"{case['name']:>16}: {tokenizer.decode(ids, skip_special_tokens=True)}")
    print(f"20 schemas, {sum(map(len, outputs))} tokens in {elapsed:.1f} s")
    assert not failures, "\n".join(failures)
